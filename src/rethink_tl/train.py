"""One training run: ``rtl train model=dens_t1 init=pretrained`` ends up in ``run(cfg, out_dir)``.

Protocol (SPEC section 4, defaults = the paper): Adam, BCE-with-logits, learning rate halved
when validation macro AUPRC plateaus, the epoch with the best validation AUPRC is the model,
and only that checkpoint is scored on the test split.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import __version__, checkpoint
from .data import Split, build_data, dataset_labels
from .errors import UserError
from .metrics import Scores, score
from .preempt import GracefulStop, Interrupted
from .models import build_model, check_image_size
from .weights import apply_init

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is available: use train.device=cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"train.device must be auto, cpu or cuda[:N], got {name}")
    return torch.device(name)


@dataclass
class Precision:
    """Mixed precision for one device: autocast dtype (None = fp32) and, for fp16, a grad scaler."""

    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """``train.amp``: auto (bf16 where the GPU supports it, else fp16; fp32 on CPU), bf16, fp16 or off."""
    amp = str(amp).lower()
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise UserError(f"train.amp must be auto, bf16, fp16 or off, got {amp}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision()
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("train.amp=fp16 needs a CUDA device; use train.amp=bf16 or off on CPU")
        return Precision(torch.float16, torch.amp.GradScaler("cuda"))
    return Precision(torch.bfloat16)


@dataclass
class Batcher:
    """Turns uint8 images into normalised float batches on the device, with optional augmentation.

    All randomness comes from a generator the caller seeds per epoch, so a run resumed at
    epoch k sees exactly the batches and augmentations it would have seen without the break.
    """

    mean: torch.Tensor  # (1, 3, 1, 1) on device
    std: torch.Tensor
    device: torch.device
    channels_last: bool
    rotate_degrees: float = 0.0
    scale_jitter: float = 0.0

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and t.device.type == "cpu":
            # Page-locked memory lets the copy run asynchronously alongside the previous step.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def __call__(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        # uint8 crosses the bus (4x less than float32); the float conversion happens on the device.
        x = self.to_device(images).float().div_(255.0)
        if gen is not None and (self.rotate_degrees > 0 or self.scale_jitter > 0):
            x = self._augment(x, gen)
        if x.shape[1] == 1:  # grayscale X-rays are replicated to the 3 channels the networks expect
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(self.rotate_degrees)
        scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * self.scale_jitter
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class EpochProgress:
    """Where a training epoch stands, so that one cut short by a signal can continue exactly."""

    epoch: int
    step: int = 0  # batches done
    loss_sum: float = 0.0
    seen: int = 0
    gen_state: torch.Tensor | None = None  # the epoch generator after `step` batches

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "loss_sum": self.loss_sum, "seen": self.seen,
                "gen_state": self.gen_state}


class NonFiniteLoss(UserError):
    pass


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Data order and augmentation depend only on (seed, epoch), never on what ran before.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train_step(model, x, y, m, optimizer, loss_fn, precision: Precision) -> torch.Tensor:
    """Forward, loss, backward, update: the model's own work, which the loop around it should not slow."""
    with precision.autocast(x.device):
        logits = model(x)
    loss = loss_fn(logits.float(), y, m)
    optimizer.zero_grad(set_to_none=True)
    if precision.scaler is not None:
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss


def train_one_epoch(model, split: Split, batcher: Batcher, optimizer, loss_fn, batch_size: int, seed: int,
                    progress: EpochProgress, stop=None, show_bar: bool = False,
                    precision: Precision | None = None) -> bool:
    """Train over the split in the epoch's seeded order from ``progress.step`` on.

    Updates ``progress`` in place and returns True when the epoch is complete, False when
    ``stop.requested`` cut it short (after a whole step: the state is consistent).
    """
    precision = precision or Precision()
    model.train()
    gen = epoch_generator(seed, progress.epoch)
    order = torch.randperm(len(split), generator=gen)
    if progress.gen_state is not None:
        gen.set_state(progress.gen_state)
    starts = range(progress.step * batch_size, len(order), batch_size)
    total = torch.tensor(progress.loss_sum, dtype=torch.float64, device=batcher.device)
    first_bad = torch.tensor(-1, device=batcher.device)
    bar = tqdm(starts, desc=f"epoch {progress.epoch}", leave=False, disable=not show_bar)
    step = progress.step
    for start in bar:
        if stop is not None and stop.requested:
            break
        idx = order[start:start + batch_size]
        step += 1
        if len(idx) < 2 and len(order) > 1:
            continue  # BatchNorm cannot train on a single image
        x = batcher(split.images[idx], gen)
        y = batcher.to_device(split.labels[idx])
        m = batcher.to_device(split.mask[idx])
        loss = train_step(model, x, y, m, optimizer, loss_fn, precision)
        # Kept on the device: checking each loss on the host would be a sync point per step.
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        total += loss.detach().double() * len(idx)
        progress.seen += len(idx)
    bad = int(first_bad)
    if bad >= 0:
        raise NonFiniteLoss(f"the training loss became NaN or infinite at epoch {progress.epoch}, step {bad}: "
                            "lower train.lr or check the data; last.pt still holds the last good epoch")
    progress.step = step
    progress.loss_sum = float(total)
    progress.gen_state = gen.get_state()
    return step * batch_size >= len(order)


@torch.inference_mode()
def predict(model, split: Split, batcher: Batcher, batch_size: int, precision: Precision | None = None) -> np.ndarray:
    precision = precision or Precision()
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        x = batcher(split.images[start:start + batch_size])
        with precision.autocast(batcher.device):
            logits = model(x)
        out.append(torch.sigmoid(logits.float()))
    # One copy back at the end instead of a device sync per batch.
    return torch.cat(out).cpu().numpy() if out else np.zeros((0, split.labels.shape[1]), dtype=np.float32)


def evaluate(model, split: Split, batcher: Batcher, batch_size: int, labels: list[str], name: str,
             precision: Precision | None = None) -> Scores:
    probs = predict(model, split, batcher, batch_size, precision)
    return score(split.labels.numpy(), probs, labels, mask=split.mask.numpy(), split=name)


def configure_device(tc) -> torch.device:
    """Pick the device and set the process-wide switches that make it fast."""
    if tc.get("threads", 0):
        torch.set_num_threads(int(tc.threads))
    device = pick_device(str(tc.device))
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = bool(tc.get("cudnn_benchmark", True))
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}threads"


def make_batchers(info, tc, device: torch.device) -> tuple[Batcher, Batcher]:
    mean = torch.tensor(info.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, 3, 1, 1)
    channels_last = bool(tc.get("channels_last", True))
    train = Batcher(mean, std, device, channels_last, float(tc.rotate_degrees), float(tc.scale_jitter))
    return train, Batcher(mean, std, device, channels_last)


def maybe_compile(model: torch.nn.Module, tc) -> torch.nn.Module:
    """``train.compile=true``: the compiled module shares parameters with ``model``, so checkpoints stay plain."""
    if not tc.get("compile", False):
        return model
    return torch.compile(model)


def move_to_device(data, device: torch.device, max_share: float):
    """Keep the uint8 splits on the GPU when they take at most ``max_share`` of its free memory.

    Then a batch is an index into device memory: no host gather, no copy, nothing for the
    input pipeline to fall behind on. Larger datasets stay in host memory and are copied per batch.
    """
    if max_share <= 0:
        return data
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(s.images.numel() for s in data.splits().values())
    if need > max_share * free:
        log.info("dataset (%.1f GB uint8) stays in host memory: more than %.0f%% of free GPU memory",
                 need / 1e9, 100 * max_share)
        return data
    for split in data.splits().values():
        split.images = split.images.to(device)  # labels stay on the host: metrics are computed there
    return data


def _should_stop(tc, best_epoch: int, optimizer, history) -> bool:
    """The optional early stops (both off by default)."""
    if not history:
        return False
    stale = history[-1]["epoch"] - best_epoch  # epochs since the best validation AUPRC
    if tc.get("early_stop", 0) and stale >= int(tc.early_stop):
        log.info("no better validation AUPRC for %d epochs: stopping early", stale)
        return True
    if tc.get("min_lr", 0) and optimizer.param_groups[0]["lr"] < float(tc.min_lr):
        log.info("learning rate fell below train.min_lr=%g: stopping", float(tc.min_lr))
        return True
    return False


def rng_state() -> dict[str, Any]:
    """Every global generator, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(model: torch.nn.Module, tc) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau]:
    """Adam, and a scheduler that multiplies the lr by ``lr_factor`` when validation AUPRC stops rising."""
    optimizer = torch.optim.Adam(model.parameters(), lr=float(tc.lr), weight_decay=float(tc.get("weight_decay", 0.0)))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=float(tc.lr_factor),
                                                           patience=int(tc.patience))
    return optimizer, scheduler


def masked_bce(pos_weight: torch.Tensor | None):
    def loss_fn(logits, y, m):
        per = F.binary_cross_entropy_with_logits(logits, y, reduction="none", pos_weight=pos_weight)
        m = m.float()
        return (per * m).sum() / m.sum().clamp_min(1.0)

    return loss_fn


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


def run(cfg: DictConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train one setting into ``out_dir`` and return its results row (also written to results.csv)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.csv"
    tc = cfg.train
    if tc.get("force", False):
        # Start over: a finished or interrupted earlier attempt must not leak into this one.
        for name in ("results.csv", "metrics.csv", "last.pt", "best.pt"):
            (out / name).unlink(missing_ok=True)
    elif results_path.exists():
        log.info("%s exists: run already finished, skipping (train.force=true runs it again)", results_path)
        return pd.read_csv(results_path).iloc[0].to_dict()

    device = configure_device(tc)
    seed = int(tc.seed)
    seed_everything(seed)

    # Model and weights first: their errors are cheap to find, reading a dataset may not be.
    labels = dataset_labels(cfg.data)
    model = build_model(cfg.model, num_labels=len(labels))
    check_image_size(model, int(cfg.data.image_size))
    init = apply_init(model, cfg.init)  # logs what was loaded and what is new
    data = build_data(cfg.data)
    if data.label_names != labels:
        raise RuntimeError(f"dataset gave labels {data.label_names}, its config promised {labels}")
    fingerprint = data.fingerprint()
    log.info("data %s, fingerprint %s", data.describe(), fingerprint)
    n_params = sum(p.numel() for p in model.parameters())
    memory_format = torch.channels_last if tc.get("channels_last", True) else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)

    info = model.info
    train_batcher, eval_batcher = make_batchers(info, tc, device)
    precision = resolve_precision(tc.get("amp", "auto"), device)
    if device.type == "cuda":
        data = move_to_device(data, device, float(tc.get("data_on_device", 0.5)))
    step_model = maybe_compile(model, tc)
    log.info("device %s, precision %s, channels_last %s, compile %s", device, precision.name,
             bool(tc.get("channels_last", True)), bool(tc.get("compile", False)))

    optimizer, scheduler = make_optimizer(model, tc)
    pos_weight = None
    if tc.get("pos_weight") == "balanced":
        pos = torch.as_tensor(data.train.positives(), dtype=torch.float32)
        counted = data.train.mask.sum(0).float()
        pos_weight = ((counted - pos) / pos.clamp_min(1)).to(device)
    elif tc.get("pos_weight") not in (None, "none"):
        raise UserError(f"train.pos_weight must be null or 'balanced', got {tc.pos_weight}")
    loss_fn = masked_bce(pos_weight)

    for stale_tmp in out.glob(".*.tmp"):  # left by a process killed in the middle of an atomic write
        stale_tmp.unlink()
    OmegaConf.save(cfg, out / "config.yaml")
    history: list[dict[str, Any]] = []
    best, best_epoch, train_seconds = -math.inf, 0, 0.0
    progress = EpochProgress(epoch=1)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.exists():
        state = checkpoint.load(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if precision.scaler is not None and state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        best, best_epoch, train_seconds = state["best"], state["best_epoch"], state["train_seconds"]
        history = state["history"]
        progress = EpochProgress(**state["progress"])
        started = state.get("started", started)
        log.info("resuming from %s at epoch %d step %d (best val AUPRC %.4f at epoch %d)",
                 last_path, progress.epoch, progress.step, best, best_epoch)

    def save_last() -> None:
        checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "best": best, "best_epoch": best_epoch,
                         "train_seconds": train_seconds, "history": history, "progress": progress.state_dict(),
                         "rng": rng_state(), "started": started,
                         "scaler": precision.scaler.state_dict() if precision.scaler is not None else {}}, last_path)

    epochs = int(tc.epochs)
    show = bool(tc.get("progress", True))
    bar = tqdm(total=epochs, initial=progress.epoch - 1, desc=f"{info.name}/{init.strategy}", disable=not show)
    with GracefulStop() as stop:
        while progress.epoch <= epochs and not _should_stop(tc, best_epoch, optimizer, history):
            epoch = progress.epoch
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            done = train_one_epoch(step_model, data.train, train_batcher, optimizer, loss_fn, int(tc.batch_size),
                                   seed, progress, stop, show, precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_seconds += time.perf_counter() - t0
            if not done:
                save_last()
                message = (f"stopped by {stop.name()} at epoch {epoch}, step {progress.step}; state saved to "
                           f"{last_path}: run the same command again to resume")
                log.warning(message)
                if stop.hand_on():
                    continue  # an earlier handler (e.g. submitit's TERM bypass) wants the run to go on
                raise Interrupted(stop.signum, message)
            val = evaluate(step_model, data.val, eval_batcher, int(tc.eval_batch_size), labels, "val", precision)
            val_auprc = val.macro["auprc"]
            if not math.isnan(val_auprc):
                scheduler.step(val_auprc)
            improved = not math.isnan(val_auprc) and val_auprc > best
            if improved:
                best, best_epoch = val_auprc, epoch
                checkpoint.save({"model": model.state_dict(), "epoch": epoch, "val_auprc": val_auprc}, best_path)
            history.append({"epoch": epoch, "lr": lr, "train_loss": progress.loss_sum / max(progress.seen, 1),
                            **val.flat("val"), "seconds": round(time.perf_counter() - t0, 3),
                            "images_seen": progress.seen})
            progress = EpochProgress(epoch=epoch + 1)
            # last.pt first: metrics.csv is rewritten from its history, so the two never disagree for long.
            save_last()
            checkpoint.write_csv(pd.DataFrame(history), out / "metrics.csv")
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}", val_auprc=f"{val_auprc:.4f}", best=best_epoch)
            log.info("epoch %d lr %.2e loss %.4f val AUROC %.4f AUPRC %.4f%s", epoch, lr, history[-1]["train_loss"],
                     val.macro["auroc"], val_auprc, " *" if improved else "")
            if stop.requested:  # arrived during evaluation: the epoch is saved, nothing to redo
                message = f"stopped by {stop.name()} after epoch {epoch}; run the same command again to resume"
                log.warning(message)
                if not stop.hand_on():
                    raise Interrupted(stop.signum, message)
    bar.close()
    images_seen = sum(row["images_seen"] for row in history)

    if not best_path.exists():
        raise UserError("no epoch gave a defined validation AUPRC (does every label have positives and negatives "
                        "in the val split?), so there is no model to test")
    best_state = checkpoint.load(best_path)
    model.load_state_dict(best_state["model"])
    val = evaluate(step_model, data.val, eval_batcher, int(tc.eval_batch_size), labels, "val", precision)
    test = evaluate(step_model, data.test, eval_batcher, int(tc.eval_batch_size), labels, "test", precision)
    row: dict[str, Any] = {
        "dataset": data.name, "model": str(cfg.model.get("tag", info.name)), "init": str(cfg.init.name),
        "strategy": init.strategy, "fraction": float(cfg.data.fraction), "seed": seed, "params": n_params,
        "best_epoch": int(best_state["epoch"]), "epochs_run": len(history),
        "val_auroc": val.macro["auroc"], "val_auprc": val.macro["auprc"],
        "test_auroc": test.macro["auroc"], "test_auprc": test.macro["auprc"],
    }
    row.update({k: v for k, v in val.flat("val").items() if k not in row})
    row.update({k: v for k, v in test.flat("test").items() if k not in row})
    row.update({
        "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
        "image_size": int(data.train.images.shape[-1]), "batch_size": int(tc.batch_size), "lr": float(tc.lr),
        "train_seconds": round(train_seconds, 3),
        "images_per_s": round(images_seen / train_seconds, 2) if train_seconds > 0 else float("nan"),
        "device": device_name(device), "precision": precision.name, "weights": init.source, "data_fingerprint": fingerprint,
        "started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(), **_versions(),
    })
    checkpoint.write_csv(pd.DataFrame([row]), results_path)
    log.info("test AUROC %.4f AUPRC %.4f (best val epoch %d) -> %s", row["test_auroc"], row["test_auprc"],
             row["best_epoch"], results_path)
    return row
