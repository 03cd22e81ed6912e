import sys

from gan_ddp.commands.cli import main

sys.exit(main())
