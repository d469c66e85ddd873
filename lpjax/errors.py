"""The one exception type a user should ever see from lpjax, and how a foreign exception becomes part of its line.

Anything raised as `LPJaxError` is a problem with the user's input (a path, a config, a plan, a prompt, a device
count). The command-line entry points print its message on one line and exit non-zero; any other exception is a bug.
"""


class LPJaxError(Exception):
    """Bad input, explained in one line."""


class LPJaxWarning(UserWarning):
    """Input lpjax runs, but not quite as asked (a GGUF matrix type it cannot keep quantized): one line, and the
    command-line tools print it as `warning: ...`."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none: what an `LPJaxError` quotes of
    a library's error (multi-line tracebacks and hints from JAX, Orbax or transformers stay out of the one line)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__
