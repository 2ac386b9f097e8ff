"""A finished run, loaded back for use: its config, its labels and its best checkpoint in a model.

``rtl evaluate``, ``rtl predict``, ``rtl explain`` and ``rtl export`` start here. A folder that is not a finished
run (no results.csv, no best.pt, a damaged config) is refused with one message saying what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .. import atomic_io, runfiles as rf
from ..data import DataBundle, build_data
from ..engine import Batcher, predict_probs
from ..errors import UserError
from ..evidence.results import BrokenRun, label_names, read_run, run_dirs
from ..models import build_model


@dataclass
class FinishedRun:
    path: Path
    cfg: DictConfig  # the resolved config the run wrote (config.yaml)
    row: dict[str, Any]  # its results.csv row
    labels: list[str]  # the model's outputs, in order
    model: torch.nn.Module | None  # best.pt loaded, in eval mode, on the CPU (None: load_run(..., model=False))
    best_epoch: int

    @property
    def image_size(self) -> int:
        return int(self.cfg.data.image_size)

    @property
    def name(self) -> str:
        return f"{self.row['model']}/{self.row['init']}/f{float(self.row['fraction']):g}/s{int(self.row['seed'])}"


def load_run(path: str | Path, model: bool = True) -> FinishedRun:
    """The finished run in ``path`` with its best checkpoint loaded (``model=False``: checked to be there, not
    loaded); UserError when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory: pass the folder of a finished rtl train run (it holds "
                        "results.csv and best.pt)")
    try:
        run = read_run(path)
    except BrokenRun as err:
        raise UserError(str(err)) from None
    if run.row is None:
        state = f"failed ({run.error})" if run.error else "not finished (no results.csv)"
        if not (path / rf.IDENTITY).exists() and run.error is None:
            state = "not an rtl train run (no results.csv, no identity.json)"
        raise UserError(f"{path} is {state}: pass the folder of a finished rtl train run")
    best = path / rf.BEST
    if not best.is_file():
        raise UserError(f"{path} has no best.pt (the best checkpoint): it was removed; run the run again with "
                        "runtime.force=true to make it")
    config = path / rf.CONFIG
    if not config.is_file():
        raise UserError(f"{path} has no config.yaml: it cannot be rebuilt; run the run again with runtime.force=true")
    try:
        cfg = OmegaConf.load(config)
    except Exception as err:  # noqa: BLE001  (yaml and OmegaConf raise many kinds for a damaged file)
        raise UserError(f"{config} cannot be read ({type(err).__name__}): run the run again with "
                        "runtime.force=true") from None
    labels = label_names(run.row.keys())
    if not labels:
        raise UserError(f"{path / rf.RESULTS} names no label (no test_auroc_<label> column): made by an older rtl? "
                        "run it again with runtime.force=true")
    if not model:
        return FinishedRun(path, cfg, run.row, labels, None, int(run.row.get("best_epoch", 0)))
    # The init config too: chest X-ray weights (init.source) made a grey-input model.
    model = build_model(cfg.model, num_labels=len(labels), image_size=int(cfg.data.image_size), init=cfg.get("init"))
    state = atomic_io.load(best, fix="run the run again with runtime.force=true")
    try:
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"{best} does not fit the model of {config} ({type(err).__name__}): run the run again "
                        "with runtime.force=true") from None
    model.eval()
    return FinishedRun(path, cfg, run.row, labels, model, int(state.get("epoch", run.row.get("best_epoch", 0))))


def finished_below(root: str | Path) -> list[Path]:
    """Every finished run folder (results.csv and best.pt) at or below ``root``, sorted; the run itself when
    ``root`` is one. Results of ``rtl evaluate`` (external/<name>/) are not runs."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: pass a run folder or a sweep folder")
    return [p for p in run_dirs(root) if (p / rf.RESULTS).is_file() and (p / rf.BEST).is_file()]


def one_run(run_dir: str | Path, command: str) -> FinishedRun:
    """The finished run in ``run_dir`` for a ``command`` that uses one model; a sweep folder is refused with the
    runs it holds."""
    root = Path(run_dir)
    if root.is_dir() and not (root / rf.RESULTS).exists():
        below = finished_below(root)
        if below:
            shown = ", ".join(str(p) for p in below[:3]) + (", ..." if len(below) > 3 else "")
            raise UserError(f"{run_dir} is a sweep folder with {len(below)} finished run(s) ({shown}): {command} "
                            "uses one model, pass one run's folder")
    return load_run(root)


def rebuild_data(run: FinishedRun, purpose: str) -> DataBundle:
    """The run's data (its three splits, the training subset cut), rebuilt from its config; refused when it is not
    the data the run saw. ``purpose``: what other images would spoil, for the message."""
    expected = str(run.row.get("data_fingerprint") or "")
    if not expected or expected == "nan":
        raise UserError(f"{run.path / rf.RESULTS} records no data_fingerprint: the rebuilt images cannot be "
                        "checked against the run's; run it again with runtime.force=true")
    bundle = build_data(run.cfg.data, train_seed=int(run.cfg.train.seed))
    if bundle.whole_fingerprint != expected:
        raise UserError(f"the data of {run.path} changed since the run (fingerprint {expected}, rebuilt now "
                        f"{bundle.whole_fingerprint}: images, labels or file names differ): {purpose}; run it "
                        "again with runtime.force=true")
    return bundle


def eval_batcher(model: torch.nn.Module):
    """uint8 images -> the model's input, normalised as it was trained (engine.Batcher without augmentation)."""
    return Batcher.for_model(model.info, next(model.parameters()).device, channels_last=False)


def infer(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Sigmoid outputs (N, L) float32 for uint8 images (N, C, H, W), normalised as the model was trained."""
    from ..data import Split

    batcher = eval_batcher(model)
    n = len(images)
    split = Split(images, torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool), [str(i) for i in range(n)])
    return predict_probs(model, split, batcher, batch_size).astype(np.float32)
