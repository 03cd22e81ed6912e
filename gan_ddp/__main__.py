from gan_ddp.commands.cli import entry

entry()
