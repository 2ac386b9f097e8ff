"""One run's folder: which settings it belongs to, and whether it is finished, resumable or new.

A folder belongs to one set of result-affecting settings (identity.identity), recorded in identity.json.
A run is skipped or resumed only when the stored settings equal the requested ones; anything else is
refused with the differing keys. ``runtime.force=true`` starts over, but the old files go only when the
new run writes its first file (``claim``): a run that fails before that, on a typo or a missing file,
leaves the old one intact. One process at a time trains in a folder (a lock file, held from ``acquire``
to ``release``), so the jobs of parallel sweeps that meet in one folder never train it twice.

``rtl train`` and ``rtl pretrain`` both use it (``TRAIN`` / ``PRETRAIN`` say what each writes); a folder
of one kind is never reused by the other.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from . import atomic_io, runfiles as rf
from .errors import NotYourRun, UserError
from .identity import differences, setting_id


@dataclass(frozen=True)
class RunKind:
    name: str  # in messages: "an rtl train run"
    files: tuple[str, ...]  # what this kind of run writes
    done: str  # the file that marks it finished
    foreign: tuple[str, ...]  # files only the other kind writes: such a folder is not ours


TRAIN = RunKind("rtl train", rf.TRAIN_FILES, rf.RESULTS, (rf.WEIGHTS_META, rf.PRETRAIN_HISTORY))
PRETRAIN = RunKind("rtl pretrain", rf.PRETRAIN_FILES, rf.WEIGHTS_META, (rf.RESULTS, rf.METRICS, rf.BEST))
_OTHER = {TRAIN.name: PRETRAIN.name, PRETRAIN.name: TRAIN.name}
_RECORDS = (rf.IDENTITY, rf.CONFIG, rf.ERROR)  # written by a claim or a failure, not by training


class RunDir:
    """The folder of one run of ``kind`` with ``settings``; see the module docstring."""

    def __init__(self, path: Path, settings: dict[str, Any], force: bool, kind: RunKind = TRAIN):
        self.path, self.settings, self.force, self.kind = Path(path), settings, force, kind
        self.claimed = False
        self.lock = FileLock(str(self.path / rf.LOCK))

    def file(self, name: str) -> Path:
        return self.path / name

    def acquire(self) -> None:
        """Take the folder's lock (creating the folder), or refuse: another process is training here."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise NotYourRun(f"another rtl process is training in {self.path} right now; wait for it to finish, "
                            "or give this run another output folder (hydra.run.dir=...)") from None

    def release(self) -> None:
        if self.lock.is_locked:
            self.lock.release()

    def status(self) -> str:
        """``finished``, ``resume`` or ``new``; raises UserError when the folder holds other settings."""
        other = [name for name in self.kind.foreign if self.file(name).exists()]
        if other:
            raise NotYourRun(f"{self.path} holds an {_OTHER[self.kind.name]} run ({', '.join(other)}), not one of "
                             "this kind: give this run another output folder (hydra.run.dir=...)")
        stored_path = self.file(rf.IDENTITY)
        has_run = any(self.file(name).exists() for name in self.kind.files if name not in _RECORDS)
        if self.force or not (has_run or stored_path.exists()):
            return "new"
        if not stored_path.exists():
            raise UserError(f"{self.path} holds a run without a record of its settings ({rf.IDENTITY}; made by an "
                            "older rtl?), so it cannot be resumed or reused safely: give this run another output "
                            "folder, or start it over with runtime.force=true")
        try:
            stored = json.loads(stored_path.read_text())["settings"]
            if not isinstance(stored, dict):
                raise TypeError("'settings' is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise NotYourRun(f"{stored_path} is damaged ({err}), so this folder cannot be resumed or reused safely: "
                             "start the run over with runtime.force=true, or use another output folder") from err
        diff = differences(stored, self.settings)
        if diff:
            raise NotYourRun(f"{self.path} holds a run with other settings ({len(diff)} differ: {'; '.join(diff)}): "
                             "give this run another output folder (hydra.run.dir=... or hydra.sweep.dir=...), or "
                             "replace that run with runtime.force=true")
        if self.file(self.kind.done).exists():
            return "finished"
        return "resume" if self.file(rf.LAST).exists() else "new"

    def claim(self, cfg: DictConfig) -> None:
        """Before the first file of this run is written: clear a forced run's old files, record the settings."""
        if self.claimed:
            return
        if self.force:
            for name in self.kind.files:
                self.file(name).unlink(missing_ok=True)
            # rtl export's files describe the checkpoint being replaced (a card with its numbers): they go too
            shutil.rmtree(self.file(rf.EXPORT_DIR), ignore_errors=True)
        for stale_tmp in self.path.glob(".*.tmp"):  # left by a process killed in the middle of an atomic write
            stale_tmp.unlink()
        self.file(rf.ERROR).unlink(missing_ok=True)
        atomic_io.write_json({"setting_id": setting_id(self.settings), "settings": self.settings},
                             self.file(rf.IDENTITY))
        atomic_io.write_bytes(self.file(rf.CONFIG), OmegaConf.to_yaml(cfg, resolve=True).encode())
        self.claimed = True


def check_resumable(state: Any, fingerprint: str, precision: str, source: Path) -> None:
    """The settings matched (RunDir.status); a checkpoint can still differ in what settings do not fix: the data
    files changed under the same config, or this machine resolves runtime.amp=auto to another precision.
    (``last.pt`` of rtl train and of rtl pretrain.)"""
    keys = ("data_fingerprint", "precision", "model", "optimizer")
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise UserError(f"{source} is not a checkpoint of this kind of run (no {', '.join(missing)}): delete it to "
                        "start the run over, or use runtime.force=true")
    if state["data_fingerprint"] != fingerprint:
        raise UserError(f"{source} was trained on other data (fingerprint {state['data_fingerprint']}, now "
                        f"{fingerprint}: images, labels or file names changed): start over with runtime.force=true")
    if state["precision"] != precision:
        raise UserError(f"{source} was trained in {state['precision']}, this machine would continue in "
                        f"{precision}: set runtime.amp={state['precision'].replace('fp32', 'off')} "
                        "to resume, or start over with runtime.force=true")


def resume_hint(force: bool) -> str:
    """What to run to continue a stopped run. A forced run resumes like any other, once the force is dropped
    (with it, the run would start over)."""
    return ("run the same command again to resume" if not force else
            "run the same command without runtime.force=true to resume")
