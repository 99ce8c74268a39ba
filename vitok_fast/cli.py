"""How every command-line tool reports a user error: one line, exit status 2, no traceback.

A tool raises :class:`UserError` (or ``FileNotFoundError`` / ``ValueError`` from the library's
edge checks) with a message that says what was expected, what was given and what to do;
:func:`run` prints ``error: <message>`` on stderr and exits 2. ``VITOK_DEBUG=1`` re-raises
instead, so the traceback is there when a developer wants it. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """A mistake the user can fix: a bad option, a missing file, a mismatched checkpoint."""


# Exceptions that the library raises only for input it was given (checked at the edge).
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)


def run(main: Callable[..., object], *args, **kwargs):
    """Call ``main``; turn a user error into ``error: ...`` on stderr and exit status 2."""
    try:
        return main(*args, **kwargs)
    except USER_ERRORS as e:
        if os.environ.get("VITOK_DEBUG") == "1":
            raise
        message = str(e) if str(e) else type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename and e.filename not in message:
            message = f"{message}: {e.filename}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
