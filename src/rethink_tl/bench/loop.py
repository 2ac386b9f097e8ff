"""``rtl bench``: is the training loop as fast as the model allows?

    rtl bench model=dens_t1 data.image_size=128 train.batch_size=32

For one model it times, in images/s:
  (a) bare   the model's own step (forward, loss, backward, Adam) on a tensor already on the device;
  (b) loop   ``rtl train``'s epoch on uint8 images in memory (the decode-once cache), with its data
             placement (``runtime.data_on_device``), augmentation, normalisation, precision and memory format;
  (c) naive  what most research scripts do: PIL decode + torchvision transforms in a DataLoader every
             epoch, fp32 with torch's default switches, default memory format;
plus evaluation images/s, each phase's own peak memory, and the time to score 45,000 x 14 predictions.
b/a near 1 means the loop costs nothing beyond the model; b/c is what the loop saves.
"""

from __future__ import annotations

import logging
import resource
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ..atomic_io import write_csv
from ..config import validate
from ..data.base import DataBundle, Split
from ..data.renderer import generate_split
from ..engine import (EpochProgress, configure_device, device_name, make_batchers, make_optimizer, masked_bce,
                      maybe_compile, move_to_device, predict_probs, resolve_precision, train_one_epoch, train_step)
from ..errors import UserError
from ..metrics import score
from ..models import build_model, check_image_size, check_model_keys

log = logging.getLogger(__name__)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- memory -----------------------------------------------------------------------------------------

@dataclass
class PeakMemory:
    """The peak memory of one phase, in GB; ``kind`` says what was measured."""

    gb: float = float("nan")
    kind: str = ""


def _reset_rss_peak() -> bool:
    # Linux lets a process reset its own resident-set high-water mark (proc(5), clear_refs "5");
    # getrusage's ru_maxrss then reports the peak since the reset instead of since the process began.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Measure the peak memory of the code in the ``with`` block alone.

    CUDA: the caching allocator's peak of allocated tensors, reset at the start. CPU: the peak resident
    set of this process (libraries and the synthetic images included, DataLoader worker processes not),
    reset at the start where the kernel allows it, else labelled as the peak since the process began.
    """
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.kind = "CUDA peak allocated during the phase"
    else:
        result.kind = ("peak RSS of the process during the phase" if _reset_rss_peak()
                       else "peak RSS of the process since it started")
    yield result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result.gb = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        result.gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


# --- (a) the bare step --------------------------------------------------------------------------------

def _fresh(cfg: DictConfig, num_labels: int, device: torch.device, channels_last: bool):
    torch.manual_seed(0)
    model = build_model(cfg.model, num_labels=num_labels, image_size=int(cfg.data.image_size))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    optimizer, _ = make_optimizer(model, cfg.train)
    return model, optimizer


def bare_step(cfg, device, precision, labels, batch, size, steps, warmup) -> float:
    """(a) images/s of forward + loss + backward + step on one tensor already on the device."""
    channels_last = bool(cfg.runtime.channels_last)
    model, optimizer = _fresh(cfg, labels, device, channels_last)
    step_model = maybe_compile(model, cfg.runtime)
    loss_fn = masked_bce(None)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, labels, device=device) < 0.1).float()
    m = torch.ones_like(y, dtype=torch.bool)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        train_step(step_model, [(x, y, m)], optimizer, loss_fn, precision)
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


# --- (b) the rtl loop ---------------------------------------------------------------------------------

def _split(images: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.from_numpy(images)[:, None], torch.from_numpy(y), torch.ones(y.shape, dtype=torch.bool),
                 [str(i) for i in range(len(y))])


@dataclass
class LoopResult:
    train_ips: float
    eval_ips: float
    data_on_device: bool


def loop(cfg, device, precision, images, y, batch, warmup) -> LoopResult:
    """(b) images/s of ``rtl train``'s epoch over uint8 images in memory, and eval images/s."""
    model, optimizer = _fresh(cfg, y.shape[1], device, bool(cfg.runtime.channels_last))
    step_model = maybe_compile(model, cfg.runtime)
    train_batcher, eval_batcher = make_batchers(model.info, cfg.train, cfg.runtime, device)
    loss_fn = masked_bce(None)
    n_warm = warmup * batch
    n_eval = min(int(cfg.bench.eval_images), len(images) - n_warm)
    data = DataBundle("bench", [str(i) for i in range(y.shape[1])], train=_split(images[n_warm:], y[n_warm:]),
                      val=_split(images[:n_warm], y[:n_warm]),
                      test=_split(images[n_warm:n_warm + n_eval], y[n_warm:n_warm + n_eval]))
    # The same rule as rtl train: on the GPU only when the data fits in runtime.data_on_device of free memory.
    on_device = move_to_device(data, device, float(cfg.runtime.data_on_device))
    warm, timed, evaluation = data.val, data.train, data.test
    train_one_epoch(step_model, warm, train_batcher, optimizer, loss_fn, batch, 0, EpochProgress(1),
                    precision=precision)
    sync(device)
    t0 = time.perf_counter()
    train_one_epoch(step_model, timed, train_batcher, optimizer, loss_fn, batch, 0, EpochProgress(2),
                    precision=precision)
    sync(device)
    train_ips = len(timed) / (time.perf_counter() - t0)
    eval_batch = int(cfg.runtime.eval_batch_size)
    predict_probs(step_model, evaluation, eval_batcher, eval_batch, precision)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    predict_probs(step_model, evaluation, eval_batcher, eval_batch, precision)
    sync(device)
    return LoopResult(train_ips, n_eval / (time.perf_counter() - t0), on_device)


# --- (c) the naive loop -------------------------------------------------------------------------------

class _Files(Dataset):
    def __init__(self, paths, y, tf, length):
        self.paths, self.y, self.tf, self.length = paths, y, tf, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        # Files repeat when the loop needs more batches than there are images: decoding costs the same.
        i = i % len(self.paths)
        with Image.open(self.paths[i]) as im:
            return self.tf(im.convert("RGB")), torch.from_numpy(self.y[i])


# What a fresh script gets from torch (configure_device changes them for rtl): TF32 convolutions on,
# TF32 matmuls off, no cuDNN autotuning.
TORCH_DEFAULTS = {"matmul_tf32": False, "cudnn_tf32": True, "cudnn_benchmark": False}


def _switches() -> dict[str, bool]:
    return {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def _set_switches(s: dict[str, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = s["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = s["cudnn_tf32"]
    torch.backends.cudnn.benchmark = s["cudnn_benchmark"]


def fp32_name(device: torch.device) -> str:
    """What "fp32" means on ``device`` right now: on a GPU, TF32 may stand in for it in convolutions or matmuls."""
    if device.type != "cuda":
        return "fp32"
    tf32 = [op for op, on in (("conv", torch.backends.cudnn.allow_tf32),
                              ("matmul", torch.backends.cuda.matmul.allow_tf32)) if on]
    return f"fp32 (tf32 {'+'.join(tf32)})" if tf32 else "fp32"


@dataclass
class NaiveResult:
    ips: float
    timed_batches: int
    seconds: float
    precision: str  # as it ran, TF32 included
    cudnn_benchmark: bool


def naive(cfg, device, images, y, batch, size, warmup, steps, workdir: Path) -> NaiveResult:
    """(c) images/s of a per-sample PIL pipeline in a DataLoader, fp32, default memory format."""
    source = int(round(size * float(cfg.bench.source_scale)))
    paths = []
    for i, img in enumerate(images):
        path = workdir / f"{i:05d}.png"
        Image.fromarray(img).resize((source, source), Image.BILINEAR).save(path)
        paths.append(path)
    saved = _switches()
    if device.type == "cuda":
        _set_switches(TORCH_DEFAULTS)
    try:
        model, optimizer = _fresh(cfg, y.shape[1], device, channels_last=False)
        tf = transforms.Compose([
            transforms.Resize(size), transforms.CenterCrop(size), transforms.RandomRotation(10),
            transforms.ToTensor(), transforms.Normalize(model.info.mean, model.info.std),
        ])
        workers = int(cfg.bench.naive_workers)
        prefetch = 2 if workers > 0 else None  # torch's default, named so the depth below is explicit
        depth = workers * (prefetch or 0)  # batches the workers can have ready before the main process asks
        # The workers fill their queue while the first steps are slow (allocator, cuDNN); draining it in the
        # warm-up means the clock starts at the loader's steady rate, not on batches made before it ran.
        n_warm, n_timed = warmup + depth, max(steps, 2 * depth)
        dataset = _Files(paths, y, tf, (n_warm + n_timed) * batch)
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, prefetch_factor=prefetch,
                            pin_memory=device.type == "cuda", drop_last=True)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        model.train()

        def step(x, target):
            x, target = x.to(device), target.to(device)
            loss = loss_fn(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        batches = iter(loader)  # a new iterator (new workers) every epoch, as in most scripts
        for _ in range(n_warm):
            step(*next(batches))
        sync(device)
        seen, t0 = 0, time.perf_counter()  # before the first timed batch is fetched
        for _ in range(n_timed):
            x, target = next(batches)
            step(x, target)
            seen += len(x)
        sync(device)
        seconds = time.perf_counter() - t0
        ran_as, benchmark = fp32_name(device), torch.backends.cudnn.benchmark
        del batches  # stops the workers
    finally:
        _set_switches(saved)
    return NaiveResult(seen / seconds, n_timed, seconds, ran_as, bool(benchmark) and device.type == "cuda")


# --- the report ---------------------------------------------------------------------------------------

def score_seconds(n: int, labels: int) -> float:
    rng = np.random.default_rng(0)
    y = (rng.random((n, labels)) < 0.1).astype(np.float32)
    s = rng.random((n, labels)).astype(np.float32)
    t0 = time.perf_counter()
    score(y, s, [f"l{i}" for i in range(labels)])
    return time.perf_counter() - t0


def run_bench(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    validate(cfg)
    check_model_keys(cfg.model)
    out = Path(out_dir)
    tc, bc = cfg.train, cfg.bench
    device = configure_device(cfg.runtime)
    precision = resolve_precision(str(cfg.runtime.amp), device)
    size, batch = int(cfg.data.image_size), int(tc.batch_size)
    steps, warmup = int(bc.steps), int(bc.warmup)
    model = build_model(cfg.model, num_labels=1, image_size=size)
    check_image_size(model, size)
    params = sum(p.numel() for p in model.parameters())
    del model
    n = (warmup + steps) * batch
    images, y = generate_split(n, size, seed=0, prevalence=0.1)
    y = y.astype(np.float32)

    log.info("bench %s at %d px, batch %d, %s, %s", cfg.model.tag, size, batch, device_name(device), precision.name)
    with peak_memory(device) as mem_a:
        a = bare_step(cfg, device, precision, y.shape[1], batch, size, steps, warmup)
    log.info("(a) bare step %.1f images/s, peak %.2f GB", a, mem_a.gb)
    with peak_memory(device) as mem_b:
        b = loop(cfg, device, precision, images, y, batch, warmup)
    log.info("(b) rtl loop  %.1f images/s; eval %.1f images/s, peak %.2f GB", b.train_ips, b.eval_ips, mem_b.gb)
    with tempfile.TemporaryDirectory(prefix="rtl-bench-") as tmp, peak_memory(device) as mem_c:
        c = naive(cfg, device, images, y, batch, size, warmup, steps, Path(tmp))
    log.info("(c) naive     %.1f images/s over %d batches, peak %.2f GB", c.ips, c.timed_batches, mem_c.gb)
    row = {
        "model": str(cfg.model.tag), "head": str(cfg.model.head), "dropout": float(cfg.model.dropout),
        "params": params, "image_size": size, "batch_size": batch,
        # Without autocast a GPU still computes in TF32 where configure_device allows it: say so.
        "device": device_name(device), "precision": precision.name if precision.dtype else fp32_name(device),
        "channels_last": bool(cfg.runtime.channels_last), "compile": bool(cfg.runtime.compile),
        "a_bare_ips": round(a, 2), "b_loop_ips": round(b.train_ips, 2), "c_naive_ips": round(c.ips, 2),
        "b_over_a": round(b.train_ips / a, 3), "b_over_c": round(b.train_ips / c.ips, 3),
        "eval_ips": round(b.eval_ips, 2),
        "b_data_on_device": b.data_on_device,
        "c_precision": c.precision, "c_cudnn_benchmark": c.cudnn_benchmark, "c_timed_batches": c.timed_batches,
        "a_peak_gb": round(mem_a.gb, 3), "b_peak_gb": round(mem_b.gb, 3), "c_peak_gb": round(mem_c.gb, 3),
        "memory": mem_a.kind,
        "score_n": int(bc.score_n), "score_labels": int(bc.score_labels),
        "score_seconds": round(score_seconds(int(bc.score_n), int(bc.score_labels)), 3),
        "torch": torch.__version__,
    }
    write_csv(pd.DataFrame([row]), out / "bench.csv")
    return row


def format_row(row: dict[str, Any]) -> str:
    cuda = str(row["device"]).startswith("cuda")
    placement = ("uint8 data on the GPU" if row["b_data_on_device"] else "uint8 data in host memory") if cuda \
        else "uint8 data in memory"
    naive_how = f"{row['c_precision']}, cudnn.benchmark={row['c_cudnn_benchmark']}" if cuda else row["c_precision"]
    return "\n".join([
        f"model {row['model']} ({row['params'] / 1e6:.2f}M params, {row['head']} head"
        + (f", dropout {row['dropout']:g}" if row["dropout"] else "") + f"), {row['image_size']} px, "
        f"batch {row['batch_size']}, "
        f"{row['device']}, {row['precision']}, channels_last={row['channels_last']}, compile={row['compile']}",
        f"  {'':28} {'images/s':>10}   {'':12}  peak GB",
        f"  (a) bare model step          {row['a_bare_ips']:10.1f}   {'':12}  {row['a_peak_gb']:7.2f}",
        f"  (b) rtl train loop + eval    {row['b_loop_ips']:10.1f}   b/a = {row['b_over_a']:5.3f}  "
        f"{row['b_peak_gb']:7.2f}   {placement}",
        f"  (c) naive PIL loop           {row['c_naive_ips']:10.1f}   b/c = {row['b_over_c']:5.2f}  "
        f"{row['c_peak_gb']:7.2f}   {naive_how}, {row['c_timed_batches']} timed batches",
        f"  evaluation                   {row['eval_ips']:10.1f}",
        f"  scoring {row['score_n']} x {row['score_labels']}".ljust(31) + f"{row['score_seconds']:10.2f} s",
        f"  peak GB: {row['memory']}",
    ])
