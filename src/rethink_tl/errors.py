"""The one error type a user can cause.

Anything raised as ``UserError`` is printed by the CLI as a single message and the
process exits non-zero; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, bad configuration or a missing resource: something the user can fix."""


class NotYourRun(UserError):
    """The output folder belongs to another run (other settings, or another process training it): the
    command is refused without writing anything there, not even the error.txt of a failed sweep job."""
