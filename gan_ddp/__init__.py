"""gan-ddp: distributed GAN training on MNIST with Hugging Face Accelerate."""

__version__ = "0.1.0"

# Every config key's values, declared (torch-free) before any implementing module registers under them.
from gan_ddp import choices  # noqa: F401
