"""An exception as one line: the reason inside hpcfl's one-line messages (a user mistake is one
line, docs/ARCHITECTURE.md, "Invariants"), the same way in every room."""
from __future__ import annotations

import os

LONGEST = 300  # characters: a message is a line, not a log


def one_line(e: BaseException) -> str:
    """`e`'s reason in one line: an OS error's errno as words ("No space left on device", not
    h5py's paragraph around it); else its message with line breaks folded (h5py's and torch's
    span several), cut at LONGEST characters; else the name of its type."""
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    text = " ".join(str(e).split())
    if len(text) > LONGEST:
        text = text[:LONGEST - 3] + "..."
    return text or type(e).__name__
