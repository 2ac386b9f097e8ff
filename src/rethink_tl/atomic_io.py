"""Files that must never be seen half-written: checkpoints, tables, JSON. Write to a temporary name in the
same folder, then rename; a full disk or an unwritable folder is one clear UserError and the previous
version of the file stays as it was. Files get the permissions any other tool would give them (0666
less the umask), not mkstemp's private 0600: collaborators on a shared cluster read each other's runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from .errors import DamagedFile, UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: Path, data: bytes | Callable[[], bytes], *,
                option: str = "hydra.run.dir / hydra.sweep.dir") -> None:
    """Write ``data`` (or what the callable returns) to ``path`` atomically. ``option``: what the user sets to
    choose another place (named in the message when the write fails)."""
    path = Path(path)
    tmp = None
    try:
        payload = data() if callable(data) else data
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())  # the rename must not reach the disk before the content does
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except OSError as err:
        _discard(tmp)
        raise UserError(f"could not write {path}: {err.strerror or err}; free some disk space or choose a writable "
                        f"output folder ({option}); the previous version of the file, if any, is intact") from err
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str | None) -> None:
    if tmp and os.path.exists(tmp):
        os.unlink(tmp)


def save(obj: Any, path: Path) -> None:
    """torch.save, atomically. The checkpoint is serialised in memory first: torch's own file writer
    reports a full disk as a bare RuntimeError, a plain file write reports it as ENOSPC."""

    def serialise() -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    write_bytes(path, serialise)


def load(path: Path, map_location: str | torch.device = "cpu", fix: str | None = None) -> Any:
    """torch.load of tensors and plain containers only (weights_only). A damaged or truncated file is a
    DamagedFile naming the file and ``fix`` (what to do about it)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError, OSError) as err:
        # (OSError: torch's zip reader on a truncated file, "[Errno 22] Invalid argument")
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DamagedFile(f"{path} is damaged or incomplete ({reason[:200]}); "
                        + (fix or "delete it or restore it from a backup")) from err


def write_csv(df: pd.DataFrame, path: Path) -> None:
    write_bytes(path, lambda: df.to_csv(index=False).encode())


def write_json(obj: Any, path: Path) -> None:
    write_bytes(path, lambda: (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())
