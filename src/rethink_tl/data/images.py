"""Decoding one image file into the square uint8 array the training loop wants.

Grey levels: 8-bit images are kept as they are. 16-bit (and 32-bit int / float) images are
mapped to 0..255 without clipping: by default each image's own min..max (``rescale16=minmax``)
because X-ray PNGs usually carry 10-14 significant bits in a 16-bit container, so dividing by 257
would leave them nearly black; ``rescale16=full`` divides the full 0..65535 range by 257 instead,
for data sets whose absolute 16-bit values mean the same thing in every image.

Channels: ``channels=1`` stores luminance (ITU-R 601, PIL's ``convert("L")``) — X-rays are grey
even when saved as RGB, and the model replicates one channel to three on the device anyway;
``channels=3`` stores RGB (grey images replicated). ``auto`` is resolved by the caller from the
file headers (see ``header_channels``): 3 only if some image is stored in a colour mode.

Geometry (``resize``): ``crop`` (default, as the paper: "cropped and resized to 224x224") scales
the short side to the target and cuts the centre square; ``pad`` scales the long side to the target
and pads the short side with black, so nothing at the edge of the film (costophrenic angles, apices)
is cut away; ``stretch`` ignores the aspect ratio (what a plain ``Resize((S, S))`` does).

DICOM files (``.dcm``, ``.dicom`` or the DICM marker) are read with pydicom through the display chain of
``dicom.py`` (modality LUT, ``dicom_window``, MONOCHROME1 inverted); the geometry and channels are the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import dicom

# Modes whose samples do not fit in 8 bits and need an explicit rescale.
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
_GREY_MODES = {"1", "L", "LA", "La", "I", "F", *_WIDE_MODES}

# Errors PIL raises for files that are not (complete, valid) images; anything else is a bug.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageSpec:
    """How every image of a data set is turned into an array; part of the cache key."""

    size: int
    resize: str  # crop | pad | stretch; no default here: the one default is data.resize's (config.py)
    channels: int = 1  # 1 or 3 (``auto`` is resolved before decoding)
    rescale16: str = "minmax"
    dicom_window: str = "auto"  # DICOM files only: auto | minmax | none (dicom.py)
    dicom_frame: Optional[int] = None  # DICOM files only: the frame of a multi-frame file (None: refuse them)

    def key(self) -> str:
        return f"{self.size}|{self.resize}|{self.channels}|{self.rescale16}|{self.dicom_window}|{self.dicom_frame}"


def unreadable_reason(err: Exception) -> str:
    """Why a file that PIL raised ``err`` (one of DECODE_ERRORS) for cannot be used, in a few words."""
    if isinstance(err, UnidentifiedImageError):  # its text repeats the whole path
        return "unreadable: not an image file PIL can identify"
    return f"unreadable: {err}"


def file_channels(path: str) -> int | str:
    """1 or 3 (the file's channels, from its header), or why the file cannot be used."""
    if not os.path.exists(path):
        return "missing"
    if not os.path.isfile(path):
        return "not a file"
    try:
        return header_channels(path)
    except DECODE_ERRORS as err:
        return unreadable_reason(err)


def channels_of_files(paths) -> int | None:
    """What ``channels=auto`` resolves to for these files: 3 if any readable one is colour (it stops at the
    first), else 1; None when none can be read."""
    found = None
    for path in paths:
        got = file_channels(path)
        if got == 3:
            return 3
        if got == 1:
            found = 1
    return found


def header_channels(path: str) -> int:
    """1 for a grey-level file, 3 for a colour one, from the header alone (no pixel decoding)."""
    if dicom.is_dicom(path):
        return dicom.header_channels(path)
    with Image.open(path) as img:
        if img.mode == "P":
            # A palette image is grey only if every palette entry has R == G == B.
            pal = np.asarray(img.getpalette() or [0, 0, 0]).reshape(-1, 3)
            return 1 if (pal == pal[:, :1]).all() else 3
        return 1 if img.mode in _GREY_MODES else 3


def _to_8bit(img: Image.Image, rescale16: str) -> Image.Image:
    a = np.asarray(img)
    if a.ndim == 3:  # e.g. a 16-bit RGB(A) array decoded by a plugin: keep the colour planes
        a = a[..., :3]
    if img.mode == "F" or rescale16 == "minmax":
        a = a.astype(np.float32)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    else:
        scaled = a.astype(np.float32) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8))


def decode_image(path: str, spec: ImageSpec) -> np.ndarray:
    """Read ``path`` and return uint8 ``(spec.channels, spec.size, spec.size)``.

    Raises one of ``DECODE_ERRORS`` for a missing, truncated or otherwise unreadable file.
    """
    size = (spec.size, spec.size)
    target = "L" if spec.channels == 1 else "RGB"
    if dicom.is_dicom(path):
        img = Image.fromarray(dicom.read_dicom(path, spec.dicom_window, spec.dicom_frame))
        return _geometry(img.convert(target) if img.mode != target else img, spec)
    with Image.open(path) as img:
        # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much
        # smaller (the result is never below the target size); it is most of the speed-up on
        # full-resolution X-rays.
        img.draft(target, size)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # phone photos of films carry a rotation tag
        if img.mode in _WIDE_MODES:
            img = _to_8bit(img, spec.rescale16)
        if img.mode != target:
            img = img.convert(target)
    return _geometry(img, spec)


def _geometry(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    size = (spec.size, spec.size)
    if spec.resize == "pad":
        img = ImageOps.pad(img, size, method=Image.Resampling.BICUBIC, color=0)
    elif spec.resize == "crop":
        img = ImageOps.fit(img, size, method=Image.Resampling.BICUBIC)
    else:
        img = img.resize(size, Image.Resampling.BICUBIC)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
