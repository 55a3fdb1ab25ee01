"""One exception type for every mistake a user can make.

The CLI prints its message as one line and exits non-zero; the daemon logs it
and counts it. Anything else escaping is a bug in headmaster.
"""


class HeadmasterError(Exception):
    """A user-facing error: bad input, missing model, invalid head, ..."""
