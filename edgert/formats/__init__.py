"""Model-file readers. Each validates everything it reads; none imports from the layers above (llm, session)."""
from __future__ import annotations

import os

from ..errors import InvalidArgumentError, ModelNotFoundError


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


def array_file(path):
    """A user's array file: a ``.npy`` as an array, an ``.npz`` as {name: array} (told apart by content, as numpy
    does). InvalidArgumentError naming the file for anything numpy cannot read without pickle: an empty, text,
    truncated or damaged file, a pickled object array (numpy raises assorted types for these)."""
    import zipfile
    import zlib

    import numpy as np

    path = os.fspath(path)
    what = f"{path}: not a readable {'.npz' if path.endswith('.npz') else '.npy'} array file"
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise InvalidArgumentError(f"{what} ({exc.strerror or exc})") from None
    if head != b"\x93NUMPY" and head[:4] != b"PK\x03\x04":
        raise InvalidArgumentError(f"{what} ({'the file is empty' if not head else 'no NumPy header'}); save arrays "
                                   "with np.save or np.savez")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                return {k: data[k] for k in data.files}
        return data
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InvalidArgumentError(f"{what} ({type(exc).__name__}: {exc})") from None
