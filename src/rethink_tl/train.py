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

    def __call__(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
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


def train_one_epoch(model, split: Split, batcher: Batcher, optimizer, loss_fn, batch_size: int,
                    gen: torch.Generator, progress: bool, desc: str) -> tuple[float, int]:
    """One pass over the training split in a seeded random order; returns (mean loss, images seen)."""
    model.train()
    order = torch.randperm(len(split), generator=gen)
    total, seen = torch.zeros((), device=batcher.device), 0
    bar = tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not progress)
    for start in bar:
        idx = order[start:start + batch_size]
        if len(idx) < 2 and len(order) > 1:
            continue  # BatchNorm cannot train on a single image
        x = batcher(split.images[idx], gen)
        y = split.labels[idx].to(batcher.device, non_blocking=True)
        m = split.mask[idx].to(batcher.device, non_blocking=True)
        logits = model(x)
        loss = loss_fn(logits.float(), y, m)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)  # stays on the device: no sync per step
        seen += len(idx)
    mean_loss = float(total) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise UserError(f"training loss became {mean_loss} ({desc}): lower train.lr or check the data; "
                        "the last good checkpoint is last.pt")
    return mean_loss, seen


@torch.inference_mode()
def predict(model, split: Split, batcher: Batcher, batch_size: int) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        x = batcher(split.images[start:start + batch_size])
        out.append(torch.sigmoid(model(x).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, split.labels.shape[1]), dtype=np.float32)


def evaluate(model, split: Split, batcher: Batcher, batch_size: int, labels: list[str], name: str) -> Scores:
    probs = predict(model, split, batcher, batch_size)
    return score(split.labels.numpy(), probs, labels, mask=split.mask.numpy(), split=name)


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
    if results_path.exists() and not tc.get("force", False):
        log.info("%s exists: run already finished, skipping (train.force=true runs it again)", results_path)
        return pd.read_csv(results_path).iloc[0].to_dict()

    if tc.get("threads", 0):
        torch.set_num_threads(int(tc.threads))
    device = pick_device(str(tc.device))
    seed = int(tc.seed)
    seed_everything(seed)

    # Model and weights first: their errors are cheap to find, reading a dataset may not be.
    labels = dataset_labels(cfg.data)
    model = build_model(cfg.model, num_labels=len(labels))
    check_image_size(model, int(cfg.data.image_size))
    init = apply_init(model, cfg.init)
    log.info("init: %s", init.summary())
    data = build_data(cfg.data)
    if data.label_names != labels:
        raise RuntimeError(f"dataset gave labels {data.label_names}, its config promised {labels}")
    log.info("data %s, fingerprint %s", data.describe(), data.fingerprint())
    n_params = sum(p.numel() for p in model.parameters())
    memory_format = torch.channels_last if tc.get("channels_last", True) else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)

    info = model.info
    mean = torch.tensor(info.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, 3, 1, 1)
    eval_batcher = Batcher(mean, std, device, bool(tc.get("channels_last", True)))
    train_batcher = Batcher(mean, std, device, bool(tc.get("channels_last", True)),
                            float(tc.rotate_degrees), float(tc.scale_jitter))

    optimizer, scheduler = make_optimizer(model, tc)
    pos_weight = None
    if tc.get("pos_weight") == "balanced":
        pos = torch.as_tensor(data.train.positives(), dtype=torch.float32)
        counted = data.train.mask.sum(0).float()
        pos_weight = ((counted - pos) / pos.clamp_min(1)).to(device)
    elif tc.get("pos_weight") not in (None, "none"):
        raise UserError(f"train.pos_weight must be null or 'balanced', got {tc.pos_weight}")
    loss_fn = masked_bce(pos_weight)

    OmegaConf.save(cfg, out / "config.yaml")
    history: list[dict[str, Any]] = []
    best, best_epoch, start_epoch, train_seconds, images_seen = -math.inf, 0, 1, 0.0, 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if last_path.exists():
        state = checkpoint.load(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        best, best_epoch, start_epoch = state["best"], state["best_epoch"], state["epoch"] + 1
        train_seconds, images_seen = state["train_seconds"], state["images_seen"]
        history = state["history"]
        log.info("resuming from %s after epoch %d (best val AUPRC %.4f at epoch %d)",
                 last_path, state["epoch"], best, best_epoch)

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    epochs = int(tc.epochs)
    stale = sum(1 for row in history if row["epoch"] > best_epoch)
    progress = bool(tc.get("progress", True))
    bar = tqdm(range(start_epoch, epochs + 1), desc=f"{info.name}/{init.strategy}", disable=not progress,
               initial=start_epoch - 1, total=epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        # Per-epoch generator: data order and augmentation depend only on (seed, epoch).
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, seen = train_one_epoch(model, data.train, train_batcher, optimizer, loss_fn, int(tc.batch_size),
                                           gen, progress, f"epoch {epoch}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_train_seconds = time.perf_counter() - t0
        val = evaluate(model, data.val, eval_batcher, int(tc.eval_batch_size), labels, "val")
        val_auprc = val.macro["auprc"]
        if not math.isnan(val_auprc):
            scheduler.step(val_auprc)
        improved = not math.isnan(val_auprc) and val_auprc > best
        if improved:
            best, best_epoch, stale = val_auprc, epoch, 0
            checkpoint.save({"model": model.state_dict(), "epoch": epoch, "val_auprc": val_auprc}, best_path)
        else:
            stale += 1
        train_seconds += epoch_train_seconds
        images_seen += seen
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, **val.flat("val"),
                        "seconds": time.perf_counter() - t0})
        checkpoint.write_csv(pd.DataFrame(history), out / "metrics.csv")
        checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best,
                         "best_epoch": best_epoch, "train_seconds": train_seconds, "images_seen": images_seen,
                         "history": history, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                        last_path)
        bar.set_postfix(loss=f"{train_loss:.4f}", val_auprc=f"{val_auprc:.4f}", best=best_epoch)
        log.info("epoch %d lr %.2e loss %.4f val AUROC %.4f AUPRC %.4f%s", epoch, lr, train_loss,
                 val.macro["auroc"], val_auprc, " *" if improved else "")
        if tc.get("early_stop", 0) and stale >= int(tc.early_stop):
            log.info("no better validation AUPRC for %d epochs: stopping early", stale)
            break
        if tc.get("min_lr", 0) and optimizer.param_groups[0]["lr"] < float(tc.min_lr):
            log.info("learning rate fell below train.min_lr=%g: stopping", float(tc.min_lr))
            break

    if not best_path.exists():
        raise UserError("no epoch gave a defined validation AUPRC (does every label have positives and negatives "
                        "in the val split?), so there is no model to test")
    best_state = checkpoint.load(best_path)
    model.load_state_dict(best_state["model"])
    val = evaluate(model, data.val, eval_batcher, int(tc.eval_batch_size), labels, "val")
    test = evaluate(model, data.test, eval_batcher, int(tc.eval_batch_size), labels, "test")
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
        "device": str(device), "weights": init.source, "data_fingerprint": data.fingerprint(),
        "started": started, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(), **_versions(),
    })
    checkpoint.write_csv(pd.DataFrame([row]), results_path)
    log.info("test AUROC %.4f AUPRC %.4f (best val epoch %d) -> %s", row["test_auroc"], row["test_auprc"],
             row["best_epoch"], results_path)
    return row
