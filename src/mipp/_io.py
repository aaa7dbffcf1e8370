"""Writing files so that a reader never sees half of one: atomic writes, JSON in and out.

Every file mipp writes (checkpoints, sidecars, reports, a sweep's run records) goes through
:func:`atomic_write_bytes`: the bytes land in a temporary file in the same directory, are
flushed to disk, and the file is renamed into place, so an interrupted write leaves either
the old file or the new one, never a mixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "read_json", "write_json"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a flushed temporary file and an atomic rename.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> atomic_write_bytes(p, b"hello"); p.read_bytes(), sorted(x.name for x in p.parent.iterdir())
    (b'hello', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int = 1, allow_nan: bool = True
) -> None:
    """Write ``obj`` as JSON (with a trailing newline) to ``path`` atomically.

    ``allow_nan=False`` refuses NaN / Inf (strict JSON); by default they are written as
    Python's ``json`` module does (``NaN``), which it reads back.
    """
    text = json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n"
    atomic_write_bytes(path, text.encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in ``path``, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
