"""`python -m convert` in a checkout: forwards to `python -m lpjax.convert`."""

from lpjax import cli
from lpjax.convert.__main__ import main

if __name__ == "__main__":
    cli.run(main)
