import sys

from meshlet.cli import main

sys.exit(main())
