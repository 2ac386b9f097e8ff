"""Experiment tracking beside the run's own files: ``runtime.logger=none|tensorboard|mlflow`` (outside the run
identity).

TensorBoard (torch's ``SummaryWriter`` into ``<run>/tensorboard/``): every epoch (step = epoch) the train loss and
learning rate and every validation metric of ``metrics.csv`` (macro and per label: ``val/auprc``,
``val/auroc_<label>``, ...); once, as text, the setting id, the run folder and the resolved config; at the end the
test metrics of ``results.csv`` (``test/...``) and the config with them as hyper-parameters.

Each epoch appears exactly once, whatever killed the run and however often it resumed: ``last.pt``'s history is
the truth (``metrics.csv`` is written from it), so every (re)start opens the writer with ``purge_step=1``, which
tells TensorBoard to drop what earlier event files logged, and logs the whole history again before going on.

MLflow (``MLflowTracker``): one tracked run per run folder, in the experiment of its sweep (the sweep folder's
absolute path, or ``runtime.mlflow_experiment``), tagged with the setting id, seed and run folder. The store is
``runtime.mlflow_uri`` (a team's tracking server), by default a sqlite file at the top of the output: the sweep
folder in a sweep, the run folder for a single run. MLflow keeps every value logged, so an epoch must be logged
once: the tracked run's id is kept in ``last.pt`` (``tracking``), an epoch is logged only after ``last.pt`` holds
it, and every (re)start asks the store which (metric, epoch) pairs it has and logs only the others. A tracked
run left by a start killed before its first ``last.pt``, or replaced by ``runtime.force=true``, is deleted when
its folder's new one is made, so a search finds one run per folder. The test metrics are logged before
``results.csv`` is written: a failure to log leaves the run unfinished, and the same command logs them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError
from .identity import flatten

log = logging.getLogger(__name__)

LOGGERS = ("none", "tensorboard", "mlflow")
FOLDER = "tensorboard"
MLFLOW_DB = "mlflow.db"  # the default store, at the top of the output
# metrics.csv columns that are bookkeeping, not metrics
NOT_METRICS = ("epoch", "seconds", "images_seen")


class Tracker:
    """No tracking (runtime.logger=none)."""

    def begin(self, history: list[dict], ids: dict | None = None) -> None:
        """Before training: ``history`` is ``last.pt``'s, ``ids`` its ``tracking`` dict, which a tracker may fill
        with what it needs to find its run again (saved with ``last.pt``)."""

    def epoch(self, row: dict) -> None: ...

    def finish(self, row: dict) -> None: ...

    def paused(self) -> None: ...

    def close(self) -> None: ...


def _tag(key: str) -> str:
    """metrics.csv's column as a TensorBoard tag: the split (or train) as its folder."""
    head, _, rest = key.partition("_")
    if key == "lr":
        return "train/lr"
    return f"{head}/{rest}" if rest else key


class TensorBoard(Tracker):
    def __init__(self, cfg: DictConfig, run_dir: Path, setting: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("runtime.logger=tensorboard needs the tensorboard package: pip install "
                            "'rethink-tl[tensorboard]' (or runtime.logger=none)") from None
        self.SummaryWriter, self.cfg, self.folder, self.setting = SummaryWriter, cfg, run_dir / FOLDER, setting
        self.run_dir = run_dir
        self.writer = None

    def begin(self, history: list[dict], ids: dict | None = None) -> None:
        self.writer = self.SummaryWriter(str(self.folder), purge_step=1)
        config = OmegaConf.to_yaml(self.cfg, resolve=True)
        self.writer.add_text("run", f"setting id {self.setting}; run folder {self.run_dir}", 0)
        self.writer.add_text("config", "```\n" + config + "\n```", 0)
        for row in history:
            self.epoch(row, flush=False)
        self.writer.flush()

    def epoch(self, row: dict, flush: bool = True) -> None:
        step = int(row["epoch"])
        for key, value in row.items():
            if key in NOT_METRICS or not _number(value):
                continue
            self.writer.add_scalar(_tag(key), float(value), step)
        if flush:
            self.writer.flush()

    def finish(self, row: dict) -> None:
        test = {f"test/{k[len('test_'):]}": float(v) for k, v in row.items() if k.startswith("test_") and _number(v)}
        step = int(row.get("epochs_run") or 0)
        for tag, value in test.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.add_hparams(_flat_config(self.cfg), {k.replace("/", "_"): v for k, v in test.items()}, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _flat_config(cfg: DictConfig) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str))
            for k, v in flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)).items()}


# --- MLflow --------------------------------------------------------------------------------------------

def _sweep_root(run_dir: Path) -> tuple[Path, bool]:
    """The top of the output this run belongs to: its sweep folder (True) in a sweep, else the run folder."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).resolve(), True
    except (ImportError, ValueError):  # not inside a Hydra job (train.run called directly)
        pass
    return run_dir.resolve(), False


class MLflowTracker(Tracker):
    def __init__(self, cfg: DictConfig, run_dir: Path, setting: str):
        try:
            with warnings.catch_warnings():  # pydantic's deprecation notes about MLflow's own models
                warnings.simplefilter("ignore", DeprecationWarning)
                from mlflow.entities import Metric, Param, RunTag
                from mlflow.exceptions import MlflowException
                from mlflow.tracking import MlflowClient
        except ImportError:
            raise UserError("runtime.logger=mlflow needs the mlflow package: pip install 'rethink-tl[mlflow]' "
                            "(or runtime.logger=none)") from None
        self.Metric, self.Param, self.RunTag, self.MlflowException = Metric, Param, RunTag, MlflowException
        self.cfg, self.setting, self.run_dir = cfg, setting, run_dir.resolve()
        root, self.in_sweep = _sweep_root(run_dir)
        self.root = root
        uri = OmegaConf.select(cfg, "runtime.mlflow_uri", default=None)
        if not uri and any(c in str(root) for c in "?#"):
            raise UserError(f"runtime.logger=mlflow: the folder {root} has a '?' or '#' in its path, which a sqlite "
                            "URI cannot hold: set runtime.mlflow_uri=sqlite:////OTHER/PATH/mlflow.db (or a server)")
        if uri and (str(uri).rstrip("/") == "sqlite:" or str(uri).endswith(":memory:")):
            raise UserError(f"runtime.mlflow_uri={uri} is an in-memory store, gone when the run ends: name a file "
                            "(sqlite:////PATH/mlflow.db) or a server, or leave it out for the sweep folder's mlflow.db")
        self.uri = str(uri) if uri else f"sqlite:///{root / MLFLOW_DB}"
        # The default store keeps artifacts (none are logged today) beside it, not in the current directory.
        self.artifacts = None if uri else (root / "mlartifacts").as_uri()
        self.experiment = str(OmegaConf.select(cfg, "runtime.mlflow_experiment", default=None) or root)
        # A sweep's jobs share one sqlite file: one writer at a time (sqlite itself refuses concurrent writers
        # with "database is locked" once its short timeout passes).
        self.lock = None
        if self.uri.startswith("sqlite:///"):
            from filelock import FileLock

            db = Path(self.uri[len("sqlite:///"):].split("?")[0])  # (a query holds options, not the path)
            if not db.parent.is_dir():
                raise UserError(f"runtime.mlflow_uri={self.uri}: the folder {db.parent} does not exist: create it, "
                                "or point runtime.mlflow_uri elsewhere")
            self.lock = FileLock(str(db) + ".lock")
        # A server that does not answer fails the run in seconds, not after MLflow's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.run_id: str | None = None
        # MlflowClient opens the store at once: a new sqlite file gets its tables there (under the lock, or a sweep's
        # jobs race to create them), a bad URI or a damaged file fails there.
        self.client = self._call("open the store", MlflowClient, self.uri)
        self.experiment_id = self._call("open the experiment", self._experiment_id)

    def _call(self, what: str, fn, *args):
        """``fn(*args)`` under the store's lock; a store that fails is one UserError (the run is saved)."""
        try:
            with self.lock if self.lock is not None else contextlib.nullcontext(), _logging_kept():
                return fn(*args)
        except self.MlflowException as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
        except Exception as err:  # noqa: BLE001  (connection errors, sqlite errors: many kinds)
            message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if len(message) > 200:  # urllib3's retry errors run to hundreds of characters
            message = message[:200] + "..."
        raise UserError(f"runtime.logger=mlflow could not {what} at {self.uri} ({message}): the run's own files are "
                        "saved; fix the tracking store (runtime.mlflow_uri) and run the same command again, or use "
                        "runtime.logger=none")

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return self.client.create_experiment(self.experiment, artifact_location=self.artifacts)
            except self.MlflowException:  # made by another job of the sweep in between (a remote store)
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise self.MlflowException(f"the experiment {self.experiment!r} is deleted in this store: restore it "
                                       "(mlflow experiments restore) or set runtime.mlflow_experiment")
        return found.experiment_id

    def begin(self, history: list[dict], ids: dict | None = None) -> None:
        ids = {} if ids is None else ids
        self.run_id = self._call("find or start the tracked run", self._open_run, ids.get("mlflow_run_id"))
        ids["mlflow_run_id"] = self.run_id
        self._call("log the earlier epochs", self._catch_up, history)

    def _open_run(self, stored: str | None) -> str:
        if stored:
            try:
                run = self.client.get_run(stored)
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    if run.info.status != "RUNNING":
                        self.client.update_run(stored, status="RUNNING")
                    return stored
                where = (f"is in another experiment (id {run.info.experiment_id}) than {self.experiment!r}"
                         if run.info.lifecycle_stage == "active" else "was deleted")
            except self.MlflowException:
                where = "is not in this store"
            # runtime.mlflow_experiment or runtime.mlflow_uri changed since the run started, or the tracked run was
            # deleted: a new tracked run, with every epoch again; the old one stays where it is.
            log.warning("%s: the tracked run %s that last.pt names %s (%s): starting a new tracked run with every "
                        "epoch so far; the old one is left as it is", self.run_dir, stored, where, self.uri)
        tags = {"rtl.setting_id": self.setting, "rtl.run_dir": str(self.run_dir),
                "rtl.seed": str(OmegaConf.select(self.cfg, "train.seed", default="")),
                "rtl.model": str(OmegaConf.select(self.cfg, "model.name", default="")),
                "rtl.init": _init_tag(self.cfg),
                "rtl.data": str(OmegaConf.select(self.cfg, "data.name", default=""))}
        # One tracked run per folder: earlier ones there (a start killed before its first last.pt, a run that
        # runtime.force=true replaced) are deleted, so a search gives what the folder holds.
        for old in self._runs_of_this_folder():
            self.client.delete_run(old.info.run_id)
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=self._run_name())
        params = [self.Param(k, str(v)) for k, v in _flat_config(self.cfg).items() if not k.startswith("hydra.")]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        return run.info.run_id

    def _runs_of_this_folder(self) -> list:
        folder = str(self.run_dir)
        # MLflow's filter strings have no escape for a quote: a folder with one is looked for among all runs.
        where = "" if "'" in folder else f"tags.`rtl.run_dir` = '{folder}'"
        found, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1000,
                                           page_token=token)
            found += [r for r in page if r.data.tags.get("rtl.run_dir") == folder]
            token = page.token
            if not token:
                return found

    def _run_name(self) -> str:
        try:
            return str(self.run_dir.relative_to(self.root)) if self.in_sweep else self.run_dir.name
        except ValueError:
            return self.run_dir.name

    def _metrics(self, row: dict, step: int) -> list:
        now = int(time.time() * 1000)
        return [self.Metric(key, float(value), now, step) for key, value in row.items()
                if key not in NOT_METRICS and _number(value)]

    def _catch_up(self, history: list[dict]) -> None:
        """Log every (metric, epoch) of ``history`` the store does not have yet."""
        if not history:
            return
        keys = {m.key for row in history for m in self._metrics(row, 0)}
        have = {key: {m.step for m in self.client.get_metric_history(self.run_id, key)} for key in keys}
        missing = [m for row in history for m in self._metrics(row, int(row["epoch"]))
                   if m.step not in have.get(m.key, ())]
        for i in range(0, len(missing), 1000):  # and at most 1,000 metrics
            self.client.log_batch(self.run_id, metrics=missing[i:i + 1000])

    def epoch(self, row: dict) -> None:
        self._call(f"log epoch {row['epoch']}", lambda: self.client.log_batch(
            self.run_id, metrics=self._metrics(row, int(row["epoch"]))))

    def finish(self, row: dict) -> None:
        def log() -> None:
            step = int(row.get("epochs_run") or 0)
            test = {k: v for k, v in row.items() if k.startswith("test_") and _number(v)}
            have = {k for k in test if self.client.get_metric_history(self.run_id, k)}
            now = int(time.time() * 1000)
            metrics = [self.Metric(k, float(v), now, step) for k, v in test.items() if k not in have]
            tags = [self.RunTag("rtl.state", "finished")]
            for i in range(0, max(len(metrics), 1), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], tags=tags)
            self.client.set_terminated(self.run_id, "FINISHED")

        self._call("log the test metrics", log)

    def paused(self) -> None:
        self._call("mark the run paused", lambda: self.client.set_tag(self.run_id, "rtl.state", "paused"))


def _init_tag(cfg: DictConfig) -> str:
    from .config import init_tag

    return init_tag(OmegaConf.select(cfg, "init.name", default=""), OmegaConf.select(cfg, "init.source", default=None))


@contextlib.contextmanager
def _logging_kept():
    """The process's logging as it was after ``with``: MLflow's database migrations (alembic) run
    ``logging.config.fileConfig``, which closes the root handlers (the console, the run's cli.log), installs its
    own and disables every existing logger: rtl would log nothing more. It is skipped while the store is opened,
    and whatever else changed the root logger is undone."""
    import logging.config

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    known = {name: lg.disabled for name, lg in logging.Logger.manager.loggerDict.items()
             if isinstance(lg, logging.Logger)}
    file_config = logging.config.fileConfig
    logging.config.fileConfig = lambda *args, **kwargs: None  # alembic's env.py: its INFO lines, its handlers
    was_disabled = logging.root.manager.disable
    logging.disable(max(was_disabled, logging.INFO))  # each migration script's "Migration complete!"
    try:
        yield
    finally:
        logging.config.fileConfig = file_config
        logging.disable(was_disabled)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)  # a closed FileHandler opens its file again at the next record (mode "a")
        root.setLevel(level)
        for name, lg in logging.Logger.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                lg.disabled = known.get(name, False)
        for name in ("alembic", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)


def tracker(cfg: DictConfig, run_dir: Path, setting: str) -> Tracker:
    """The tracker ``runtime.logger`` asks for (UserError for a missing package or a store that cannot be
    reached, before anything is trained)."""
    name = str(OmegaConf.select(cfg, "runtime.logger", default="none"))
    if name not in LOGGERS:
        raise UserError(f"runtime.logger={name}: choose one of {', '.join(LOGGERS)}")
    mlflow_keys = [k for k in ("mlflow_uri", "mlflow_experiment") if OmegaConf.select(cfg, f"runtime.{k}", default=None)]
    if mlflow_keys and name != "mlflow":
        raise UserError(f"runtime.{mlflow_keys[0]} is set but runtime.logger={name}: nothing would be sent to MLflow; "
                        f"add runtime.logger=mlflow, or drop runtime.{mlflow_keys[0]}")
    if name == "tensorboard":
        return TensorBoard(cfg, run_dir, setting)
    return MLflowTracker(cfg, run_dir, setting) if name == "mlflow" else Tracker()

