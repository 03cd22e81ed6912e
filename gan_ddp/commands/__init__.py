"""The command layer: `gan-ddp` and its subcommands; parses arguments and calls the layers below."""
