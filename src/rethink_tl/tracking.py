"""Experiment tracking beside the run's own files: ``runtime.logger=none|tensorboard`` (outside the run identity).

TensorBoard (torch's ``SummaryWriter`` into ``<run>/tensorboard/``): every epoch (step = epoch) the train loss and
learning rate and every validation metric of ``metrics.csv`` (macro and per label: ``val/auprc``,
``val/auroc_<label>``, ...); once, as text, the setting id, the run folder and the resolved config; at the end the
test metrics of ``results.csv`` (``test/...``) and the config with them as hyper-parameters.

Each epoch appears exactly once, whatever killed the run and however often it resumed: ``last.pt``'s history is
the truth (``metrics.csv`` is written from it), so every (re)start opens the writer with ``purge_step=1``, which
tells TensorBoard to drop what earlier event files logged, and logs the whole history again before going on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError
from .identity import flatten

LOGGERS = ("none", "tensorboard")
FOLDER = "tensorboard"


class Tracker:
    """No tracking (runtime.logger=none)."""

    def begin(self, history: list[dict]) -> None: ...

    def epoch(self, row: dict) -> None: ...

    def finish(self, row: dict) -> None: ...

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

    def begin(self, history: list[dict]) -> None:
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
            if key in ("epoch", "seconds", "images_seen") or not _number(value):
                continue
            self.writer.add_scalar(_tag(key), float(value), step)
        if flush:
            self.writer.flush()

    def finish(self, row: dict) -> None:
        test = {f"test/{k[len('test_'):]}": float(v) for k, v in row.items() if k.startswith("test_") and _number(v)}
        step = int(row.get("epochs_run") or 0)
        for tag, value in test.items():
            self.writer.add_scalar(tag, value, step)
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str))
                for k, v in flatten(OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)).items()}
        self.writer.add_hparams(flat, {k.replace("/", "_"): v for k, v in test.items()}, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def tracker(cfg: DictConfig, run_dir: Path, setting: str) -> Tracker:
    """The tracker ``runtime.logger`` asks for (UserError for a missing package, before anything is trained)."""
    name = str(OmegaConf.select(cfg, "runtime.logger", default="none"))
    if name not in LOGGERS:
        raise UserError(f"runtime.logger={name}: choose one of {', '.join(LOGGERS)}")
    return TensorBoard(cfg, run_dir, setting) if name == "tensorboard" else Tracker()

