"""Small shared helpers: atomic file writes and optional-dependency checks."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "require_pyzbar"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    A crash while writing never leaves a truncated file behind: readers see the old file or the new one.

    Args:
        path: destination file; its parent folder is created if missing.
        data: the bytes to write.
        mode: permission bits of the file (key files use 0o600: they hold the secret trigger seed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int = 0o644) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", mode)


def require_pyzbar():
    """Import ``pyzbar.pyzbar`` or raise an ImportError that says exactly what to install."""
    try:
        from pyzbar import pyzbar
    except ImportError as e:  # both the Python package and the shared library can be missing
        raise ImportError(
            "QR decoding needs pyzbar and the ZBar shared library: `pip install pyzbar` and, on Debian/Ubuntu, "
            "`apt-get install -y libzbar0` (macOS: `brew install zbar`). Original error: " + str(e)
        ) from e
    return pyzbar
