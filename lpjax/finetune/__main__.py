"""`python -m lpjax.finetune`: see lpjax/finetune/__init__.py."""

from lpjax import cli
from lpjax.finetune import main

if __name__ == "__main__":
    cli.run(main)
