"""The one error family a user can cause.

Anything raised as ``UserError`` (or a subclass) is printed by the CLI as a single message and the
process exits 2; every other exception is a bug and keeps its traceback. The subclasses say what kind of
problem it is, so that code which must treat one kind differently tests the type, never the message.
"""


class UserError(Exception):
    """Bad input, bad configuration or a missing resource: something the user can fix."""


class NotYourRun(UserError):
    """The output folder belongs to another run (other settings, or another process training it): the
    command is refused without writing anything there, not even the error.txt of a failed sweep job."""


class DamagedFile(UserError):
    """A file that exists but cannot be read as what it should be (truncated, corrupt, of another kind)."""
