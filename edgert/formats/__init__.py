"""Model-file readers. Each validates everything it reads; none imports from the layers above (llm, session)."""
from __future__ import annotations

import os

from ..errors import ModelNotFoundError


def model_file(src, kind: str) -> str:
    """The path ``src`` as a str, when it names a regular file; ModelNotFoundError naming the path as given
    otherwise. Checked before anything opens it: a device (``/dev/zero``) would be read until memory runs out, a
    FIFO would block the open, a directory would fail with a bare OSError."""
    path = os.fspath(src)
    if not os.path.exists(path):
        raise ModelNotFoundError(f"{kind} model {path!r} does not exist")
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"{kind} model {path!r} is not a regular file (a directory, device or FIFO); give "
                                 "the path of a model file")
    return path
