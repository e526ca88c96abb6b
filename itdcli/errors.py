"""User-facing errors: each becomes one line on stderr and exit code 2 in `itd`."""


class ItdError(Exception):
    """A problem with the user's input that the user can fix; the message says what and how."""


class ItdInterrupted(ItdError):
    """Ctrl-C during a long run that has saved what it had; `itd` exits with 130."""
