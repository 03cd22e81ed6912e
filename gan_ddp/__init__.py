"""gan-ddp: distributed GAN training on MNIST with Hugging Face Accelerate."""

__version__ = "0.1.0"

from gan_ddp.runtime import compat as _compat

_compat.install_shims()  # before any Accelerate state exists (old torch, see compat.py)

# The modules that declare the config's choices (gan_ddp.registry): imported here so that every registry is
# complete before any config is validated, whichever module a caller imports first.
from gan_ddp.components import augment, data, losses, models  # noqa: E402, F401
from gan_ddp.evaluation import evaluator  # noqa: E402, F401
