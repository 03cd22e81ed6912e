"""gan-ddp: distributed GAN training on MNIST with Hugging Face Accelerate."""

__version__ = "0.1.0"

from gan_ddp.runtime import faults as _faults  # torch-free, as is everything imported here

if _faults.running_as_command():  # before any slow import: a SIGTERM from here on ends in one line, exit 75
    _faults.exit_on_signals()

# Every config key's values, declared (torch-free) before any implementing module registers under them.
from gan_ddp import choices  # noqa: F401
