"""The one exception type a user is meant to see.

A ``CnnkitError`` carries a one-line message that says what was wrong (with the offending value or
path) and what to do about it. The CLI prints it without a traceback and exits with code 2.
"""


class CnnkitError(Exception):
    """A problem with the user's input (data, config, model name, file), not a bug in cnnkit."""
