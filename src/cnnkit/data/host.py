"""What the data path takes from the machine: the cores it may use and the cache folder.

Free of torch, so the doctor (``cnnkit doctor``) uses the same rules as training.
"""

from __future__ import annotations

import os
from pathlib import Path

from cnnkit.config import DataConfig

CACHE_ENV = "CNNKIT_CACHE_DIR"  # replaces the default cache folder (not one set in the config)


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask on Linux, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cache_root(configured: str | os.PathLike | None = None) -> Path:
    """The cache folder (built-in downloads, decoded images, the doctor's results).

    ``configured``: ``data.cache_dir``. At its default (or None) ``$CNNKIT_CACHE_DIR`` replaces
    it when set; a folder set in the config or on the command line always wins.
    """
    default = DataConfig.cache_dir  # the dataclass field's default, written once in config.py
    if configured is None or str(configured) == default:
        return Path(os.environ.get(CACHE_ENV) or default).expanduser()
    return Path(configured).expanduser()
