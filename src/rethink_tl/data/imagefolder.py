"""The input pipeline of ``rtl pretrain``: an ImageFolder tree (``root/train/<class>/*``, ``root/val/<class>/*``,
the ImageNet layout), streamed from disk by worker processes.

Where the time goes, measured on 500x375 JPEGs (README: "Pretraining"): decoding is most of it, so each worker
decodes with libjpeg-turbo through ``torchvision.io.decode_image`` (no PIL image object; PIL only as a fallback
for what it cannot read), crops before it resizes (the crop is a view, and the antialiased uint8 resize of
``transforms.v2.functional`` touches only the crop) and hands uint8 to the main process: a quarter of the bytes
of float32 through the worker queue, pinned for an asynchronous copy. Conversion to float and normalisation
happen once per batch on the device (``engine.Batcher``), never per image in Python.

Augmentation is drawn per image from a generator seeded by (seed, epoch, image index), so a batch is the same
whichever worker or process makes it: a resumed run, a run with more workers and a run on more GPUs with the
same global batch all see the same crops.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import RandomResizedCrop

from ..errors import UserError
from .dicom import DicomError, is_dicom, read_dicom

# torchvision 0.29 points to TorchCodec for decoding; its decoders still ship and are what rtl pins and measures.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

# What torchvision's ImageFolder reads (IMG_EXTENSIONS), compared lower-case (ImageNet's .JPEG too); .jpe and
# .jfif beside them. Other files (README.txt, .DS_Store) are left out, counted and named in the log.
EXTENSIONS = tuple(sorted(set(IMG_EXTENSIONS) | {".jpe", ".jfif"}))
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratios (Szegedy et al. 2015)


log = logging.getLogger(__name__)


class BadImage(UserError):
    pass


@dataclass
class FolderIndex:
    """The images of an ImageFolder tree: (path, class index) per split, classes in sorted order."""

    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]

    def fingerprint(self) -> str:
        """A hash of the class names and of every image's path relative to root and its class (no file is
        opened: ImageNet has 1.33M files)."""
        h = hashlib.sha256()
        for split, samples in (("train", self.train), ("val", self.val)):
            h.update(f"{split}\n".encode())
            for path, label in samples:
                h.update(f"{os.path.relpath(path, self.root)}\t{self.classes[label]}\n".encode())
        return h.hexdigest()[:16]


def index_folder(root: Any) -> FolderIndex:
    """List the tree, with one clear error for each way it can be wrong."""
    if root is None or not str(root).strip():
        raise UserError("data.root is not set: give the folder that holds train/<class>/ and val/<class>/, e.g. "
                        "rtl pretrain data.root=/data/imagenet")
    root = Path(os.path.expanduser(str(root))).resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"data.root={root} is a file, not a folder: give the folder that holds train/<class>/ and "
                        "val/<class>/")
    if not root.is_dir():
        raise UserError(f"data.root={root}: no such folder")
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise UserError(f"{root} has no {split}/ folder: rtl pretrain reads the ImageNet layout, "
                            f"{root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG (val sorted into class "
                            "folders too)")
        try:
            classes[split] = find_classes(str(folder))[0]
        except FileNotFoundError:
            raise UserError(f"{folder} has no class folders (expected {folder}/<class>/<image>)") from None
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        parts = [f"{len(names)} only in {split}/ ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
                 for split, names in (("train", only_train), ("val", only_val)) if names]
        raise UserError(f"the class folders of {root}/train and {root}/val differ: {'; '.join(parts)}; both must "
                        "hold the same classes")
    names = classes["train"]
    if len(names) < 2:
        raise UserError(f"{root}/train has {len(names)} class folder: classification needs at least 2")
    to_index = {c: i for i, c in enumerate(names)}
    samples = {}
    for split in ("train", "val"):
        _refuse_linked_folders(root / split, names)
        skipped: list[str] = []

        def is_image(path: str, skipped=skipped) -> bool:
            if path.lower().endswith(EXTENSIONS) or is_dicom(path):
                return True
            skipped.append(path)
            return False

        try:
            samples[split] = make_dataset(str(root / split), to_index, is_valid_file=is_image)
        except FileNotFoundError as err:  # torchvision names the class folders without any image
            raise UserError(f"{root / split}: {str(err).splitlines()[0]} (images must end in "
                            f"{', '.join(EXTENSIONS)}, any case, or be DICOM files)") from None
        if skipped:
            log.warning("%s: %d file(s) are not images by their extension and are left out, e.g. %s", root / split,
                        len(skipped), ", ".join(os.path.relpath(p, root) for p in skipped[:3]))
    return FolderIndex(root, names, samples["train"], samples["val"])


def _refuse_linked_folders(folder: Path, classes: list[str]) -> None:
    """torchvision follows symbolic links to folders: a link inside a class folder (to itself: the same images
    many times over; to another class: the same images under two labels) would change the data without a word.
    A class folder that is itself a link (to another disk) is fine, unless two of them lead to one folder."""
    real: dict[str, str] = {}
    for name in classes:
        target = os.path.realpath(folder / name)
        if target in real:
            raise UserError(f"{folder}/{name} and {folder}/{real[target]} are the same folder ({target}): each class "
                            "needs its own images")
        real[target] = name
        for dirpath, dirnames, _ in os.walk(folder / name):  # links are listed, not followed
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            if links:
                raise UserError(f"{os.path.join(dirpath, links[0])} is a link to a folder inside a class folder: "
                                "rtl pretrain does not follow such links (they repeat images or give them a second "
                                "class); copy the images or link the files instead")


def read_rgb(path: str) -> torch.Tensor:
    """uint8 (3, H, W). JPEG and PNG through torchvision's decoders; whatever they refuse (a CMYK JPEG of an old
    libjpeg, an odd PNG) through PIL; DICOM through pydicom (data/dicom.py: modality LUT, window, MONOCHROME1
    inverted); a file none can read is a BadImage naming it."""
    if is_dicom(path):
        try:
            array = read_dicom(path)
        except DicomError as err:
            raise BadImage(f"cannot read image {path}: {err}; replace or remove it") from None
        array = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    try:
        image = decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        image = _read_with_pil(path)
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


def _read_with_pil(path: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise BadImage(f"cannot read image {path}: {err}; replace or remove it") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1, np.uint64)[0])


class FolderImages(Dataset):
    """Training items are keyed (epoch, index): random crop and flip, drawn from the image's own seed.
    Validation items are keyed by index: shorter side to ``val_resize``, centre ``size`` crop.
    Each item is (uint8 (3, size, size), class); an unreadable file gives class -1 - index, which the
    main process turns into an error naming the file (an exception in a worker would arrive as a traceback)."""

    def __init__(self, samples: list[tuple[str, int]], size: int, *, train: bool, seed: int = 0,
                 min_scale: float = 0.08, flip: bool = True, val_resize: int = 256):
        self.samples, self.size, self.train, self.seed = samples, size, train, seed
        self.scale, self.flip, self.val_resize = (min_scale, 1.0), flip, val_resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        epoch, index = key if self.train else (0, key)
        path, label = self.samples[index]
        try:
            image = read_rgb(path)
        except BadImage:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1 - index
        return self.transform(image, epoch, index), label

    def transform(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        if not self.train:
            image = TF.resize(image, [self.val_resize], antialias=True)
            return TF.center_crop(image, [self.size, self.size])
        with torch.random.fork_rng(devices=[]):  # the process's own generator is left as it was
            # The CPU generator only: torch.manual_seed would also queue seeds for every GPU API (measured:
            # 0.13-0.2 ms an image, as much as the resize).
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            top, left, h, w = RandomResizedCrop.get_params(image, list(self.scale), list(RATIO))
            flip = self.flip and bool(torch.rand(1) < 0.5)
        # The decoder's output is channels-last; a crop of it is a strided view, which the antialiased resize
        # reads slowly. Made dense in that layout first, the resize takes 0.14 ms instead of 0.23 (same pixels).
        crop = image[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
        image = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        return TF.horizontal_flip(image) if flip else image

    def bad_image_error(self, labels: torch.Tensor) -> BadImage:
        """The error for the first unreadable image of a batch (read again here, for its reason)."""
        index = -1 - int(labels[labels < 0][0])
        path = self.samples[index][0]
        try:
            read_rgb(path)
        except BadImage as err:
            return err
        return BadImage(f"cannot read image {path} in a worker process; replace or remove it")


class EpochBatches:
    """The batches one process trains on in an epoch, from ``step`` on (a resumed epoch skips what is done).

    The epoch's permutation is DistributedSampler's (seeded by seed + epoch), split over ``processes x
    accumulate`` replicas: forward pass ``a`` of this process reads replica ``rank x accumulate + a``. So two
    processes with accumulate=1 and one process with accumulate=2 train on exactly the same batches.
    """

    def __init__(self, dataset: FolderImages, batch_size: int, rank: int, processes: int, accumulate: int,
                 seed: int):
        self.dataset, self.batch_size, self.accumulate = dataset, batch_size, accumulate
        replicas = processes * accumulate
        self.samplers = [DistributedSampler(dataset, num_replicas=replicas, rank=rank * accumulate + a,
                                            shuffle=True, seed=seed, drop_last=False) for a in range(accumulate)]
        self.epoch, self.step = 1, 0

    def steps_per_epoch(self) -> int:
        return len(self.samplers[0]) // self.batch_size  # the last incomplete step is dropped

    def set(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        orders = []
        for sampler in self.samplers:
            sampler.set_epoch(self.epoch)
            orders.append(list(sampler))
        bs = self.batch_size
        for step in range(self.step, self.steps_per_epoch()):
            for order in orders:
                yield [(self.epoch, i) for i in order[step * bs:(step + 1) * bs]]

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.step) * self.accumulate


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one decoding process per core; intra-op threads would only compete


def collate_channels_last(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (3, S, S) uint8 images of any memory layout into one channels-last (N, 3, S, S) batch: stacking
    channels-last items as (S, S, 3) is a plain copy (4 us an image instead of 83); engine.Batcher writes its
    output in the model's layout whatever the input's."""
    images, labels = zip(*items)
    batch = default_collate([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)
    return batch, torch.as_tensor(labels, dtype=torch.int64)


def loader(dataset: Dataset, batch_sampler, workers: int, prefetch: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin,
                      prefetch_factor=prefetch if workers else None, persistent_workers=workers > 0,
                      worker_init_fn=_worker_init if workers else None, collate_fn=collate_channels_last)


def val_batches(n: int, batch_size: int, rank: int, processes: int) -> list[list[int]]:
    """This process's share of the validation images (every ``processes``-th, none repeated)."""
    mine = list(range(rank, n, processes))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
