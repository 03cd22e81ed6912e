"""Training: the loop (`trainer`) and the components it wires: set-up (`builder`), the GAN step (`step`), the
run's state and checkpoints (`state`), its outputs (`outputs`), stop rules (`stop`), the EMA and the metric window."""
