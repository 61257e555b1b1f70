import sys

from sidecar.cli import main

sys.exit(main(prog="python -m sidecar"))
