import sys

from peftgen.cli import main

sys.exit(main())
