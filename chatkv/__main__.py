import sys

from chatkv.cli import main

sys.exit(main())
