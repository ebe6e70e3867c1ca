"""The base of every error a user can fix: entry points print it as one `error: ...` line.

Anything else that escapes an entry point is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the input (config, flags, paths, data, checkpoints) or a condition of the
    machine (a full disk, a workdir in use); the message says what is wrong and the fix."""

    exit_code = 2
