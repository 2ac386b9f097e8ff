"""One training run: ``rtl train model=dens_t1 init=pretrained`` ends up in ``run(cfg, out_dir)``.

Protocol (SPEC section 4, defaults = the paper): Adam, BCE-with-logits, learning rate halved
when validation macro AUPRC plateaus, the epoch with the best validation AUPRC is the model,
and only that checkpoint is scored on the test split.

``run`` reads top to bottom: check the config, claim the run directory (lock; skip, resume or
refuse by the stored settings), set up model, weights and data, check the labels, ``fit``, score the
best checkpoint, write the results row. Everything a resumed run needs lives in ``TrainState``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from . import __version__, atomic_io, runfiles as rf
from .config import init_tag, validate
from .data import DataBundle, build_data, check_label_names, check_learnable, dataset_labels
from .engine import (Batcher, EpochProgress, Precision, configure_device, device_name, make_batchers, make_optimizer,
                     masked_bce, maybe_compile, move_to_device, predict_probs, resolve_precision, restore_rng,
                     rng_state, score_split, seed_everything, train_one_epoch)
from .errors import NotYourRun, UserError
from .evidence.predictions import SplitPredictions, write as write_predictions
from .evidence.results import BrokenRun, RunFacts, read_run, results_row
from .identity import identity, setting_id
from .metrics import score
from .models import build_model, check_image_size, check_model_keys
from .preempt import GracefulStop, stop_here
from .rundir import TRAIN, RunDir, check_resumable, resume_hint
from .tracking import Tracker, tracker
from .weights import apply_init, installed, weights_home, weights_slot

log = logging.getLogger(__name__)

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- set-up -----------------------------------------------------------------------------------------

@dataclass
class TrainSetup:
    """Everything built before the first step."""

    device: torch.device
    model: torch.nn.Module
    step_model: torch.nn.Module  # model, or its torch.compile wrapper (same parameters)
    init: Any  # weights.InitReport
    data: DataBundle
    labels: list[str]
    precision: Precision
    train_batcher: Batcher
    eval_batcher: Batcher
    loss_fn: Any
    fingerprint: str
    n_params: int


def check_labels(data: DataBundle) -> None:
    """Every label needs positives and negatives in train, val and test (data.base.check_learnable)."""
    for name in ("train", "val", "test"):
        split = data.splits()[name]
        check_learnable(data.label_names, split.labels.numpy(), split.mask.numpy(), name, data.name)


def setup(cfg: DictConfig) -> TrainSetup:
    """Device, model, weights and data, cheapest checks first: nothing here writes a file."""
    rc, tc = cfg.runtime, cfg.train
    device = configure_device(rc)
    seed_everything(int(tc.seed))
    labels = dataset_labels(cfg.data)
    check_label_names(labels)
    model = build_model(cfg.model, num_labels=len(labels), image_size=int(cfg.data.image_size), init=cfg.init)
    check_image_size(model, int(cfg.data.image_size))
    init = apply_init(model, cfg.init, slot=weights_slot(cfg.model))  # logs what was loaded and what is new
    data = build_data(cfg.data, train_seed=int(tc.seed))
    if data.label_names != labels:
        raise RuntimeError(f"dataset gave labels {data.label_names}, its config promised {labels}")
    check_labels(data)
    fingerprint = data.whole_fingerprint or data.fingerprint()
    log.info("data %s, fingerprint %s", data.describe(), fingerprint)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(device=device, memory_format=torch.channels_last if rc.channels_last else torch.contiguous_format)
    train_batcher, eval_batcher = make_batchers(model.info, tc, rc, device)
    precision = resolve_precision(str(rc.amp), device)
    move_to_device(data, device, float(rc.data_on_device))
    step_model = maybe_compile(model, rc)
    log.info("device %s, precision %s, channels_last %s, compile %s", device, precision.name, rc.channels_last,
             rc.compile)
    pos_weight = None
    if tc.pos_weight == "balanced":
        pos = torch.as_tensor(data.train.positives(), dtype=torch.float32)
        counted = data.train.mask.sum(0).float()
        pos_weight = ((counted - pos) / pos.clamp_min(1)).to(device)
    return TrainSetup(device, model, step_model, init, data, labels, precision, train_batcher, eval_batcher,
                      masked_bce(pos_weight), fingerprint, n_params)


# --- the state that is saved and restored -----------------------------------------------------------

@dataclass
class TrainState:
    """Everything ``last.pt`` holds: restoring it continues the run exactly where it stopped."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    device: torch.device
    fingerprint: str
    weights: str  # where the initial weights came from (InitReport.source)
    weights_sha256: str = ""
    best: float = -math.inf
    best_epoch: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    progress: EpochProgress = field(default_factory=lambda: EpochProgress(epoch=1))
    started: str = field(default_factory=_now)
    tracking: dict[str, Any] = field(default_factory=dict)  # what runtime.logger needs to find its run again

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else {},
                "precision": self.precision.name, "data_fingerprint": self.fingerprint, "weights": self.weights,
                "weights_sha256": self.weights_sha256,
                "best": self.best, "best_epoch": self.best_epoch, "train_seconds": self.train_seconds,
                "history": self.history, "progress": self.progress.state_dict(), "started": self.started,
                "tracking": self.tracking, "rng": rng_state(self.device)}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        check_resumable(state, self.fingerprint, self.precision.name, source)
        if state["weights"] != self.weights:
            raise UserError(f"{source} started from the weights {state['weights']}, this machine finds "
                            f"{self.weights}: make the same file available (init.weights=PATH), or start over with "
                            "runtime.force=true")
        stored_sha = state.get("weights_sha256", "")
        if stored_sha and self.weights_sha256 and stored_sha != self.weights_sha256:
            raise UserError(f"{source} started from {self.weights} with sha256 {stored_sha[:12]}, but that file "
                            f"now has sha256 {self.weights_sha256[:12]} (replaced since): restore the old file, or "
                            "start over with runtime.force=true")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], self.device)
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.train_seconds, self.history, self.started = state["train_seconds"], state["history"], state["started"]
        self.progress = EpochProgress(**state["progress"])
        self.tracking = dict(state.get("tracking") or {})


# --- fit --------------------------------------------------------------------------------------------

def _should_stop(tc, state: TrainState) -> bool:
    """The optional early stops (both off by default)."""
    if not state.history:
        return False
    stale = state.history[-1]["epoch"] - state.best_epoch  # epochs since the best validation AUPRC
    if tc.early_stop and stale >= tc.early_stop:
        log.info("no better validation AUPRC for %d epochs: stopping early", stale)
        return True
    if tc.min_lr and state.optimizer.param_groups[0]["lr"] < tc.min_lr:
        log.info("learning rate fell below train.min_lr=%g: stopping", tc.min_lr)
        return True
    return False


def fit(cfg: DictConfig, s: TrainSetup, state: TrainState, run_dir: RunDir, track: Tracker) -> bool:
    """Train until train.epochs (or an optional early stop), saving last.pt every epoch and best.pt at
    every better validation AUPRC. A signal ends the current step, saves, then stops (or hands on).
    Returns True when the run paused at ``runtime.stop_after`` before its last epoch (nothing is scored then)."""
    tc, rc = cfg.train, cfg.runtime
    paused = False
    last_path, best_path = run_dir.file(rf.LAST), run_dir.file(rf.BEST)

    def save_last() -> None:
        run_dir.claim(cfg)
        atomic_io.save(state.state_dict(), last_path)

    again = resume_hint(rc.force)
    bar = tqdm(total=tc.epochs, initial=state.progress.epoch - 1, desc=f"{s.model.info.name}/{s.init.strategy}",
               disable=not rc.progress)
    # last.pt's history again: each epoch once, however often the run resumed (state.tracking: the tracked run)
    track.begin(state.history, state.tracking)
    with GracefulStop() as stop:
        while state.progress.epoch <= tc.epochs and not _should_stop(tc, state):
            epoch = state.progress.epoch
            if rc.stop_after and epoch > rc.stop_after and state.progress.step == 0:
                paused = True
                break
            t0 = time.perf_counter()
            lr = state.optimizer.param_groups[0]["lr"]
            done = train_one_epoch(s.step_model, s.data.train, s.train_batcher, state.optimizer, s.loss_fn,
                                   tc.batch_size, tc.seed, state.progress, stop, rc.progress, s.precision)
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
            state.train_seconds += time.perf_counter() - t0
            if not done:
                save_last()
                stop_here(stop, f"stopped by {stop.name()} at epoch {epoch}, step {state.progress.step}; state saved "
                          f"to {last_path}: {again}", log)
                continue
            val = score_split(s.step_model, s.data.val, s.eval_batcher, rc.eval_batch_size, s.labels, "val",
                              s.precision)
            val_auprc = val.macro["auprc"]
            if not math.isnan(val_auprc):
                state.scheduler.step(val_auprc)
            improved = not math.isnan(val_auprc) and val_auprc > state.best
            if improved:
                state.best, state.best_epoch = val_auprc, epoch
                run_dir.claim(cfg)
                atomic_io.save({"model": s.model.state_dict(), "epoch": epoch, "val_auprc": val_auprc}, best_path)
            state.history.append({"epoch": epoch, "lr": lr,
                                  "train_loss": state.progress.loss_sum / max(state.progress.seen, 1),
                                  **val.flat("val"), "seconds": round(time.perf_counter() - t0, 3),
                                  "images_seen": state.progress.seen})
            state.progress = EpochProgress(epoch=epoch + 1)
            # last.pt first: metrics.csv is rewritten from its history, so the two never disagree for long.
            save_last()
            atomic_io.write_csv(pd.DataFrame(state.history), run_dir.file(rf.METRICS))
            track.epoch(state.history[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{state.history[-1]['train_loss']:.4f}", val_auprc=f"{val_auprc:.4f}",
                            best=state.best_epoch)
            log.info("epoch %d lr %.2e loss %.4f val AUROC %.4f AUPRC %.4f%s", epoch, lr,
                     state.history[-1]["train_loss"], val.macro["auroc"], val_auprc, " *" if improved else "")
            if stop.requested:  # arrived during evaluation: the epoch is saved, nothing to redo
                stop_here(stop, f"stopped by {stop.name()} after epoch {epoch}; {again}", log)
    bar.close()
    return paused


# --- the results row --------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    import timm
    import torchvision

    return {"rethink_tl": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


def _git_commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def score_best(cfg: DictConfig, s: TrainSetup, state: TrainState, settings: dict[str, Any],
               run_dir: RunDir) -> dict[str, Any]:
    """Load best.pt, score it on val and test, write its per-image predictions and build the results row
    (every value is what the run used)."""
    best_path = run_dir.file(rf.BEST)
    if not best_path.exists():
        raise UserError("no epoch gave a defined validation AUPRC, so there is no model to test")
    best = atomic_io.load(best_path, fix="start the run over with runtime.force=true")
    s.model.load_state_dict(best["model"])
    kept, scores = {}, {}
    for name in ("val", "test"):
        split = getattr(s.data, name)
        probs = predict_probs(s.step_model, split, s.eval_batcher, cfg.runtime.eval_batch_size,
                              s.precision).astype("float32")
        labels, mask = split.labels.numpy(), split.mask.numpy()
        # Scored from the very float32 values the file keeps, so results.csv follows from predictions.csv.gz.
        scores[name] = score(labels, probs, s.labels, mask=mask, split=name)
        kept[name] = SplitPredictions(split.ids, split.patients, labels, mask, probs, split.groups)
    write_predictions(run_dir.file(rf.PREDICTIONS), kept, s.labels)
    images_seen = sum(r["images_seen"] for r in state.history)
    facts = RunFacts(
        dataset=s.data.name, model=str(cfg.model.tag), init=init_tag(cfg.init.name, cfg.init.source),
        strategy=s.init.strategy,
        fraction=float(cfg.data.fraction), seed=int(cfg.train.seed), setting_id=setting_id(settings),
        params=s.n_params, best_epoch=int(best["epoch"]), epochs_run=len(state.history), epochs=int(cfg.train.epochs),
        n_train=len(s.data.train), n_val=len(s.data.val), n_test=len(s.data.test), split_rule=s.data.split_rule,
        subset_seed=s.data.subset_seed, train_balance=s.data.balance("train"), val_balance=s.data.balance("val"),
        test_balance=s.data.balance("test"), image_size=int(s.data.train.images.shape[-1]),
        batch_size=int(cfg.train.batch_size), lr=float(cfg.train.lr), train_seconds=round(state.train_seconds, 3),
        images_per_s=round(images_seen / state.train_seconds, 2) if state.train_seconds > 0 else float("nan"),
        device=device_name(s.device), precision=s.precision.name, weights=s.init.source,
        weights_sha256=s.init.sha256, data_fingerprint=s.fingerprint, started=state.started, finished=_now(),
        git_commit=_git_commit(), **_versions())
    return results_row(facts, scores["val"], scores["test"])


# --- one run ----------------------------------------------------------------------------------------

def _same_installed_weights(cfg: DictConfig, row: dict[str, Any], path: Path) -> None:
    """A finished run is skipped only if init=pretrained would still start from its weights: installing,
    replacing or removing rtl pretrain weights for the model (or another RTL_WEIGHTS) since then changes what
    the same settings mean."""
    if str(cfg.init.name) != "pretrained" or cfg.init.weights or cfg.init.source:
        return  # (weights of another source than ImageNet are never rtl pretrain's)
    slot = weights_slot(cfg.model)
    now = installed(slot)
    used, used_sha = str(row.get("weights", "")), str(row.get("weights_sha256", "") or "")
    used_sha = "" if used_sha == "nan" else used_sha
    was_installed = Path(used).name == rf.WEIGHTS and Path(used).parent.name == slot
    again = "run it again with runtime.force=true, or give init.weights=PATH to the file it used"
    if now is not None:
        now_path, meta = now
        if used != str(now_path) or (used_sha and used_sha != meta["sha256"]):
            was = f"{used} (sha256 {used_sha[:12]})" if used_sha else used
            raise NotYourRun(f"{path} finished with the weights {was}, but init=pretrained now finds {now_path} "
                             f"(sha256 {meta['sha256'][:12]}), installed since: {again}")
    elif was_installed:
        raise NotYourRun(f"{path} finished with the installed weights {used}, but none are installed for {slot} in "
                         f"{weights_home()} now (RTL_WEIGHTS): reinstall them (rtl weights install RUN_DIR), or "
                         f"{again}")


def run(cfg: DictConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train one setting into ``out_dir`` and return its results row (also written to results.csv)."""
    validate(cfg)
    check_model_keys(cfg.model)
    settings = identity(cfg)
    run_dir = RunDir(Path(out_dir), settings, bool(cfg.runtime.force), TRAIN)
    run_dir.acquire()
    try:
        status = run_dir.status()
        if status == "finished":
            return _finished_row(cfg, run_dir)
        track = tracker(cfg, run_dir.path, setting_id(settings))
        s = setup(cfg)
        optimizer, scheduler = make_optimizer(s.model, cfg.train)
        state = TrainState(s.model, optimizer, scheduler, s.precision, s.device, s.fingerprint, s.init.source,
                           s.init.sha256)
        if status == "resume":
            last_path = run_dir.file(rf.LAST)
            state.load_state_dict(atomic_io.load(last_path, fix="delete it to start this run over from epoch 1, "
                                                 "or use runtime.force=true"), last_path)
            log.info("resuming from %s at epoch %d step %d (best val AUPRC %.4f at epoch %d)", last_path,
                     state.progress.epoch, state.progress.step, state.best, state.best_epoch)
        try:
            if fit(cfg, s, state, run_dir, track):
                track.paused()
                return _paused(cfg, state, run_dir)
            row = score_best(cfg, s, state, settings, run_dir)
            track.finish(row)  # before results.csv: a run whose tracking failed is not finished, and reruns
            atomic_io.write_csv(pd.DataFrame([row]), run_dir.file(rf.RESULTS))
        finally:
            track.close()
    finally:
        run_dir.release()
    log.info("test AUROC %.4f AUPRC %.4f (best val epoch %d) -> %s", row["test_auroc"], row["test_auprc"],
             row["best_epoch"], run_dir.file(rf.RESULTS))
    return row


def _paused(cfg: DictConfig, state: TrainState, run_dir: RunDir) -> dict[str, Any]:
    """A run paused at runtime.stop_after: its last.pt and metrics.csv (rewritten from last.pt's history, which a
    kill between the two writes can leave one epoch ahead) are all it has; nothing is scored on test."""
    run_dir.claim(cfg)
    atomic_io.write_csv(pd.DataFrame(state.history), run_dir.file(rf.METRICS))
    done = len(state.history)
    log.info("%s: paused after epoch %d of %d (runtime.stop_after=%d; best val AUPRC %.4f at epoch %d): run it "
             "again with a larger runtime.stop_after, or without it, to continue", run_dir.path, done,
             int(cfg.train.epochs), int(cfg.runtime.stop_after), state.best, state.best_epoch)
    return {"paused": True, "epochs_run": done, "val_auprc": state.best, "best_epoch": state.best_epoch}


def _finished_row(cfg: DictConfig, run_dir: RunDir) -> dict[str, Any]:
    """The results row of a run finished with these settings (skipped), if it still is what they mean."""
    try:
        row = read_run(run_dir.path).row
    except BrokenRun as err:
        raise NotYourRun(f"{err}; run it again from scratch with runtime.force=true") from err
    _same_installed_weights(cfg, row, run_dir.path)
    log.warning("%s: finished with the same settings, skipping (runtime.force=true runs it again)", run_dir.path)
    return row
