import sys

from gan_ddp.cli import main

sys.exit(main())
