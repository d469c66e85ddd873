"""The one exception type a user should ever see from lpjax.

Anything raised as `LPJaxError` is a problem with the user's input (a path, a config, a plan, a prompt, a device
count). The command-line entry points print its message on one line and exit non-zero; any other exception is a bug.
"""


class LPJaxError(Exception):
    """Bad input, explained in one line."""
