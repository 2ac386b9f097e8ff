"""``rtl pretrain``: supervised classification pretraining of a zoo model on an ImageFolder tree, the weights the
paper's TL arm of the shallow CBR nets starts from (the authors never published theirs).

    rtl pretrain model=cbr_small data.root=/data/imagenet
    torchrun --nproc_per_node=8 rtl pretrain model=cbr_small data.root=/data/imagenet recipe.batch_size=32

The recipe (conf/recipe/imagenet.yaml) is the classic one: SGD with momentum, lr 0.1 per 256 images, linear
warm-up then cosine, label smoothing, no weight decay on norms and biases. Data-parallel over processes that
torchrun or the SLURM launcher start (one per GPU, distributed.py): gradients averaged by
DistributedDataParallel, BatchNorm per process, only the first process writes. The step is the engine's
(``engine.train_step``, with ``recipe.accumulate`` forward passes per step). Like ``rtl train``: one folder per
setting (rundir.py), atomic ``last.pt`` every epoch and on a signal (``PretrainState``), exact resume, skipped
when finished. The result, ``weights.pth`` (the model's own keys) and ``weights.json`` (what it is, how good,
its sha256), is installed where ``init=pretrained`` looks (weights/store.py).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import __version__, atomic_io, runfiles as rf
from .config import validate
from .data.imagefolder import BadImage, EpochBatches, FolderImages, index_folder, loader, val_batches
from .distributed import Processes
from .engine import (Batcher, EpochProgress, Precision, configure_device, device_name, first_non_finite,
                     maybe_compile, resolve_precision, restore_rng, rng_state, seed_everything, train_step)
from .errors import NotYourRun, UserError
from .identity import identity, setting_id
from .models import build_model, check_image_size, check_model_keys
from .preempt import GracefulStop, stop_here
from .rundir import PRETRAIN, RunDir, check_resumable, resume_hint
from .weights import install, read_meta, sha256_file, weights_slot

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- model and optimiser -----------------------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """Weight decay on the weights of convolutions and linear layers only ("no bias decay", He et al. 2019):
    one-dimensional parameters are biases and normalisation scales."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def make_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Per step: linear warm-up (step k of W at lr x (k+1) / W), then cosine decay from lr towards 0 (torch's
    schedulers)."""
    sched = torch.optim.lr_scheduler
    cosine = sched.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1))
    if warmup_steps <= 1:
        return cosine
    warm = sched.LinearLR(optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1)
    return sched.SequentialLR(optimizer, [warm, cosine], milestones=[warmup_steps])


def make_optimizer(model: torch.nn.Module, rec, lr: float) -> torch.optim.SGD:
    """The recipe's SGD for a model trained at ``lr``."""
    return torch.optim.SGD(param_groups(model, float(rec.weight_decay), bool(rec.decay_norm_and_bias)), lr=lr,
                           momentum=float(rec.momentum), nesterov=bool(rec.nesterov))


def recipe_loss(rec) -> torch.nn.CrossEntropyLoss:
    return torch.nn.CrossEntropyLoss(label_smoothing=float(rec.label_smoothing))


# --- state -------------------------------------------------------------------------------------------

@dataclass
class PretrainState:
    """Everything ``last.pt`` holds: restoring it continues the pretraining exactly where it stopped."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    device: torch.device
    fingerprint: str
    procs: Processes
    history: list[dict[str, Any]] = field(default_factory=list)
    progress: EpochProgress = field(default_factory=EpochProgress)
    train_seconds: float = 0.0
    started: str = field(default_factory=_now)

    def state_dict(self) -> dict[str, Any]:
        """Collective: every process calls it. The random generators of every process are gathered and a cut
        epoch's partial sums added up; what the first process gets is what ``last.pt`` keeps."""
        rng = self.procs.gather(rng_state(self.device))
        loss_sum, seen = self.procs.sum([self.progress.loss_sum, float(self.progress.seen)], self.device)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else {},
                "precision": self.precision.name, "data_fingerprint": self.fingerprint, "history": self.history,
                "progress": {**self.progress.state_dict(), "loss_sum": loss_sum, "seen": int(seen)},
                "train_seconds": self.train_seconds, "started": self.started, "rng": rng,
                "processes": self.procs.world}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        check_resumable(state, self.fingerprint, self.precision.name, source)
        if state["progress"]["step"] and state["processes"] != self.procs.world:
            raise UserError(f"{source} was cut in the middle of an epoch by a run of {state['processes']} process(es); "
                            f"resume it with {state['processes']}, or delete last.pt to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        self.history, self.train_seconds, self.started = state["history"], state["train_seconds"], state["started"]
        self.progress = EpochProgress(**state["progress"])
        if len(state["rng"]) == self.procs.world:
            restore_rng(state["rng"][self.procs.rank], self.device)
        if self.procs.rank != 0:  # the checkpoint's partial sums of a cut epoch are those of all processes
            self.progress.loss_sum, self.progress.seen = 0.0, 0


# --- one pretraining ---------------------------------------------------------------------------------

@dataclass
class PretrainSetup:
    """Everything built before the first step."""

    procs: Processes
    device: torch.device
    precision: Precision
    model: torch.nn.Module  # the plain model: its state_dict is what gets saved
    step_model: torch.nn.Module  # DDP and/or compiled wrapper
    classes: list[str]
    fingerprint: str
    train_set: FolderImages
    val_set: FolderImages
    batches: EpochBatches
    batcher: Batcher
    workers: int
    global_batch: int
    lr: float


def settings_of(cfg: DictConfig, procs: Processes) -> dict[str, Any]:
    """The run's identity: model, data and recipe (identity.identity), and the number of batch replicas
    (processes x accumulate), which fixes the global batch and so the learning rate."""
    settings = identity(cfg)
    settings["recipe.replicas"] = procs.world * int(cfg.recipe.accumulate)
    return dict(sorted(settings.items()))


def setup(cfg: DictConfig, procs: Processes) -> PretrainSetup:
    dc, rc, rec = cfg.data, cfg.runtime, cfg.recipe
    index = index_folder(dc.root)
    seed_everything(int(rec.seed))  # the initial weights: the same in every process and every run
    model = build_model(cfg.model, num_labels=len(index.classes), image_size=int(dc.image_size))
    check_image_size(model, int(dc.image_size))
    rc_device = OmegaConf.merge(rc, {"device": procs.device_setting(str(rc.device))})
    device = configure_device(rc_device)
    precision = resolve_precision(str(rc.amp), device)
    seed_everything(int(rec.seed) + procs.rank)  # dropout differs per process; data order and crops do not
    model.to(device=device, memory_format=torch.channels_last if rc.channels_last else torch.contiguous_format)
    step_model: torch.nn.Module = model
    if procs.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = maybe_compile(step_model, rc)
    size = int(dc.image_size)
    train_set = FolderImages(index.train, size, train=True, seed=int(rec.seed), min_scale=float(dc.min_scale),
                             flip=bool(dc.flip))
    val_set = FolderImages(index.val, size, train=False, val_resize=int(dc.val_resize))
    bs, acc = int(rec.batch_size), int(rec.accumulate)
    batches = EpochBatches(train_set, bs, procs.rank, procs.world, acc, int(rec.seed))
    global_batch = bs * procs.world * acc
    if batches.steps_per_epoch() == 0:
        raise UserError(f"{index.root}/train has {len(index.train)} images, fewer than one global batch of "
                        f"{global_batch} (recipe.batch_size={bs} x {procs.world} process(es) x recipe.accumulate="
                        f"{acc}): lower recipe.batch_size")
    workers = rc.workers
    if workers is None:
        workers = min(16, max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", procs.world))))
    batcher = Batcher.for_model(model.info, device, rc.channels_last)
    lr = float(rec.lr_per_256) * global_batch / 256
    log.info("%s: %d classes, %d train / %d val images (fingerprint %s); %d process(es) x %d image(s) x %d "
             "pass(es) = global batch %d, lr %.4g; device %s, precision %s, %d loader workers", dc.root,
             len(index.classes), len(index.train), len(index.val), index.fingerprint(), procs.world, bs, acc,
             global_batch, lr, device_name(device), precision.name, workers)
    return PretrainSetup(procs, device, precision, model, step_model, index.classes, index.fingerprint(), train_set,
                         val_set, batches, batcher, int(workers), global_batch, lr)


def run(cfg: DictConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Pretrain one setting into ``out_dir``; returns weights.json's content."""
    validate(cfg)
    check_model_keys(cfg.model)
    procs = Processes.start(str(cfg.runtime.device))
    try:
        return _run(cfg, Path(out_dir), procs)
    finally:
        procs.end()


def _run(cfg: DictConfig, out: Path, procs: Processes) -> dict[str, Any]:
    run_dir = RunDir(out, settings_of(cfg, procs), bool(cfg.runtime.force), PRETRAIN)

    def claim_status() -> str:
        run_dir.acquire()  # only the first process holds the lock and writes
        return run_dir.status()

    try:
        status = procs.agree(claim_status)
        if status == "finished":
            meta = procs.agree(lambda: _read_meta(out))
            log.warning("%s: finished with the same settings (val top-1 %.4f), skipping (runtime.force=true runs it "
                        "again)", out, meta["val_top1"])
            if procs.main and cfg.runtime.install:
                install(out, meta)
                run_dir.file(rf.ERROR).unlink(missing_ok=True)  # an earlier failure to install is mended
            return meta
        s = setup(cfg, procs)
        state = new_state(cfg, s)
        if status == "resume":
            last = run_dir.file(rf.LAST)
            state.load_state_dict(atomic_io.load(last, fix="delete it to start over from epoch 1, or use "
                                                 "runtime.force=true"), last)
            log.info("resuming from %s at epoch %d step %d", last, state.progress.epoch, state.progress.step)
        fit(cfg, s, state, run_dir)
        meta = procs.agree(lambda: _finish(cfg, s, state, run_dir))
        if procs.main and cfg.runtime.install:
            install(out, meta)
        return meta
    finally:
        if procs.main:
            run_dir.release()


def _read_meta(out: Path) -> dict[str, Any]:
    """A finished run's weights.json, and its weights.pth checked against it."""
    meta_path, weights = out / rf.WEIGHTS_META, out / rf.WEIGHTS
    try:
        meta = read_meta(meta_path)
    except UserError as err:
        raise NotYourRun(f"{err}: run it again from scratch with runtime.force=true") from None
    if not weights.is_file() or sha256_file(weights) != meta["sha256"]:
        raise NotYourRun(f"{weights} is missing or does not match the sha256 in {meta_path}: run it again "
                         "from scratch with runtime.force=true")
    return meta


def new_state(cfg: DictConfig, s: PretrainSetup) -> PretrainState:
    rec, steps = cfg.recipe, s.batches.steps_per_epoch()
    optimizer = make_optimizer(s.model, rec, s.lr)
    scheduler = make_schedule(optimizer, int(rec.warmup_epochs) * steps, int(rec.epochs) * steps)
    return PretrainState(s.model, optimizer, scheduler, s.precision, s.device, s.fingerprint, s.procs)


def fit(cfg: DictConfig, s: PretrainSetup, state: PretrainState, run_dir: RunDir) -> None:
    """Train to recipe.epochs, saving last.pt after every epoch (and when a signal or a bad image stops it)."""
    rec, rc = cfg.recipe, cfg.runtime
    procs, last = s.procs, run_dir.file(rf.LAST)
    loss_fn = recipe_loss(rec)
    pin = s.device.type == "cuda"
    train_loader = loader(s.train_set, s.batches, s.workers, int(rc.prefetch), pin)
    val_loader = loader(s.val_set, val_batches(len(s.val_set), int(rc.eval_batch_size), procs.rank, procs.world),
                        s.workers, int(rc.prefetch), pin)

    def save_last() -> None:
        ckpt = state.state_dict()  # collective: every process takes part
        if procs.main:
            run_dir.claim(cfg)
            atomic_io.save(ckpt, last)

    again = resume_hint(rc.force)
    bar = tqdm(total=int(rec.epochs), initial=state.progress.epoch - 1, desc=f"pretrain {s.model.info.name}",
               disable=not (rc.progress and procs.main))
    with GracefulStop() as stop:
        while state.progress.epoch <= int(rec.epochs):
            epoch = state.progress.epoch
            if not _epoch(s, state, train_loader, val_loader, loss_fn, stop, save_last, rc.progress):
                stop_here(stop, f"stopped by {stop.name()} at epoch {epoch}, step {state.progress.step}; state saved "
                          f"to {last}: {again}", log)
                continue
            if procs.main:
                atomic_io.write_csv(pd.DataFrame(state.history), run_dir.file(rf.PRETRAIN_HISTORY))
            bar.update(1)
            row = state.history[-1]
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", top1=f"{row['val_top1']:.3f}")
            log.info("epoch %d lr %.3g loss %.4f val loss %.4f top-1 %.4f top-5 %.4f, %.0f img/s", epoch, row["lr"],
                     row["train_loss"], row["val_loss"], row["val_top1"], row["val_top5"], row["img_per_s"])
            if stop.requested:
                stop_here(stop, f"stopped by {stop.name()} after epoch {epoch}; {again}", log)
    bar.close()


def _epoch(s: PretrainSetup, state: PretrainState, train_loader, val_loader, loss_fn, stop, save_last,
           show_bar: bool) -> bool:
    """Train the rest of the current epoch and validate it; last.pt is saved at its end. False: a signal cut it
    short (saved too). A bad image raises after saving the steps before it (one process only: the others of a
    distributed run cannot join a save then)."""
    epoch, procs = state.progress.epoch, s.procs
    if state.progress.step == 0:
        state.progress.lr = state.optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    try:
        done = train_epoch(s, train_loader, state.optimizer, state.scheduler, loss_fn, state.progress, stop, show_bar)
    except BadImage:
        if procs.world == 1:
            save_last()  # the steps before the bad batch are kept: fix the file and run again to go on
        raise
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    seconds = time.perf_counter() - t0
    state.train_seconds += seconds
    if not done:
        save_last()
        return False
    loss_sum, seen = procs.sum([state.progress.loss_sum, float(state.progress.seen)], s.device)
    try:
        val = _validate(s, val_loader, loss_fn)
    except BadImage:
        if procs.world == 1:
            save_last()  # the epoch's training is kept: the rerun only validates it
        raise
    state.history.append({"epoch": epoch, "lr": state.progress.lr, "train_loss": loss_sum / max(seen, 1), **val,
                          "images": int(seen), "seconds": round(seconds, 3),
                          "img_per_s": round(seen / seconds, 1) if seconds > 0 else float("nan")})
    state.progress = EpochProgress(epoch=epoch + 1)
    save_last()
    return True


def train_epoch(s: PretrainSetup, train_loader, optimizer, scheduler, loss_fn, progress: EpochProgress, stop,
                show_bar: bool) -> bool:
    """Train from ``progress.step`` to the end of the epoch, or until a signal asks to stop (after a whole step).
    Each step is ``engine.train_step`` over ``recipe.accumulate`` batches. Returns whether the epoch is
    complete. ``progress`` only ever holds whole steps: a bad image raises with the sums of the steps before."""
    model, acc = s.step_model, s.batches.accumulate
    model.train()
    s.batches.set(progress.epoch, progress.step)
    steps = s.batches.steps_per_epoch()
    total = torch.tensor(progress.loss_sum, dtype=torch.float64, device=s.device)
    first_bad = torch.tensor(-1, device=s.device)
    bar = tqdm(total=steps, initial=progress.step, desc=f"epoch {progress.epoch}", leave=False,
               disable=not (show_bar and s.procs.main))
    passes: list[tuple[torch.Tensor, torch.Tensor]] = []
    for images, labels in train_loader:
        if stop.requested and not passes:
            break
        if labels.min() < 0:
            progress.loss_sum = float(total)
            raise s.train_set.bad_image_error(labels)
        passes.append((s.batcher(images), s.batcher.to_device(labels)))
        if len(passes) < acc:
            continue
        losses = train_step(model, passes, optimizer, loss_fn, s.precision)
        first_bad = first_non_finite(losses, progress.step + 1, first_bad)
        for loss, (_, y) in zip(losses, passes):
            total += loss.double() * len(y)
            progress.seen += len(y)
        passes = []
        scheduler.step()
        progress.step += 1
        bar.update(1)
    bar.close()
    bad = int(first_bad)
    if bad >= 0:
        raise UserError(f"the training loss became NaN or infinite at epoch {progress.epoch}, step {bad}: lower "
                        "recipe.lr_per_256; last.pt still holds the last complete epoch")
    progress.loss_sum = float(total)
    return progress.step >= steps


@torch.inference_mode()
def _validate(s: PretrainSetup, val_loader, loss_fn) -> dict[str, float]:
    """Top-1 / top-5 accuracy and loss over every validation image (each process scores its share)."""
    if s.procs.world > 1:  # the first process's BatchNorm statistics are the model's (and what gets saved)
        for buf in s.model.buffers():
            dist.broadcast(buf, src=0)
    model = s.model
    model.eval()
    k = min(5, len(s.classes))
    top1 = torch.zeros((), dtype=torch.float64, device=s.device)
    topk = torch.zeros_like(top1)
    loss = torch.zeros_like(top1)
    n = 0
    for images, labels in val_loader:
        if labels.min() < 0:
            raise s.val_set.bad_image_error(labels)
        with s.precision.autocast(s.device):
            logits = model(s.batcher(images)).float()
        y = s.batcher.to_device(labels)
        best = logits.topk(k, dim=1).indices
        top1 += (best[:, 0] == y).sum()
        topk += (best == y[:, None]).any(dim=1).sum()
        loss += loss_fn(logits, y).double() * len(labels)
        n += len(labels)
    c1, ck, lsum, count = s.procs.sum([float(top1), float(topk), float(loss), float(n)], s.device)
    # Top-5 of 5 classes or fewer is 1 by definition: recorded as missing, not as a perfect score.
    return {"val_loss": lsum / count, "val_top1": c1 / count,
            "val_top5": ck / count if len(s.classes) > 5 else float("nan")}


def _finish(cfg: DictConfig, s: PretrainSetup, state: PretrainState, run_dir: RunDir) -> dict[str, Any]:
    """weights.pth, then weights.json (its presence marks the run finished)."""
    out = run_dir.path
    run_dir.claim(cfg)
    atomic_io.save(s.model.state_dict(), out / rf.WEIGHTS)
    last = state.history[-1]
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    meta = {
        "slot": weights_slot(cfg.model), "model": model_cfg, "dataset": str(cfg.data.name),
        "data_root": str(Path(os.path.expanduser(str(cfg.data.root))).resolve()), "data_fingerprint": s.fingerprint,
        "num_classes": len(s.classes), "classes": s.classes, "image_size": int(cfg.data.image_size),
        "epochs": len(state.history), "val_top1": last["val_top1"], "val_top5": last["val_top5"],
        "val_loss": last["val_loss"],
        "recipe": OmegaConf.to_container(cfg.recipe, resolve=True), "processes": s.procs.world,
        "global_batch": s.global_batch, "lr": s.lr, "precision": s.precision.name,
        "device": device_name(s.device), "train_seconds": round(state.train_seconds, 1),
        "setting_id": setting_id(run_dir.settings), "run_dir": str(out.resolve()),
        "sha256": sha256_file(out / rf.WEIGHTS), "started": state.started, "finished": _now(),
        "rethink_tl": __version__, "torch": torch.__version__,
    }
    atomic_io.write_json(meta, out / rf.WEIGHTS_META)
    log.info("pretraining finished: val top-1 %.4f top-5 %.4f -> %s (sha256 %s)", meta["val_top1"], meta["val_top5"],
             out / rf.WEIGHTS, meta["sha256"][:12])
    return meta

