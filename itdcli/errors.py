"""User-facing errors: each becomes one line on stderr and exit code 2 in `itd`."""


class ItdError(Exception):
    """A problem with the user's input that the user can fix; the message says what and how."""


class ItdOptionError(ItdError):
    """An invalid library option, with the field it concerns (the CLI words it as its flag)."""

    def __init__(self, field: str, problem: str) -> None:
        """Keep the field and the problem apart."""
        super().__init__(f"invalid option {field}: {problem}")
        self.field, self.problem = field, problem


class ItdInterrupted(ItdError):
    """Ctrl-C during a long run that has saved what it had; `itd` exits with 130."""
