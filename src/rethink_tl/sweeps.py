"""A sweep's jobs, whatever launches them: each job records what became of it, and the command that started the
sweep reads every record at the end, so that no failed, crashed or interrupted run passes for a finished one.

Launchers run jobs in this process (Hydra's basic launcher), in worker processes (joblib), in processes that
submitit starts on this machine or on SLURM nodes. What they hand back to the parent differs, and a job that
dies (killed, out of memory, its node lost) hands back nothing at all. So every job writes, under the sweep
folder (shared with the nodes: the runs go there too),

    <hydra.sweep.dir>/.rtl_jobs/<invocation>/<job number>.json   {"status": running | finished | paused |
                                                                  failed | crashed | interrupted, "run_dir", "reason", ...}

``running`` when it starts, its outcome when it ends. A record still ``running`` when the sweep is over is a job
whose process ended without saying how: it is reported as crashed. ``<invocation>`` is a fresh id per command
(RTL_SWEEP_ID in the environment, which every launcher passes on), so a sweep started again never reads the
records of an earlier one. A Hydra callback (``SweepCallback``, registered in conf/config.yaml) tells the parent
where the sweep folder is.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from . import atomic_io, runfiles as rf

ENV_ID = "RTL_SWEEP_ID"
ENV_PARENT = "RTL_SWEEP_PARENT"  # pid of the command that started the sweep
STATUSES = ("running", "finished", "paused", "failed", "crashed", "interrupted")  # paused: runtime.stop_after
INTERRUPTED_MARK = "INTERRUPTED"  # in the invocation's folder: jobs that start after it give up at once


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- in the command that starts the sweep -----------------------------------------------------------------

@dataclass
class Sweep:
    """This command's sweep: its invocation id, and the folder Hydra runs it in (known once it starts)."""

    id: str
    folder: Optional[Path] = None
    interrupted: bool = False
    previous_handler: Any = None  # this command's SIGINT handler before the sweep (SweepCallback), put back after

    @property
    def records(self) -> Optional[Path]:
        return None if self.folder is None else self.folder / rf.SWEEP_RECORDS / self.id


CURRENT: Optional[Sweep] = None


def begin() -> Sweep:
    """A new invocation: its id goes to every job through the environment."""
    global CURRENT
    CURRENT = Sweep(uuid.uuid4().hex[:12])
    os.environ[ENV_ID] = CURRENT.id
    os.environ[ENV_PARENT] = str(os.getpid())
    return CURRENT


def end() -> None:
    global CURRENT
    if CURRENT is not None:
        restore_signals(CURRENT)
    CURRENT = None
    os.environ.pop(ENV_ID, None)
    os.environ.pop(ENV_PARENT, None)


# Launchers whose jobs run in processes of this machine that this command starts: Ctrl-C stops them, saved.
LOCAL_WORKERS = ("joblib", "LocalLauncher")


class SweepCallback(Callback):
    """Hydra calls ``on_multirun_start`` / ``on_multirun_end`` in the command's own process, with the composed
    config: the sweep folder is learnt there, and with a launcher of local workers the first Ctrl-C becomes "stop
    every job, saved" (the second abandons them). The workers themselves do not hear Ctrl-C (rethink_tl's
    ``__init__`` blocks it in them): they watch the sweep's INTERRUPTED mark (``watch_parent``)."""

    # Hydra pickles its callbacks with every job it sends to a worker: all state is in the module's CURRENT.

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if CURRENT is None:
            return
        CURRENT.folder = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).absolute()
        CURRENT.records.mkdir(parents=True, exist_ok=True)
        target = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
        if any(name in target for name in LOCAL_WORKERS) and threading.current_thread() is threading.main_thread():
            CURRENT.previous_handler = signal.signal(signal.SIGINT, _interrupt)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if CURRENT is not None:
            restore_signals(CURRENT)


def _interrupt(signum, frame) -> None:
    if CURRENT is not None and not CURRENT.interrupted:
        CURRENT.interrupted = True
        mark_interrupted(CURRENT)
        print("rtl: stopping the sweep: every running job saves at the end of its step and no other starts "
              "(Ctrl-C again to abandon them unsaved)", file=sys.stderr, flush=True)
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise KeyboardInterrupt


def restore_signals(sweep: Sweep) -> None:
    """The command's signals as they were before the sweep (also when the sweep ends by an error)."""
    if sweep.previous_handler is not None:
        signal.signal(signal.SIGINT, sweep.previous_handler)
        sweep.previous_handler = None


def mark_interrupted(sweep: Sweep) -> None:
    """Jobs that start from now on stop before training (their runs stay as they are: rerun to go on)."""
    if sweep.records is not None:
        sweep.records.mkdir(parents=True, exist_ok=True)
        (sweep.records / INTERRUPTED_MARK).write_text(_now() + "\n")


@dataclass
class Outcome:
    """What the records of one invocation say."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def of(self, *statuses: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") in statuses]

    def problems(self) -> list[str]:
        """One line per run that did not finish: ``run folder: what happened``."""
        lines = []
        for r in self.records:
            status, where = r.get("status"), r.get("run_dir") or f"job {r.get('job')}"
            if status == "failed":
                lines.append(f"{where}: {r.get('reason')}")
            elif status == "crashed":
                lines.append(f"{where}: crashed: {r.get('reason')}")
            elif status == "running":
                lines.append(f"{where}: crashed: the job's process ended without an outcome (killed, out of memory, "
                             f"or its node lost; pid {r.get('pid')} on {r.get('host')})")
            elif status == "interrupted":
                lines.append(f"{where}: interrupted: {r.get('reason')}")
        return lines


def outcome(sweep: Sweep) -> Outcome:
    """Every job record of the invocation, in job order."""
    if sweep.records is None or not sweep.records.is_dir():
        return Outcome()
    found = []
    for path in sweep.records.glob("*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            found.append({"job": path.stem, "status": "crashed", "reason": f"its record {path} is damaged ({err})"})
    return Outcome(sorted(found, key=lambda r: int(r["job"]) if str(r.get("job", "")).isdigit() else 1 << 30))


# --- in a job ------------------------------------------------------------------------------------------------

class JobRecord:
    """The record of one job (``None`` outside a sweep of rtl's own: jobs launched by other means)."""

    def __init__(self, path: Path, job: int, run_dir: str, overrides: list[str]):
        self.path = path
        self.data: dict[str, Any] = {"job": job, "run_dir": run_dir, "overrides": overrides, "status": "running",
                                     "pid": os.getpid(), "host": socket.gethostname(), "started": _now()}

    @classmethod
    def open(cls, sweep_dir: str, job: int, run_dir: str, overrides: list[str]) -> Optional["JobRecord"]:
        sweep_id = os.environ.get(ENV_ID)
        if not sweep_id:
            return None
        folder = Path(sweep_dir).absolute() / rf.SWEEP_RECORDS / sweep_id
        record = cls(folder / f"{job}.json", job, run_dir, overrides)
        record.write()
        return record

    @property
    def sweep_interrupted(self) -> bool:
        return (self.path.parent / INTERRUPTED_MARK).exists()

    def write(self) -> None:
        atomic_io.write_json(self.data, self.path)

    def end(self, status: str, reason: str = "", value: Any = None) -> None:
        assert status in STATUSES, status
        self.data.update(status=status, reason=reason, ended=_now(),
                         value=None if value is None else float(value))
        self.write()


def in_worker() -> bool:
    """Whether this job runs in a process the sweep's command started (joblib's workers, submitit on this
    machine), rather than in the command itself (the basic launcher) or on a cluster node."""
    parent = os.environ.get(ENV_PARENT)
    return bool(parent) and str(os.getppid()) == parent and str(os.getpid()) != parent


def parent_gone() -> bool:
    """Whether the command that started this worker has died (its workers are then the init process's)."""
    parent = os.environ.get(ENV_PARENT)
    return bool(parent) and str(os.getppid()) != parent


def leave_orphaned() -> None:
    """End a worker whose command died, once its job has saved and recorded its outcome: the launcher's pipes lead
    nowhere, and a worker left waiting on them would keep its memory (and a GPU's) for ever."""
    import logging

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.flush()
    os._exit(0)


# One watcher per worker process, for the process's life: what it does depends on whether a job is running.
_WATCH: dict[str, Any] = {"thread": None, "job": False, "on_stop": None, "mark": None, "asked": False}


def watch_parent(on_stop, mark: Optional[Path], every: float = 0.5) -> None:
    """While this worker's job runs, call ``on_stop(reason)`` once if the command that started the worker dies
    (kill -9 of the sweep) or marks the sweep interrupted (Ctrl-C): the job then saves and stops at its next step,
    as on a signal, instead of training on unseen and holding its run's lock. Between jobs, a worker whose
    command died ends (``leave_orphaned``). ``job_done`` says the job is over."""
    _WATCH.update(job=True, on_stop=on_stop, mark=mark, asked=False)
    if _WATCH["thread"] is not None and _WATCH["thread"].is_alive():
        return

    def watch() -> None:
        while True:
            gone = parent_gone()
            if gone and not _WATCH["job"]:
                leave_orphaned()
            if _WATCH["job"] and not _WATCH["asked"]:
                mark_now = _WATCH["mark"]
                reason = ("the death of the command that started the sweep" if gone else
                          "the sweep's interruption (Ctrl-C)" if mark_now is not None and mark_now.exists() else None)
                if reason is not None:
                    _WATCH["asked"] = True
                    _WATCH["on_stop"](reason)
            time.sleep(every)

    _WATCH["thread"] = threading.Thread(target=watch, name="rtl-parent-watch", daemon=True)
    _WATCH["thread"].start()


def job_done() -> None:
    _WATCH["job"] = False
