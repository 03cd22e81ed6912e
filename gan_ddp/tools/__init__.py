"""Tools beside training: `gan-ddp bench` (times the real training step) and the textbook loop it compares with."""
