"""``rtl bench``: is the training loop as fast as the model allows?

For one model it times, in images/s:
  (a) bare   the model's own step (forward, loss, backward, Adam) on a tensor already on the device;
  (b) loop   ``rtl train``'s epoch on uint8 images held in memory (the decode-once cache), with its
             augmentation, normalisation, precision and memory format;
  (c) naive  what most research scripts do: PIL decode + torchvision transforms in a DataLoader every
             epoch, fp32, default memory format;
plus evaluation images/s, peak memory, and the time to score 45,000 x 14 predictions.
b/a near 1 means the loop costs nothing beyond the model; b/c is what the loop saves.
"""

from __future__ import annotations

import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .checkpoint import write_csv
from .data.base import Split
from .data.synthetic import generate_split
from .metrics import score
from .models import build_model, check_image_size
from .train import (EpochProgress, configure_device, device_name, make_batchers, make_optimizer, masked_bce,
                    maybe_compile, predict, resolve_precision, train_one_epoch, train_step)

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fresh(cfg: DictConfig, num_labels: int, device: torch.device, channels_last: bool):
    torch.manual_seed(0)
    model = build_model(cfg.model, num_labels=num_labels)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    optimizer, _ = make_optimizer(model, cfg.train)
    return model, optimizer


def bare_step(cfg, device, precision, labels, batch, size, steps, warmup) -> float:
    """(a) images/s of forward + loss + backward + step on one tensor already on the device."""
    channels_last = bool(cfg.train.get("channels_last", True))
    model, optimizer = _fresh(cfg, labels, device, channels_last)
    step_model = maybe_compile(model, cfg.train)
    loss_fn = masked_bce(None)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, labels, device=device) < 0.1).float()
    m = torch.ones_like(y, dtype=torch.bool)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        train_step(step_model, x, y, m, optimizer, loss_fn, precision)
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def _split(images: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(images)[:, None], torch.from_numpy(y), torch.ones(y.shape, dtype=torch.bool),
                 [str(i) for i in range(len(y))])


def loop(cfg, device, precision, images, y, batch, warmup):
    """(b) images/s of ``rtl train``'s epoch over uint8 images in memory, and eval images/s."""
    model, optimizer = _fresh(cfg, y.shape[1], device, bool(cfg.train.get("channels_last", True)))
    step_model = maybe_compile(model, cfg.train)
    train_batcher, eval_batcher = make_batchers(model.info, cfg.train, device)
    loss_fn = masked_bce(None)
    n_warm = warmup * batch
    warm, timed = _split(images[:n_warm], y[:n_warm]), _split(images[n_warm:], y[n_warm:])
    if device.type == "cuda":
        warm.images, timed.images = warm.images.to(device), timed.images.to(device)
    train_one_epoch(step_model, warm, train_batcher, optimizer, loss_fn, batch, 0, EpochProgress(1),
                    precision=precision)
    _sync(device)
    t0 = time.perf_counter()
    train_one_epoch(step_model, timed, train_batcher, optimizer, loss_fn, batch, 0, EpochProgress(2),
                    precision=precision)
    _sync(device)
    train_ips = len(timed) / (time.perf_counter() - t0)
    eval_batch = int(cfg.train.eval_batch_size)
    n_eval = min(int(cfg.bench.eval_images), len(timed))
    evaluation = _split(images[n_warm:n_warm + n_eval], y[n_warm:n_warm + n_eval])
    if device.type == "cuda":
        evaluation.images = evaluation.images.to(device)
    predict(step_model, evaluation, eval_batcher, eval_batch, precision)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    predict(step_model, evaluation, eval_batcher, eval_batch, precision)
    _sync(device)
    return train_ips, n_eval / (time.perf_counter() - t0)


class _Files(Dataset):
    def __init__(self, paths, y, tf):
        self.paths, self.y, self.tf = paths, y, tf

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB")), torch.from_numpy(self.y[i])


def naive(cfg, device, images, y, batch, size, warmup, workdir: Path) -> float:
    """(c) images/s of a per-sample PIL pipeline in a DataLoader, fp32, default memory format."""
    source = int(round(size * float(cfg.bench.source_scale)))
    paths = []
    for i, img in enumerate(images):
        path = workdir / f"{i:05d}.png"
        Image.fromarray(img).resize((source, source), Image.BILINEAR).save(path)
        paths.append(path)
    model, optimizer = _fresh(cfg, y.shape[1], device, channels_last=False)
    tf = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.RandomRotation(10),
        transforms.ToTensor(), transforms.Normalize(model.info.mean, model.info.std),
    ])
    loader = DataLoader(_Files(paths, y, tf), batch_size=batch, shuffle=True,
                        num_workers=int(cfg.bench.naive_workers), pin_memory=device.type == "cuda",
                        drop_last=True)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    seen, t0 = 0, None
    for i, (x, target) in enumerate(loader):  # the loader is created each epoch, as in most scripts
        if i == warmup:
            _sync(device)
            t0, seen = time.perf_counter(), 0
        x, target = x.to(device), target.to(device)
        loss = loss_fn(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(x)
    _sync(device)
    return seen / (time.perf_counter() - t0)


def score_seconds(n: int, labels: int) -> float:
    rng = np.random.default_rng(0)
    y = (rng.random((n, labels)) < 0.1).astype(np.float32)
    s = rng.random((n, labels)).astype(np.float32)
    t0 = time.perf_counter()
    score(y, s, [f"l{i}" for i in range(labels)])
    return time.perf_counter() - t0


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def run_bench(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    out = Path(out_dir)
    tc, bc = cfg.train, cfg.bench
    device = configure_device(tc)
    precision = resolve_precision(tc.get("amp", "auto"), device)
    size, batch = int(cfg.data.image_size), int(tc.batch_size)
    steps, warmup = int(bc.steps), int(bc.warmup)
    model = build_model(cfg.model, num_labels=1)
    check_image_size(model, size)
    params = sum(p.numel() for p in model.parameters())
    del model
    n = (warmup + steps) * batch
    images, y = generate_split(n, size, seed=0, prevalence=0.1)
    y = y.astype(np.float32)

    log.info("bench %s at %d px, batch %d, %s, %s", cfg.model.tag, size, batch, device_name(device), precision.name)
    a = bare_step(cfg, device, precision, y.shape[1], batch, size, steps, warmup)
    log.info("(a) bare step %.1f images/s", a)
    b, eval_ips = loop(cfg, device, precision, images, y, batch, warmup)
    log.info("(b) rtl loop  %.1f images/s; eval %.1f images/s", b, eval_ips)
    with tempfile.TemporaryDirectory(prefix="rtl-bench-") as tmp:
        c = naive(cfg, device, images, y, batch, size, warmup, Path(tmp))
    log.info("(c) naive     %.1f images/s", c)
    row = {
        "model": str(cfg.model.tag), "params": params, "image_size": size, "batch_size": batch,
        "device": device_name(device), "precision": precision.name,
        "channels_last": bool(tc.get("channels_last", True)), "compile": bool(tc.get("compile", False)),
        "a_bare_ips": round(a, 2), "b_loop_ips": round(b, 2), "c_naive_ips": round(c, 2),
        "b_over_a": round(b / a, 3), "b_over_c": round(b / c, 3), "eval_ips": round(eval_ips, 2),
        "peak_memory_gb": round(peak_memory_gb(device), 3),
        "score_seconds": round(score_seconds(int(bc.score_n), int(bc.score_labels)), 3),
        "torch": torch.__version__,
    }
    write_csv(pd.DataFrame([row]), out / "bench.csv")
    return row


def format_row(row: dict[str, Any]) -> str:
    return "\n".join([
        f"model {row['model']} ({row['params'] / 1e6:.2f}M params), {row['image_size']} px, batch {row['batch_size']}, "
        f"{row['device']}, {row['precision']}, channels_last={row['channels_last']}, compile={row['compile']}",
        f"  (a) bare model step      {row['a_bare_ips']:10.1f} images/s",
        f"  (b) rtl train loop       {row['b_loop_ips']:10.1f} images/s   b/a = {row['b_over_a']:.3f}",
        f"  (c) naive PIL loop, fp32 {row['c_naive_ips']:10.1f} images/s   b/c = {row['b_over_c']:.2f}",
        f"  evaluation               {row['eval_ips']:10.1f} images/s",
        f"  peak memory              {row['peak_memory_gb']:10.2f} GB",
        f"  scoring {45000} x 14       {row['score_seconds']:10.2f} s",
    ])
