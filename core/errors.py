"""Errors every floor raises and the CLI reports."""


class UsageError(Exception):
    """A mistake of the user's: reported in one line, exit code 2."""
