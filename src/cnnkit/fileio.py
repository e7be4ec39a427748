"""Files that are never half-written: temporary file in the same folder, fsync, ``os.replace``,
fsync of the folder. Free of torch, so light commands (``cnnkit doctor``) can use it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cnnkit.errors import CnnkitError


def _file_mode() -> int:
    umask = os.umask(0o022)  # read the umask (set back at once; this runs once, at import)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see the old or the new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; give what open() would have given
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CnnkitError(
                f"cannot write {path}: {e.strerror or e}; the previous file is unchanged"
            ) from e
        raise
    fsync_dir(path.parent)


def commit(tmp: str | Path, path: str | Path) -> None:
    """Move a finished temporary file (written by a library that saves to a path: ONNX,
    TorchScript, tar shards) over ``path`` durably: fsync it, ``os.replace``, fsync the folder."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)
