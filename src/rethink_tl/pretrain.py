"""``rtl pretrain``: supervised classification pretraining of a zoo model on an ImageFolder tree, the weights the
paper's TL arm of the shallow CBR nets starts from (the authors never published theirs).

    rtl pretrain model=cbr_small data.root=/data/imagenet
    torchrun --nproc_per_node=8 rtl pretrain model=cbr_small data.root=/data/imagenet recipe.batch_size=32

The recipe (conf/recipe/imagenet.yaml) is the classic one: SGD with momentum, lr 0.1 per 256 images, linear
warm-up then cosine, label smoothing, no weight decay on norms and biases. Data-parallel over processes that
torchrun or the SLURM launcher start (one per GPU): gradients averaged by DistributedDataParallel, BatchNorm
per process, only the first process writes. Like ``rtl train``: one folder per setting, atomic ``last.pt``
every epoch and on a signal, exact resume, skipped when finished. The result, ``weights.pth`` (the model's own
keys) and ``weights.json`` (what it is, how good, its sha256), is installed where ``init=pretrained`` looks
(weights.py: ``weights_home``).
"""

from __future__ import annotations

import contextlib
import io
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

from . import __version__, atomic_io
from .config import identity, setting_id, validate
from .data.imagefolder import BadImage, EpochBatches, FolderImages, index_folder, loader, val_batches
from .engine import (Batcher, Precision, configure_device, device_name, maybe_compile, resolve_precision, restore_rng,
                     rng_state, seed_everything)
from .errors import NotYourRun, UserError
from .models import build_model, check_image_size
from .preempt import GracefulStop, Interrupted
from .train import RunDir, check_resumable
from .weights import install, read_meta, sha256_file, weights_slot

log = logging.getLogger(__name__)

WEIGHTS, META, HISTORY = "weights.pth", "weights.json", "pretrain.csv"
RUN_FILES = (HISTORY, "last.pt", WEIGHTS, META, "identity.json", "config.yaml", "error.txt")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- processes ---------------------------------------------------------------------------------------

@dataclass
class Processes:
    """This process's place in a data-parallel run (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device_setting: str) -> "Processes":
        """Join the process group that torchrun (RANK, WORLD_SIZE ... in the environment) or a SLURM job with
        one task per GPU (through submitit) describes; alone otherwise. torchrun / submitit start the
        processes: nothing here starts one."""
        if not os.environ.get("WORLD_SIZE") and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
            try:
                import submitit

                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            except (ImportError, RuntimeError) as err:
                raise UserError(f"this SLURM job has {os.environ['SLURM_NTASKS']} tasks but their process group "
                                f"cannot be set up ({err}): launch with torchrun, or through the SLURM launcher "
                                "(hydra/launcher=slurm)") from err
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device_setting != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(rank, local, world)

    def device_setting(self, setting: str) -> str:
        # One GPU per process: torchrun's LOCAL_RANK says which.
        if self.world > 1 and setting in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return setting

    def agree(self, fn):
        """Run ``fn`` in the first process and hand its result, or its UserError, to every process: all go
        on, or all stop with the same message (instead of the others waiting for ever)."""
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except UserError as err:
                box[0] = ("error", type(err) is NotYourRun, str(err))
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise (NotYourRun if box[0][1] else UserError)(box[0][2])
        return box[0][1]

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` (tensors and plain containers) of every process, in rank order."""
        if self.world == 1:
            return [obj]
        buf = io.BytesIO()
        torch.save(obj, buf)  # tensors travel as torch's own serialisation, not as pickled storages
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, buf.getvalue())
        return [torch.load(io.BytesIO(b), weights_only=True) for b in out]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def end(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


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


@contextlib.contextmanager
def batchnorm_statistics_kept(model: torch.nn.Module, keep: bool):
    """A forward pass that leaves BatchNorm's running statistics as they were. Forward passes after the first of
    an accumulated step use it: a run with 2 forward passes per step then keeps the statistics of the first, as
    DistributedDataParallel keeps those of the first process (it broadcasts rank 0's buffers)."""
    if not keep:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, old in zip(norms, saved):
                for b, o in zip(m.buffers(), old):
                    b.copy_(o)


# --- state -------------------------------------------------------------------------------------------

@dataclass
class Progress:
    epoch: int = 1
    step: int = 0  # optimiser steps done in this epoch
    loss_sum: float = 0.0  # this process's
    seen: int = 0  # images, this process's
    lr: float = float("nan")  # at the epoch's first step (pretrain.csv), kept across a resume within the epoch


@dataclass
class PretrainState:
    history: list[dict[str, Any]] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    train_seconds: float = 0.0
    started: str = field(default_factory=_now)


def _checkpoint(model, optimizer, scheduler, precision: Precision, state: PretrainState, fingerprint: str,
                rng: list[Any], processes: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": precision.scaler.state_dict() if precision.scaler is not None else {},
            "precision": precision.name, "data_fingerprint": fingerprint, "history": state.history,
            "progress": dict(vars(state.progress)), "train_seconds": state.train_seconds, "started": state.started,
            "rng": rng, "processes": processes}


# --- one pretraining ---------------------------------------------------------------------------------

@dataclass
class Setup:
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
    """The run's identity: model, data and recipe (config.identity), and the number of batch replicas
    (processes x accumulate), which fixes the global batch and so the learning rate."""
    settings = identity(cfg)
    settings["recipe.replicas"] = procs.world * int(cfg.recipe.accumulate)
    return dict(sorted(settings.items()))


def setup(cfg: DictConfig, procs: Processes) -> Setup:
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
    info = model.info
    mean = torch.tensor(info.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, 3, 1, 1)
    batcher = Batcher(mean, std, device, bool(rc.channels_last))
    lr = float(rec.lr_per_256) * global_batch / 256
    log.info("%s: %d classes, %d train / %d val images (fingerprint %s); %d process(es) x %d image(s) x %d "
             "pass(es) = global batch %d, lr %.4g; device %s, precision %s, %d loader workers", dc.root,
             len(index.classes), len(index.train), len(index.val), index.fingerprint(), procs.world, bs, acc,
             global_batch, lr, device_name(device), precision.name, workers)
    return Setup(procs, device, precision, model, step_model, index.classes, index.fingerprint(), train_set,
                 val_set, batches, batcher, int(workers), global_batch, lr)


def run(cfg: DictConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Pretrain one setting into ``out_dir``; returns weights.json's content."""
    validate(cfg)
    procs = Processes.start(str(cfg.runtime.device))
    try:
        return _run(cfg, Path(out_dir), procs)
    finally:
        procs.end()


def _run(cfg: DictConfig, out: Path, procs: Processes) -> dict[str, Any]:
    settings = settings_of(cfg, procs)
    run_dir = RunDir(out, settings, bool(cfg.runtime.force), files=RUN_FILES, done=META,
                     foreign=("results.csv", "metrics.csv", "best.pt"))

    def claim_status() -> str:
        run_dir.__enter__()  # only the first process holds the lock and writes
        return run_dir.status()

    try:
        status = procs.agree(claim_status)
        if status == "finished":
            meta = procs.agree(lambda: _read_meta(out))
            log.warning("%s: finished with the same settings (val top-1 %.4f), skipping (runtime.force=true runs it "
                        "again)", out, meta["val_top1"])
            if procs.main and cfg.runtime.install:
                install(out, meta)
                (out / "error.txt").unlink(missing_ok=True)  # an earlier failure to install is mended
            return meta
        s = setup(cfg, procs)
        return _train(cfg, s, run_dir, status)
    finally:
        if procs.main and run_dir.lock.is_locked:
            run_dir.__exit__()


def _read_meta(out: Path) -> dict[str, Any]:
    """A finished run's weights.json, and its weights.pth checked against it."""
    try:
        meta = read_meta(out / META)
    except UserError as err:
        raise NotYourRun(f"{err}: run it again from scratch with runtime.force=true") from None
    if not (out / WEIGHTS).is_file() or sha256_file(out / WEIGHTS) != meta["sha256"]:
        raise NotYourRun(f"{out / WEIGHTS} is missing or does not match the sha256 in {out / META}: run it again "
                         "from scratch with runtime.force=true")
    return meta


def _train(cfg: DictConfig, s: Setup, run_dir: RunDir, status: str) -> dict[str, Any]:
    rec, rc, out = cfg.recipe, cfg.runtime, run_dir.path
    procs = s.procs
    steps = s.batches.steps_per_epoch()
    optimizer = torch.optim.SGD(param_groups(s.model, float(rec.weight_decay), bool(rec.decay_norm_and_bias)),
                                lr=s.lr, momentum=float(rec.momentum), nesterov=bool(rec.nesterov))
    scheduler = make_schedule(optimizer, int(rec.warmup_epochs) * steps, int(rec.epochs) * steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(rec.label_smoothing))
    state = PretrainState()
    last_path = out / "last.pt"
    if status == "resume":
        ckpt = atomic_io.load(last_path, fix="delete it to start over from epoch 1, or use runtime.force=true")
        _check_resumable(ckpt, s, last_path)
        s.model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if s.precision.scaler is not None and ckpt["scaler"]:
            s.precision.scaler.load_state_dict(ckpt["scaler"])
        state = PretrainState(ckpt["history"], Progress(**ckpt["progress"]), ckpt["train_seconds"], ckpt["started"])
        if len(ckpt["rng"]) == procs.world:
            restore_rng(ckpt["rng"][procs.rank], s.device)
        log.info("resuming from %s at epoch %d step %d", last_path, state.progress.epoch, state.progress.step)
        if procs.rank != 0:  # the checkpoint's partial sums of a cut epoch are those of all processes
            state.progress.loss_sum, state.progress.seen = 0.0, 0
    pin = s.device.type == "cuda"
    train_loader = loader(s.train_set, s.batches, s.workers, int(rc.prefetch), pin)
    val_loader = loader(s.val_set, val_batches(len(s.val_set), int(rc.eval_batch_size), procs.rank, procs.world),
                        s.workers, int(rc.prefetch), pin)

    def save_last() -> None:
        rng = procs.gather(rng_state(s.device))
        # A cut epoch's partial sums: those of every process, held by the first on resume.
        loss_sum, seen = procs.sum([state.progress.loss_sum, float(state.progress.seen)], s.device)
        if procs.main:
            run_dir.claim(cfg)
            ckpt = _checkpoint(s.model, optimizer, scheduler, s.precision, state, s.fingerprint, rng, procs.world)
            ckpt["progress"].update(loss_sum=loss_sum, seen=int(seen))
            atomic_io.save(ckpt, last_path)

    again = ("run the same command again to resume" if not rc.force else
             "run the same command without runtime.force=true to resume")
    bar = tqdm(total=int(rec.epochs), initial=state.progress.epoch - 1, desc=f"pretrain {s.model.info.name}",
               disable=not (rc.progress and procs.main))
    with GracefulStop() as stop:
        while state.progress.epoch <= int(rec.epochs):
            epoch = state.progress.epoch
            if state.progress.step == 0:
                state.progress.lr = optimizer.param_groups[0]["lr"]
            lr = state.progress.lr
            t0 = time.perf_counter()
            try:
                done = _train_epoch(s, train_loader, optimizer, scheduler, loss_fn, state.progress, stop,
                                    rc.progress)
            except BadImage:
                if procs.world == 1:  # (the other processes of a distributed run cannot join a save now)
                    save_last()  # the steps before the bad batch are kept: fix the file and run again to go on
                raise
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)
            seconds = time.perf_counter() - t0
            state.train_seconds += seconds
            if not done:
                save_last()
                message = (f"stopped by {stop.name()} at epoch {epoch}, step {state.progress.step}; state saved to "
                           f"{last_path}: {again}")
                log.warning(message)
                if not stop.hand_on():
                    raise Interrupted(stop.signum, message)
                continue
            loss_sum, seen = procs.sum([state.progress.loss_sum, float(state.progress.seen)], s.device)
            try:
                val = _validate(s, val_loader, loss_fn)
            except BadImage:
                if procs.world == 1:
                    save_last()  # the epoch's training is kept: the rerun only validates it
                raise
            state.history.append({"epoch": epoch, "lr": lr, "train_loss": loss_sum / max(seen, 1), **val,
                                  "images": int(seen), "seconds": round(seconds, 3),
                                  "img_per_s": round(seen / seconds, 1) if seconds > 0 else float("nan")})
            state.progress = Progress(epoch=epoch + 1)
            save_last()
            if procs.main:
                atomic_io.write_csv(pd.DataFrame(state.history), out / HISTORY)
            bar.update(1)
            row = state.history[-1]
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", top1=f"{row['val_top1']:.3f}")
            log.info("epoch %d lr %.3g loss %.4f val loss %.4f top-1 %.4f top-5 %.4f, %.0f img/s", epoch, lr,
                     row["train_loss"], row["val_loss"], row["val_top1"], row["val_top5"], row["img_per_s"])
            if stop.requested:
                message = f"stopped by {stop.name()} after epoch {epoch}; {again}"
                log.warning(message)
                if not stop.hand_on():
                    raise Interrupted(stop.signum, message)
    bar.close()
    meta = procs.agree(lambda: _finish(cfg, s, state, run_dir))
    if procs.main and rc.install:
        install(out, meta)
    return meta


def _check_resumable(ckpt: dict[str, Any], s: Setup, path: Path) -> None:
    check_resumable(ckpt, s.fingerprint, s.precision, path)
    if ckpt["progress"]["step"] and ckpt["processes"] != s.procs.world:
        raise UserError(f"{path} was cut in the middle of an epoch by a run of {ckpt['processes']} process(es); "
                        f"resume it with {ckpt['processes']}, or delete last.pt to start over")


def _train_epoch(s: Setup, train_loader, optimizer, scheduler, loss_fn, progress: Progress, stop,
                 show_bar: bool) -> bool:
    """Train from ``progress.step`` to the end of the epoch, or until a signal asks to stop (after a whole step).
    Returns whether the epoch is complete."""
    model, acc = s.step_model, s.batches.accumulate
    model.train()
    s.batches.set(progress.epoch, progress.step)
    steps = s.batches.steps_per_epoch()
    total = torch.tensor(progress.loss_sum, dtype=torch.float64, device=s.device)
    first_bad = torch.tensor(-1, device=s.device)
    bar = tqdm(total=steps, initial=progress.step, desc=f"epoch {progress.epoch}", leave=False,
               disable=not (show_bar and s.procs.main))
    micro = 0
    kept = (progress.loss_sum, progress.seen)  # the sums at the last whole step, what a save may record
    for images, labels in train_loader:
        if stop.requested and micro == 0:
            break
        if labels.min() < 0:
            progress.loss_sum = float(total if micro == 0 else kept[0])
            if micro:  # in the middle of an accumulated step: back to the last whole one
                progress.seen = kept[1]
            raise s.train_set.bad_image_error(labels)
        x = s.batcher(images)
        y = s.batcher.to_device(labels)
        last = micro == acc - 1
        sync = contextlib.nullcontext() if last or s.procs.world == 1 else model.no_sync()
        with sync, batchnorm_statistics_kept(model, keep=micro > 0):
            with s.precision.autocast(s.device):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            scaled = loss / acc
            (s.precision.scaler.scale(scaled) if s.precision.scaler is not None else scaled).backward()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), progress.step + 1, first_bad)
        total += loss.detach().double() * len(labels)
        progress.seen += len(labels)
        micro += 1
        if not last:
            continue
        micro = 0
        if s.precision.scaler is not None:
            s.precision.scaler.step(optimizer)
            s.precision.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        progress.step += 1
        if acc > 1:
            kept = (total.clone(), progress.seen)
        bar.update(1)
    bar.close()
    bad = int(first_bad)
    if bad >= 0:
        raise UserError(f"the training loss became NaN or infinite at epoch {progress.epoch}, step {bad}: lower "
                        "recipe.lr_per_256; last.pt still holds the last complete epoch")
    progress.loss_sum = float(total)
    return progress.step >= steps


@torch.inference_mode()
def _validate(s: Setup, val_loader, loss_fn) -> dict[str, float]:
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


def _finish(cfg: DictConfig, s: Setup, state: PretrainState, run_dir: RunDir) -> dict[str, Any]:
    """weights.pth, then weights.json (its presence marks the run finished)."""
    out = run_dir.path
    run_dir.claim(cfg)
    atomic_io.save(s.model.state_dict(), out / WEIGHTS)
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
        "sha256": sha256_file(out / WEIGHTS), "started": state.started, "finished": _now(),
        "rethink_tl": __version__, "torch": torch.__version__,
    }
    atomic_io.write_json(meta, out / META)
    log.info("pretraining finished: val top-1 %.4f top-5 %.4f -> %s (sha256 %s)", meta["val_top1"], meta["val_top5"],
             out / WEIGHTS, meta["sha256"][:12])
    return meta

