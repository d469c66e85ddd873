import sys

from bench.common import exit_code
from bench.torch_tp.cli import main

if __name__ == "__main__":
    sys.exit(exit_code(main))
