"""The one exception type that means "the user asked for something we cannot do"."""


class UsageError(Exception):
    """Bad usage or bad input. The CLI prints the message as one line and exits 2.

    The message must say what is wrong and how to fix it.
    """
