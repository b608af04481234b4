import sys

from alignreg.cli import main

sys.exit(main())
