"""Generated ImageFolder trees: for tests, the demo of ``rtl pretrain`` and ``rtl bench-pretrain``.

Each class is a kind of pattern (stripes at one of three angles, a checkerboard, discs, squares, triangles, a
dot grid) in random colours, scale and position over a noisy background, so the classes are learnable and
not trivially separable by colour. Images come in the sizes given (``sizes``, cycled) as JPEG (quality 90)
and, every ``png_every``-th image, PNG: the mix an ImageNet copy has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("stripes_h", "stripes_v", "stripes_d", "checker", "discs", "squares", "triangles", "dots")


def pattern(kind: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    period = int(rng.integers(max(6, min(w, h) // 16), max(8, min(w, h) // 5)))
    if kind.startswith("stripes"):
        big = max(w, h) * 2
        for x in range(-big, big, period):
            if kind == "stripes_h":
                d.rectangle([0, x, w, x + period // 2], fill=fg)
            elif kind == "stripes_v":
                d.rectangle([x, 0, x + period // 2, h], fill=fg)
            else:
                d.polygon([(x, 0), (x + period // 2, 0), (x + period // 2 + h, h), (x + h, h)], fill=fg)
    elif kind == "checker":
        for y in range(0, h, period):
            for x in range(0, w, period):
                if (x // period + y // period) % 2 == 0:
                    d.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    elif kind == "dots":
        r = max(1, period // 5)
        for y in range(period // 2, h, period):
            for x in range(period // 2, w, period):
                d.ellipse([x - r, y - r, x + r, y + r], fill=fg)
    else:
        for _ in range(int(rng.integers(3, 8))):
            r = int(rng.integers(min(w, h) // 12, min(w, h) // 4))
            cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            if kind == "discs":
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif kind == "squares":
                d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    noise = rng.normal(0, 12, (h, w, 3))
    array = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(array).filter(ImageFilter.GaussianBlur(0.6))


def make_imagefolder(root: str | Path, classes: int = 8, train_per_class: int = 50, val_per_class: int = 10,
                     sizes: tuple[tuple[int, int], ...] = ((160, 120), (128, 128), (200, 150), (120, 180)),
                     png_every: int = 5, seed: int = 0) -> Path:
    """Write ``root/train/<class>/`` and ``root/val/<class>/``; returns root."""
    if classes > len(KINDS):
        raise ValueError(f"at most {len(KINDS)} pattern classes")
    root = Path(root)
    rng = np.random.default_rng(seed)
    n = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"{c:02d}_{KINDS[c]}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = pattern(KINDS[c], sizes[n % len(sizes)], rng)
                if png_every and n % png_every == png_every - 1:
                    img.save(folder / f"{split}_{c}_{i}.png")
                else:
                    img.save(folder / f"{split}_{c}_{i}.JPEG", quality=90)
                n += 1
    return root


# ImageNet's typical shapes: 500x375 (landscape 4:3), 375x500 (portrait) and 500x333 (3:2).
IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333))


def make_jpeg_folder(root: str | Path, n: int, sizes: tuple[tuple[int, int], ...] = IMAGENET_SIZES,
                     quality: int = 90, classes: int = 8, val_per_class: int = 1, seed: int = 0) -> Path:
    """Write ``n`` JPEGs (``sizes`` cycled, ``quality``) over ``classes`` folders of ``root/train/`` and
    ``val_per_class`` small ones per class in ``root/val/`` (index_folder needs a val/ tree); returns root."""
    if classes > len(KINDS):
        raise ValueError(f"at most {len(KINDS)} pattern classes")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for split in ("train", "val"):
            (root / split / f"{c:02d}_{KINDS[c]}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % classes
        img = pattern(KINDS[c], sizes[i % len(sizes)], rng)
        img.save(root / "train" / f"{c:02d}_{KINDS[c]}" / f"train_{c}_{i:06d}.JPEG", quality=quality)
    for c in range(classes):
        for i in range(val_per_class):
            img = pattern(KINDS[c], (128, 96), rng)
            img.save(root / "val" / f"{c:02d}_{KINDS[c]}" / f"val_{c}_{i}.JPEG", quality=quality)
    return root
