"""One exception type for every user-facing failure: the CLI prints its message as one line and exits 2."""


class TellnormError(Exception):
    """Bad input or a missing resource; the message says what was wrong and what to do."""
