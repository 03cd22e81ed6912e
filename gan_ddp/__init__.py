"""gan-ddp: distributed GAN training on MNIST with Hugging Face Accelerate."""

__version__ = "0.1.0"

from gan_ddp import compat as _compat

_compat.install_shims()  # before any Accelerate state exists (old torch, see compat.py)
from gan_ddp import evaluator  # noqa: E402, F401  (fills the registries)
