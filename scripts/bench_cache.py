"""Decode-once cache vs decoding every epoch, in images per second.

    .venv/bin/python scripts/bench_cache.py                  # 2,000 JPEGs of 512 x 512 -> 224 px
    .venv/bin/python scripts/bench_cache.py --n 500 --size 128 --workers 4

Writes the JPEGs (smooth grey films with fine grain, quality 90) to a temporary folder, then times:
  decode        PIL decode + resize of every image, i.e. what each epoch costs without a cache,
                with 1 thread and with --workers threads;
  cache build   the first run: the same decoding plus writing the uint8 memmap;
  cache read    every later run: the cached images into a uint8 tensor in memory (warm page cache).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rethink_tl.data.cache import load_images


def write_films(folder: Path, n: int, size: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(40, 220, (16, 16), dtype=np.uint8)).resize((size, size),
                                                                                          Image.Resampling.BICUBIC)
        grain = rng.normal(0, 6, (size, size))
        film = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(film).save(path, quality=90)
        paths.append(str(path))
    return paths


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="number of images")
    parser.add_argument("--source-size", type=int, default=512, help="side of the JPEGs written")
    parser.add_argument("--size", type=int, default=224, help="data.image_size")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding threads")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_films(tmp / "img", args.n, args.source_size)
        base = {"image_size": args.size, "channels": "1", "cache_dir": str(tmp / "cache")}
        rows = []
        for workers in sorted({1, args.workers}):
            cfg = {**base, "cache": False, "workers": workers}
            seconds = timed(lambda cfg=cfg: load_images(paths, cfg, label="bench", anchor=tmp).take(np.arange(args.n)))
            rows.append((f"decode every epoch, {workers} thread(s)", seconds))
        cfg = {**base, "workers": args.workers}
        rows.append((f"cache build (first run), {args.workers} thread(s)",
                     timed(lambda: load_images(paths, cfg, label="bench", anchor=tmp))))
        reads = [timed(lambda: load_images(paths, cfg, label="bench", anchor=tmp).take(np.arange(args.n)))
                 for _ in range(3)]
        rows.append(("cache read (later runs), best of 3", min(reads)))

    print(f"{args.n} JPEGs {args.source_size}x{args.source_size} -> {args.size} px, {os.cpu_count()} CPUs")
    decode = rows[0][1]
    for name, seconds in rows:
        print(f"  {name:<45} {seconds:7.2f} s  {args.n / seconds:9.0f} images/s  ({decode / seconds:5.1f}x)")


if __name__ == "__main__":
    main()
