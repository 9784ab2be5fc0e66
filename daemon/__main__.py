import sys

from runwatch.daemon.cli import main

sys.exit(main())
