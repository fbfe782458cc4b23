"""Errors the CLI prints as one clear line instead of a traceback."""


class UsageError(Exception):
    """Something the user asked for cannot be done; the message says what to change."""
