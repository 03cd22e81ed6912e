"""gan-ddp: distributed GAN training on MNIST with Hugging Face Accelerate."""

__version__ = "0.1.0"

from gan_ddp import faults as _faults

if _faults.running_as_command():  # before the slow imports below: a SIGTERM from here on ends in one line, exit 75
    _faults.exit_on_signals()

from gan_ddp import compat as _compat

_compat.install_shims()  # before any Accelerate state exists (old torch, see compat.py)

# The modules that declare the config's choices (gan_ddp.registry): imported here so that every registry is
# complete before any config is validated, whichever module a caller imports first.
from gan_ddp import augment, data, evaluator, losses, models  # noqa: E402, F401
