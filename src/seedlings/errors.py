"""The one error type users see: bad input, reported as one line on stderr with exit status 2."""


class UserError(Exception):
    """Bad input (a file, a key, a value): the CLI prints the message and exits with status 2."""


class Busy(UserError):
    """Another process (of this host or another sharing the folder) holds the lock: training skips such a fold."""
