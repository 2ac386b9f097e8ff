"""``rtl bench-pretrain``: is the pretraining input pipeline fast enough to keep the model busy?

    rtl bench-pretrain model=cbr_small data.image_size=224 recipe.batch_size=64 runtime.workers=8

It times, in images/s: (p) the pretraining loader alone (decode, crop, flip, batch in worker processes),
(n) a plain torchvision ImageFolder loader with the same workers, (m) the model step alone on one batch held on
the device, and (loop) rtl pretrain's own epoch (pretrain.setup and pretrain.train_epoch). On generated
ImageNet-like JPEGs (folders.py) unless data.root names a tree.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from ..atomic_io import write_csv
from ..config import validate
from ..engine import configure_device, device_name, maybe_compile, resolve_precision, train_step
from ..errors import UserError
from ..models import build_model, check_image_size, check_model_keys
from .loop import fp32_name, sync

log = logging.getLogger(__name__)


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

    from ..data.imagefolder import EXTENSIONS
    from .folders import make_jpeg_folder

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
    from ..data.imagefolder import EpochBatches, FolderImages, loader

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
        raise UserError(f"the plain torchvision loader could not read an image of {index.root}/train: "
                        f"{reason}") from None


def model_alone(cfg, num_classes: int, device, precision, warmup: int, steps: int) -> float:
    """(m) images/s of rtl pretrain's step (engine.train_step: forward, label-smoothed cross-entropy, backward,
    SGD) on one normalised float batch already on the device."""
    from ..pretrain import make_optimizer, recipe_loss

    rc, rec = cfg.runtime, cfg.recipe
    size, bs = int(cfg.data.image_size), int(rec.batch_size)
    torch.manual_seed(int(rec.seed))
    model = build_model(cfg.model, num_labels=num_classes, image_size=size)
    check_image_size(model, size)
    fmt = torch.channels_last if rc.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    step_model = maybe_compile(model, rc)
    optimizer = make_optimizer(model, rec, float(rec.lr_per_256) * bs / 256)
    loss_fn = recipe_loss(rec)
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (bs,), device=device)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        train_step(step_model, [(x, y)], optimizer, loss_fn, precision)
    sync(device)
    return steps * bs / (time.perf_counter() - t0)


class _NoStop:
    requested = False


def whole_loop(cfg, batches: int) -> float:
    """(loop) images/s of rtl pretrain's own epoch (pretrain.setup and pretrain.train_epoch): one step of an
    epoch untimed (starts the workers), then ``batches`` steps of the next epoch timed, from a fresh iterator
    over the running workers."""
    from ..data.imagefolder import loader
    from ..distributed import Processes
    from ..engine import EpochProgress
    from ..pretrain import new_state, recipe_loss, setup, train_epoch

    s = setup(cfg, Processes())
    steps = s.batches.steps_per_epoch()
    state = new_state(cfg, s)
    loss_fn = recipe_loss(cfg.recipe)
    dl = loader(s.train_set, s.batches, s.workers, int(cfg.runtime.prefetch), s.device.type == "cuda")
    try:
        train_epoch(s, dl, state.optimizer, state.scheduler, loss_fn, EpochProgress(epoch=1, step=steps - 1),
                    _NoStop(), False)
        sync(s.device)
        progress = EpochProgress(epoch=2, step=steps - batches)
        t0 = time.perf_counter()
        train_epoch(s, dl, state.optimizer, state.scheduler, loss_fn, progress, _NoStop(), False)
        sync(s.device)
        return progress.seen / (time.perf_counter() - t0)
    finally:
        del dl


def run_pipeline_bench(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """rtl bench-pretrain: (p) the pretraining loader alone, (n) a plain torchvision ImageFolder loader with the
    same workers, (m) the model step alone and (loop) rtl pretrain's epoch, in images/s; writes
    ``out_dir/bench_pretrain.csv`` and returns its row."""
    import copy

    from omegaconf import open_dict

    from ..data.imagefolder import index_folder

    validate(cfg)
    check_model_keys(cfg.model)
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
