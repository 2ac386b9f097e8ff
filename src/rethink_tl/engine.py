"""The shared engine: device and precision, batch preprocessing, the train step, one epoch, predicted
probabilities and their scores. ``rtl train`` (train.py), ``rtl pretrain`` (pretrain.py, which shares the
train step) and ``rtl bench`` use exactly this code, so what the benchmark times is what a run does.

Two rules keep a GPU busy: nothing here waits for the device inside an epoch (no ``.item()``, no
CPU-indexed gather from device memory, no pageable host-to-device copy), and every random draw comes
from a generator seeded by (seed, epoch), so a run resumed mid-epoch sees the same batches it would
have seen without the break.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data.base import Split
from .errors import UserError
from .metrics import Scores, score

log = logging.getLogger(__name__)


# --- device and precision ---------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"runtime.device={name} but no CUDA device is available: use runtime.device=cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"runtime.device={name} but this machine sees {torch.cuda.device_count()} GPU(s): "
                            f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
        return device
    if name != "cpu":
        raise UserError(f"runtime.device must be auto, cpu or cuda[:N], got {name}")
    return torch.device("cpu")


def configure_device(rc) -> torch.device:
    """Pick the device (``runtime.device``) and set the process-wide switches that make it fast."""
    if rc.threads:
        torch.set_num_threads(int(rc.threads))
    device = pick_device(str(rc.device))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # Everything that uses "the current GPU" (synchronize, capability checks, new contexts) must
        # mean this one, not GPU 0.
        torch.cuda.set_device(device)
        # Fixed input shapes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = bool(rc.cudnn_benchmark)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}threads"


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (Ampere, compute capability 8.0, and later).

    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated (V100, T4), which is
    slower than fp16 with a grad scaler; and it asks about the current GPU, not ``device``.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """``runtime.amp``: auto (bf16 on GPUs with native bf16, else fp16; fp32 on CPU), bf16, fp16 or off."""
    amp = str(amp).lower()
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise UserError(f"runtime.amp must be auto, bf16, fp16 or off, got {amp}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return Precision()
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "fp16"
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("runtime.amp=fp16 needs a CUDA device; use runtime.amp=bf16 or off on CPU")
        return Precision(torch.float16, torch.amp.GradScaler("cuda"))
    return Precision(torch.bfloat16)


def maybe_compile(model: torch.nn.Module, rc) -> torch.nn.Module:
    """``runtime.compile=true``: the compiled module shares parameters with ``model``, so checkpoints stay plain."""
    return torch.compile(model) if rc.compile else model


def move_to_device(data, device: torch.device, max_share: float) -> bool:
    """Keep the uint8 splits on the GPU when they take at most ``max_share`` of its free memory; return
    whether they moved.

    Then a batch is an index into device memory: no host gather, no copy, nothing for the input
    pipeline to fall behind on. Larger datasets stay in host memory and are copied per batch.
    """
    if max_share <= 0 or device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(s.images.numel() for s in data.splits().values())
    if need > max_share * free:
        log.info("dataset (%.1f GB uint8) stays in host memory: more than %.0f%% of free GPU memory",
                 need / 1e9, 100 * max_share)
        return False
    for split in data.splits().values():
        split.images = split.images.to(device)  # labels stay on the host: metrics are computed there
    return True


# --- random state -----------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Data order and augmentation depend only on (seed, epoch), never on what ran before.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators a run uses, in a form torch.load(weights_only=True) accepts: Python's,
    numpy's, torch's CPU generator and, on a GPU, that GPU's generator only (not every visible GPU's:
    the checkpoint must resume on a machine that sees fewer GPUs, or none)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss)}
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    if device.type == "cuda" and state.get("device") is not None:
        torch.cuda.set_rng_state(state["device"], device)
    # A CPU checkpoint resumed on a GPU (or the reverse) has no generator for the new device; nothing
    # in training draws from it (data order and augmentation come from the CPU epoch generator).


# --- optimiser and loss -----------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, tc) -> tuple[torch.optim.Optimizer,
                                                     torch.optim.lr_scheduler.ReduceLROnPlateau]:
    """Adam, and a scheduler that multiplies the lr by ``lr_factor`` when validation AUPRC stops rising.

    On a GPU the fused Adam kernel: besides being faster, it lets fp16's GradScaler skip a step on
    overflow on the device, where the unfused path asks the host (a sync per step)."""
    fused = all(p.is_cuda for p in model.parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=float(tc.lr), weight_decay=float(tc.weight_decay),
                                 fused=fused or None)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=float(tc.lr_factor),
                                                           patience=int(tc.patience))
    return optimizer, scheduler


def masked_bce(pos_weight: torch.Tensor | None):
    def loss_fn(logits, y, m):
        per = F.binary_cross_entropy_with_logits(logits, y, reduction="none", pos_weight=pos_weight)
        m = m.float()
        return (per * m).sum() / m.sum().clamp_min(1.0)

    return loss_fn


# --- batches ----------------------------------------------------------------------------------------

@dataclass
class Batcher:
    """Turns uint8 images into normalised float batches on the device, with optional augmentation.

    All randomness comes from a generator the caller seeds per epoch, so a run resumed at
    epoch k sees exactly the batches and augmentations it would have seen without the break.
    """

    mean: torch.Tensor  # (1, C, 1, 1) on device: C = the model's input channels (ModelInfo.in_chans)
    std: torch.Tensor
    device: torch.device
    channels_last: bool
    rotate_degrees: float = 0.0
    scale_jitter: float = 0.0

    def __post_init__(self) -> None:
        # (x - mean) / std = x * scale + shift: computed once here, not in every batch.
        self.scale, self.shift = 1.0 / self.std, -self.mean / self.std

    @classmethod
    def for_model(cls, info, device: torch.device, channels_last: bool, rotate_degrees: float = 0.0,
                  scale_jitter: float = 0.0) -> "Batcher":
        """The batcher that normalises as ``info`` (a model's ModelInfo: its in_chans, mean and std) says."""
        mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
        return cls(mean, std, device, bool(channels_last), float(rotate_degrees), float(scale_jitter))

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
        n, stored, h, w = x.shape
        chans = self.mean.shape[1]
        if stored != chans and chans == 1:
            # A colour image for a grey network becomes the mean of its channels, as torchxrayvision's
            # own example does (img.mean(2)); a grey image stored as RGB keeps its values.
            x = x.mean(dim=1, keepdim=True)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((n, chans, h, w), device=x.device, memory_format=fmt)
        # (x - mean) / std as one fused pass written straight into the output in its final memory format: a
        # grayscale X-ray is broadcast to the 3 channels an ImageNet network expects instead of being expanded,
        # normalised and then copied again.
        return torch.addcmul(self.shift, x.expand(n, chans, h, w), self.scale, out=out)

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(self.rotate_degrees)
        scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * self.scale_jitter
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        # Drawn on the CPU from the epoch generator (exact resume), then sent pinned and non-blocking.
        grid = F.affine_grid(self.to_device(theta), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def make_batchers(info, tc, rc, device: torch.device) -> tuple[Batcher, Batcher]:
    """(training batcher with the protocol's augmentation, evaluation batcher without)."""
    train = Batcher.for_model(info, device, rc.channels_last, tc.rotate_degrees, tc.scale_jitter)
    return train, Batcher(train.mean, train.std, device, train.channels_last)


# --- train, predict, evaluate -----------------------------------------------------------------------

@dataclass
class EpochProgress:
    """Where a training epoch stands, so that one cut short by a signal can continue exactly."""

    epoch: int = 1
    step: int = 0  # optimiser steps done in this epoch
    loss_sum: float = 0.0  # sum over the images seen of their loss (this process's)
    seen: int = 0  # images trained on in this epoch (this process's)
    gen_state: torch.Tensor | None = None  # rtl train: the epoch generator after `step` batches
    lr: float = float("nan")  # rtl pretrain: the lr at the epoch's first step, kept across a resume in the epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "loss_sum": self.loss_sum, "seen": self.seen,
                "gen_state": self.gen_state, "lr": self.lr}


class NonFiniteLoss(UserError):
    pass


@contextlib.contextmanager
def batchnorm_statistics_kept(model: torch.nn.Module, keep: bool):
    """A forward pass that leaves BatchNorm's running statistics as they were. Forward passes after the first of
    an accumulated step use it: a step of 2 forward passes then keeps the statistics of the first, as
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


def train_step(model, passes: Sequence[tuple[torch.Tensor, ...]], optimizer, loss_fn,
               precision: Precision) -> torch.Tensor:
    """One optimiser step: forward, loss and backward for each of ``passes`` (``(x, *targets)`` each, on the
    device), then the update: the model's own work, which the loop around it should not slow.

    Several passes accumulate their gradients (each loss scaled by 1/k, so the step equals one pass over the
    whole batch), with DistributedDataParallel's gradient exchange only after the last (``no_sync``) and
    BatchNorm statistics from the first pass only. Returns the (k,) losses, detached and on the device:
    reading them on the host would be a sync point per step."""
    k = len(passes)
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for i, (x, *targets) in enumerate(passes):
        exchange = contextlib.nullcontext() if i == k - 1 or not hasattr(model, "no_sync") else model.no_sync()
        with exchange, batchnorm_statistics_kept(model, keep=i > 0):
            with precision.autocast(x.device):
                logits = model(x)
            loss = loss_fn(logits.float(), *targets)
            scaled = loss / k if k > 1 else loss
            (precision.scaler.scale(scaled) if precision.scaler is not None else scaled).backward()
        losses.append(loss.detach())
    if precision.scaler is not None:
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        optimizer.step()
    return torch.stack(losses)


def first_non_finite(losses: torch.Tensor, step: int, first_bad: torch.Tensor) -> torch.Tensor:
    """``first_bad`` (a device scalar, -1 while none) set to ``step`` at the first step with a NaN or infinite
    loss, without asking the host."""
    return torch.where((first_bad < 0) & ~torch.isfinite(losses).all(), step, first_bad)


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
    # Images held in GPU memory are indexed with a GPU copy of the order, made once per epoch: a CPU
    # index into a CUDA tensor is copied over with a blocking copy at every step. Labels and masks live
    # on the host and keep the CPU index.
    image_order = order.to(split.images.device, non_blocking=True) if split.images.device != order.device else order
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
        x = batcher(split.images[image_order[start:start + batch_size]], gen)
        y = batcher.to_device(split.labels[idx])
        m = batcher.to_device(split.mask[idx])
        loss = train_step(model, [(x, y, m)], optimizer, loss_fn, precision)
        # Kept on the device: checking each loss on the host would be a sync point per step.
        first_bad = first_non_finite(loss, step, first_bad)
        total += loss[0].double() * len(idx)
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
def predict_probs(model, split: Split, batcher: Batcher, batch_size: int,
                  precision: Precision | None = None) -> np.ndarray:
    """Sigmoid outputs (N, L) of the model for every image of ``split``, in order."""
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


def score_split(model, split: Split, batcher: Batcher, batch_size: int, labels: list[str], name: str,
                precision: Precision | None = None) -> Scores:
    """The metrics of the model's predictions on ``split`` (metrics.score)."""
    probs = predict_probs(model, split, batcher, batch_size, precision)
    return score(split.labels.numpy(), probs, labels, mask=split.mask.numpy(), split=name)
