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

from .atomic_io import write_csv
from .config import validate
from .data.base import DataBundle, Split
from .data.synthetic import generate_split
from .engine import (EpochProgress, configure_device, device_name, make_batchers, make_optimizer, masked_bce,
                     maybe_compile, move_to_device, predict, resolve_precision, train_one_epoch, train_step)
from .errors import UserError
from .metrics import score
from .models import build_model, check_image_size

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
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
            _sync(device)
            t0 = time.perf_counter()
        train_step(step_model, x, y, m, optimizer, loss_fn, precision)
    _sync(device)
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
    _sync(device)
    t0 = time.perf_counter()
    train_one_epoch(step_model, timed, train_batcher, optimizer, loss_fn, batch, 0, EpochProgress(2),
                    precision=precision)
    _sync(device)
    train_ips = len(timed) / (time.perf_counter() - t0)
    eval_batch = int(cfg.runtime.eval_batch_size)
    predict(step_model, evaluation, eval_batcher, eval_batch, precision)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    predict(step_model, evaluation, eval_batcher, eval_batch, precision)
    _sync(device)
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
        _sync(device)
        seen, t0 = 0, time.perf_counter()  # before the first timed batch is fetched
        for _ in range(n_timed):
            x, target = next(batches)
            step(x, target)
            seen += len(x)
        _sync(device)
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


# --- rtl bench-pretrain: the pretraining input pipeline -----------------------------------------------

PIPELINE_COLUMNS = ("model", "image_size", "batch_size", "workers", "device", "precision", "p_img_s",
                    "p_img_s_per_worker", "n_img_s", "n_img_s_per_worker", "m_img_s", "loop_img_s", "p_over_n",
                    "loop_over_min_p_m", "train_images", "jpeg_kb_mean", "jpeg_width_mean", "jpeg_height_mean")
BENCH_WORKERS = 2  # runtime.workers=null: the bench's own default, not rtl pretrain's (the CPU cores)
# (p) and (n) time a few batches (a fraction of a second each): they run in turns, p n p n p n, and each reports
# its median round, so that a burst of other work on the machine does not decide p/n.
LOADER_ROUNDS = 3
_STATS_SAMPLE = 512  # files whose size is read for the stats (ImageNet has 1.28M)


def bench_images(out: Path, n: int) -> Path:
    """``out/images``: ``n`` generated ImageNet-like JPEGs in train/ (8 classes) and a few in val/; kept when a
    previous run left exactly that many."""
    import shutil

    from .data.folder_gen import make_jpeg_folder
    from .data.imagefolder import EXTENSIONS

    root = out / "images"
    train = root / "train"
    have = sum(1 for p in train.glob("*/*") if p.suffix.lower() in EXTENSIONS) if train.is_dir() else -1
    if have == n and (root / "val").is_dir():
        return root
    log.info("writing %d JPEGs (500x375, 375x500, 500x333, quality 90) into %s", n, root)
    tmp = out / "images.tmp"
    for stale in (tmp, root):
        if stale.exists():
            shutil.rmtree(stale)
    make_jpeg_folder(tmp, n)
    tmp.rename(root)
    return root


def _file_stats(samples: list[tuple[str, int]]) -> dict[str, float]:
    """Mean file size and pixel size of (up to _STATS_SAMPLE, evenly spread) training images."""
    import os

    step = max(1, len(samples) // _STATS_SAMPLE)
    kb, width, height = [], [], []
    for path, _ in samples[::step][:_STATS_SAMPLE]:
        kb.append(os.path.getsize(path) / 1e3)
        with Image.open(path) as im:  # reads the header only
            width.append(im.width)
            height.append(im.height)
    return {"jpeg_kb_mean": round(float(np.mean(kb)), 1), "jpeg_width_mean": round(float(np.mean(width)), 1),
            "jpeg_height_mean": round(float(np.mean(height)), 1)}


def _time_batches(batches: Iterator, n: int, dataset=None) -> float:
    """images/s over ``n`` batches after one untimed batch (the workers start while it is made). With W workers
    and n a multiple of W, the clock covers n / W rounds of the workers, as in the steady state. ``dataset``: rtl's
    FolderImages, whose unreadable images arrive as negative labels (named here, as rtl pretrain does)."""
    _, y = next(batches)
    if dataset is not None and y.min() < 0:
        raise dataset.bad_image_error(y)
    seen, t0 = 0, time.perf_counter()
    for _ in range(n):
        _, y = next(batches)
        if dataset is not None and y.min() < 0:
            raise dataset.bad_image_error(y)
        seen += len(y)
    return seen / (time.perf_counter() - t0)


def pipeline_alone(cfg, index, device, workers: int, batches: int) -> float:
    """(p) images/s of rtl pretrain's training loader alone: decode, crop, flip, uint8 batches."""
    from .data.imagefolder import EpochBatches, FolderImages, loader

    dc, rec = cfg.data, cfg.recipe
    data = FolderImages(index.train, int(dc.image_size), train=True, seed=int(rec.seed),
                        min_scale=float(dc.min_scale), flip=bool(dc.flip))
    sampler = EpochBatches(data, int(rec.batch_size), 0, 1, 1, int(rec.seed))
    dl = loader(data, sampler, workers, int(cfg.runtime.prefetch), device.type == "cuda")
    try:
        return _time_batches(iter(dl), batches, data)
    finally:
        del dl  # and with it the iterator that holds the persistent workers: they stop


def plain_loader(cfg, index, device, workers: int, batches: int, mean, std) -> float:
    """(n) images/s of the textbook loader: torchvision ImageFolder (PIL) + transforms to normalised float."""
    from torchvision.datasets import ImageFolder

    dc = cfg.data
    size = int(dc.image_size)
    steps = [transforms.RandomResizedCrop(size, scale=(float(dc.min_scale), 1.0))]
    if dc.flip:
        steps.append(transforms.RandomHorizontalFlip())
    tf = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
    data = ImageFolder(str(index.root / "train"), transform=tf)
    dl = DataLoader(data, batch_size=int(cfg.recipe.batch_size), shuffle=True, num_workers=workers,
                    pin_memory=device.type == "cuda", drop_last=True)
    try:
        return _time_batches(iter(dl), batches)  # the iterator, and its workers, end with the call
    except Exception as err:  # noqa: BLE001  (a worker's error arrives re-raised, with its traceback as text)
        first = str(err).strip().splitlines()
        reason = next((ln for ln in reversed(first) if ln.strip()), type(err).__name__)
        raise UserError(f"the plain torchvision loader could not read an image of {index.root}/train: {reason}") from None


def model_alone(cfg, num_classes: int, device, precision, warmup: int, steps: int) -> float:
    """(m) images/s of rtl pretrain's step (forward, label-smoothed cross-entropy, backward, SGD) on one
    normalised float batch already on the device."""
    from .pretrain import param_groups

    rc, rec = cfg.runtime, cfg.recipe
    size, bs = int(cfg.data.image_size), int(rec.batch_size)
    torch.manual_seed(int(rec.seed))
    model = build_model(cfg.model, num_labels=num_classes, image_size=size)
    check_image_size(model, size)
    fmt = torch.channels_last if rc.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    step_model = maybe_compile(model, rc)
    optimizer = torch.optim.SGD(param_groups(model, float(rec.weight_decay), bool(rec.decay_norm_and_bias)),
                                lr=float(rec.lr_per_256) * bs / 256, momentum=float(rec.momentum),
                                nesterov=bool(rec.nesterov))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(rec.label_smoothing))
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (bs,), device=device)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with precision.autocast(device):
            logits = step_model(x)
        loss = loss_fn(logits.float(), y)
        (precision.scaler.scale(loss) if precision.scaler is not None else loss).backward()
        if precision.scaler is not None:
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return steps * bs / (time.perf_counter() - t0)


class _NoStop:
    requested = False


def whole_loop(cfg, batches: int) -> float:
    """(loop) images/s of rtl pretrain's own epoch (pretrain.setup and pretrain._train_epoch): one step of an
    epoch untimed (starts the workers), then ``batches`` steps of the next epoch timed, from a fresh iterator
    over the running workers."""
    from .data.imagefolder import loader
    from .pretrain import Processes, Progress, _train_epoch, make_schedule, param_groups, setup

    rec = cfg.recipe
    s = setup(cfg, Processes())
    steps = s.batches.steps_per_epoch()
    optimizer = torch.optim.SGD(param_groups(s.model, float(rec.weight_decay), bool(rec.decay_norm_and_bias)),
                                lr=s.lr, momentum=float(rec.momentum), nesterov=bool(rec.nesterov))
    scheduler = make_schedule(optimizer, int(rec.warmup_epochs) * steps, int(rec.epochs) * steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(rec.label_smoothing))
    dl = loader(s.train_set, s.batches, s.workers, int(cfg.runtime.prefetch), s.device.type == "cuda")
    try:
        _train_epoch(s, dl, optimizer, scheduler, loss_fn, Progress(epoch=1, step=steps - 1), _NoStop(), False)
        _sync(s.device)
        progress = Progress(epoch=2, step=steps - batches)
        t0 = time.perf_counter()
        _train_epoch(s, dl, optimizer, scheduler, loss_fn, progress, _NoStop(), False)
        _sync(s.device)
        return progress.seen / (time.perf_counter() - t0)
    finally:
        del dl


def run_pipeline_bench(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """rtl bench-pretrain: (p) the pretraining loader alone, (n) a plain torchvision ImageFolder loader with the
    same workers, (m) the model step alone and (loop) rtl pretrain's epoch, in images/s; writes
    ``out_dir/bench_pretrain.csv`` and returns its row."""
    import copy

    from omegaconf import open_dict

    from .data.imagefolder import index_folder

    validate(cfg)
    out = Path(out_dir)
    cfg = copy.deepcopy(cfg)
    bc, rec = cfg.bench, cfg.recipe
    size = int(cfg.data.image_size)
    model = build_model(cfg.model, num_labels=2, image_size=size)
    check_image_size(model, size)  # before any image is written
    info = model.info
    del model
    with open_dict(cfg):
        if cfg.data.root is None:
            out.mkdir(parents=True, exist_ok=True)
            cfg.data.root = str(bench_images(out, int(bc.images)))
        if cfg.runtime.workers is None:
            cfg.runtime.workers = BENCH_WORKERS
    workers, n_batches = int(cfg.runtime.workers), int(bc.batches)
    index = index_folder(cfg.data.root)
    bs = int(rec.batch_size)
    per_epoch = len(index.train) // bs
    if per_epoch < n_batches + 1:
        raise UserError(f"{index.root}/train has {len(index.train)} images: {per_epoch} batch(es) of "
                        f"recipe.batch_size={bs}, fewer than the 1 untimed + bench.batches={n_batches} timed the bench "
                        "reads in one epoch: raise bench.images (or give a larger data.root) or lower "
                        "bench.batches or recipe.batch_size")
    device = configure_device(cfg.runtime)  # runtime.threads for this process; the workers use one each
    precision = resolve_precision(str(cfg.runtime.amp), device)
    log.info("bench-pretrain %s at %d px, batch %d, %d workers, %s, %s, on %d images of %s", cfg.model.tag, size,
             bs, workers, device_name(device), precision.name, len(index.train), index.root)

    p_rounds, n_rounds = [], []
    for _ in range(LOADER_ROUNDS):
        p_rounds.append(pipeline_alone(cfg, index, device, workers, n_batches))
        n_rounds.append(plain_loader(cfg, index, device, workers, n_batches, info.mean, info.std))
    p, n = float(np.median(p_rounds)), float(np.median(n_rounds))
    log.info("(p) rtl pipeline     %.1f images/s (rounds %s)", p, " ".join(f"{v:.0f}" for v in p_rounds))
    log.info("(n) plain loader     %.1f images/s (rounds %s)", n, " ".join(f"{v:.0f}" for v in n_rounds))
    m = model_alone(cfg, len(index.classes), device, precision, int(bc.warmup), int(bc.steps))
    log.info("(m) model step       %.1f images/s", m)
    whole = whole_loop(cfg, n_batches)
    log.info("(loop) pretrain loop %.1f images/s", whole)
    row = {
        "model": str(cfg.model.tag), "image_size": size, "batch_size": bs, "workers": workers,
        "device": device_name(device), "precision": precision.name if precision.dtype else fp32_name(device),
        "p_img_s": p, "p_img_s_per_worker": p / max(workers, 1), "n_img_s": n,
        "n_img_s_per_worker": n / max(workers, 1), "m_img_s": m, "loop_img_s": whole,
        "p_over_n": p / n, "loop_over_min_p_m": whole / min(p, m),
        "train_images": len(index.train), **_file_stats(index.train),
        "timed_batches": n_batches, "loader_rounds": LOADER_ROUNDS,
        "p_rounds": " ".join(f"{v:.1f}" for v in p_rounds), "n_rounds": " ".join(f"{v:.1f}" for v in n_rounds),
        "timed_steps": int(bc.steps), "data_root": str(index.root),
        "torch": torch.__version__,
    }
    write_csv(pd.DataFrame([row]), out / "bench_pretrain.csv")
    return row


def format_pipeline(row: dict[str, Any]) -> str:
    return "\n".join([
        f"model {row['model']}, {row['image_size']} px, batch {row['batch_size']}, {row['workers']} loader workers, "
        f"{row['device']}, {row['precision']}",
        f"  {row['train_images']} training images of {row['jpeg_width_mean']:.0f}x{row['jpeg_height_mean']:.0f} px "
        f"on average, {row['jpeg_kb_mean']:.0f} KB ({row['data_root']})",
        f"  {'':30} {'images/s':>10} {'per worker':>11}",
        f"  (p) rtl pretrain pipeline      {row['p_img_s']:10.1f} {row['p_img_s_per_worker']:11.1f}   "
        f"median of {row['loader_rounds']} rounds of {row['timed_batches']} batches",
        f"  (n) torchvision ImageFolder    {row['n_img_s']:10.1f} {row['n_img_s_per_worker']:11.1f}",
        f"  (m) model step alone           {row['m_img_s']:10.1f}",
        f"  (loop) rtl pretrain epoch      {row['loop_img_s']:10.1f}",
        f"  p/n = {row['p_over_n']:.2f}   loop/min(p, m) = {row['loop_over_min_p_m']:.2f}"
        + ("   (runtime.workers=0: per worker = the main process)" if int(row["workers"]) == 0 else ""),
    ])
