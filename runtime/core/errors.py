"""One exception type for every user-facing failure.

The CLI prints its message as one paragraph and exits non-zero; anything else that
escapes is a bug and keeps its traceback.
"""


class ScarletError(Exception):
    """A problem with the user's input or environment, with what to do about it."""


class OutOfTime(ScarletError):
    """A time budget ran out before or while a step ran; the step wrote nothing."""
