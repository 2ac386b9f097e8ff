"""Files that must never be seen half-written: write to a temporary name, then rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .errors import UserError


def _atomic(path: Path, write) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except OSError as err:
        _discard(tmp)
        raise UserError(f"could not write {path}: {err.strerror or err}; free some disk space or choose a writable "
                        "output folder (hydra.run.dir / hydra.sweep.dir); the previous version of the file, if any, "
                        "is intact") from err
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp and os.path.exists(tmp):
        os.unlink(tmp)


def save(obj: Any, path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    _atomic(path, lambda tmp: df.to_csv(tmp, index=False))
