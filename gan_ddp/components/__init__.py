"""The building blocks a run is made of: models, losses, augmentation, data (+ the bundled MNIST test split),
a generator loaded back from a run directory, and the pictures drawn from one."""
