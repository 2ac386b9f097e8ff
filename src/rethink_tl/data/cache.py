"""Decode-once image cache: every image is decoded and resized once, later runs read uint8 arrays.

Layout, under ``cache_dir`` (see ``default_cache_dir``)::

    <label>-<settings hash>-<content hash>/
        images.npy     uint8 (U, C, S, S), one row per distinct source file, read memory-mapped
        sources.csv    path, bytes, mtime_ns, ok, reason: what each row was made from
        index.json     settings, counts, resolved channel count (written last)

The content hash covers every source path with its size and modification time, plus the
decoding settings (image size, resize mode, channel mode, 16-bit rescale), so changing a file,
adding one or changing the size selects another entry. A new entry reuses the rows of an older
entry with the same label and settings whose file is unchanged (same path, size and mtime), so
touching one file decodes one image again, not the whole data set; the superseded entry (same
files, older stats) is then deleted.

Concurrency: an entry is built in a temporary folder and renamed into place, so a reader sees a
complete entry or none. Builders of the same entry take an ``flock`` on ``<entry>.lock`` so that
the jobs of a sweep starting together decode once and the others wait; where ``flock`` is not
available the rename alone still keeps the cache consistent (some work is then done twice).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import UserError
from . import images as imageio
from .images import DECODE_ERRORS, ImageSpec

try:  # POSIX only; elsewhere concurrent builders rely on the atomic rename alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the decoding itself changes, so old entries are not reused
_SHOW = 5  # bad files named in a message; the rest are counted


@dataclass
class LoadedImages:
    """Decoded images of a list of paths: ``images`` holds one row per distinct path."""

    images: np.ndarray  # uint8 (U, C, S, S); a read-only memmap when cached
    row_index: np.ndarray  # (N,) position in ``images`` of each requested path
    ok: np.ndarray  # bool (N,): False for a missing or unreadable file
    channels: int
    location: Path | None  # cache entry, None when the cache is off

    def take(self, rows: np.ndarray) -> torch.Tensor:
        """uint8 tensor (len(rows), C, S, S), copied into memory."""
        return torch.from_numpy(np.ascontiguousarray(self.images[self.row_index[np.asarray(rows, dtype=np.int64)]]))


def default_cache_dir(anchor: str | os.PathLike) -> Path:
    """``<anchor>/.rtl_cache`` if it can be written, else ``$XDG_CACHE_HOME/rethink_tl`` (``~/.cache``)."""
    candidate = Path(anchor) / ".rtl_cache"
    try:
        candidate.mkdir(exist_ok=True)
        if os.access(candidate, os.W_OK):
            return candidate
    except OSError:
        pass
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rethink_tl"
    log.info("cache: %s is not writable, using %s", candidate, fallback)
    return fallback


def image_spec(cfg) -> tuple[ImageSpec, str]:
    """The decoding settings of a data config, with ``data.channels`` as given (``auto``, 1 or 3)."""
    # resize, rescale16 and on_bad_image are enums and image_size has its range in the schema
    # (config.py); channels is a string there ("1" and "3" are no enum names), so it is checked here.
    size, resize, rescale16 = int(cfg.image_size), str(cfg.resize), str(cfg.rescale16)
    channels = str(cfg.channels)
    if channels not in ("auto", "1", "3"):
        raise UserError(f"data.channels must be auto, 1 or 3, got {channels}")
    return ImageSpec(size=size, resize=resize, channels=1 if channels == "auto" else int(channels),
                     rescale16=rescale16, **dicom_settings(cfg)), channels


def dicom_settings(cfg) -> dict:
    """data.dicom_window / data.dicom_frame as ImageSpec fields (the schema's defaults where a config lacks them)."""
    frame = cfg.get("dicom_frame")
    if frame is not None and int(frame) < 0:
        raise UserError(f"data.dicom_frame must be a frame number (0 is the first) or null, got {frame}")
    return {"dicom_window": str(cfg.get("dicom_window") or "auto"), "dicom_frame": None if frame is None else int(frame)}


def _stat(path: str) -> tuple[int, int] | str:
    """(bytes, mtime_ns) of a regular file, or why it cannot be used."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"cannot stat: {err.strerror or err}"
    if not os.path.isfile(path):
        return "not a file"
    return st.st_size, st.st_mtime_ns


def _pmap(pool: ThreadPoolExecutor, fn, items: Sequence, chunk: int = 64) -> Iterator:
    """``pool.map`` with one future per chunk of items rather than per item (CheXpert has 224k files)."""
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    for part in pool.map(lambda c: [fn(x) for x in c], chunks):
        yield from part


def _hash(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


@contextmanager
def _locked(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path``; yields whether a lock is actually held."""
    if fcntl is None:
        yield False
        return
    with open(lock_path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("cache: another job is building %s, waiting for it", lock_path.with_suffix(""))
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # e.g. a network file system without locks: build without one
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_entry(entry: Path) -> tuple[np.ndarray, pd.DataFrame, dict] | None:
    """A finished entry, or None if there is none (or it vanished while being opened)."""
    try:
        meta = json.loads((entry / "index.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        arr = np.load(entry / "images.npy", mmap_mode="r")
        sources = pd.read_csv(entry / "sources.csv", keep_default_na=False)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return arr, sources, meta


def _listing(problems: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{p} ({why})" for p, why in problems[:_SHOW])
    return shown + (f"; and {len(problems) - _SHOW} more" if len(problems) > _SHOW else "")


def load_images(paths: Sequence[str], cfg, *, label: str, anchor: str | os.PathLike) -> LoadedImages:
    """Decode (or read from the cache) the images at ``paths`` with the settings in ``cfg``.

    Every file is checked before anything is returned: missing and unreadable files are all
    listed in one ``UserError`` (``data.on_bad_image=error``) or dropped with one warning
    (``skip``, see ``LoadedImages.ok``). ``label`` names the cache entry, ``anchor`` is the
    folder the default cache lives next to.
    """
    spec, channel_setting = image_spec(cfg)
    on_bad = str(cfg.on_bad_image)
    workers = int(cfg.workers or min(32, os.cpu_count() or 1))
    codes, uniques = pd.factorize(pd.Series([os.path.abspath(p) for p in paths], dtype=object))
    files = [str(p) for p in uniques]
    if not files:
        raise UserError(f"{label}: the image list is empty")

    with ThreadPoolExecutor(workers) as pool:  # stat is I/O bound: threads hide network-disk latency
        stats = list(_pmap(pool, _stat, files, chunk=256))
    if all(isinstance(s, str) for s in stats):
        raise UserError(f"{label}: none of the {len(files)} image files exists or can be read (first: {files[0]}, "
                        f"{stats[0]}): check data.root / the paths in the CSV")

    use_cache = bool(cfg.cache)
    entry = None
    if use_cache:
        root = Path(cfg["cache_dir"]).expanduser() if cfg.cache_dir else default_cache_dir(anchor)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the image cache folder {root}: {err.strerror}; set data.cache_dir "
                            "to a writable folder or data.cache=false") from None
        settings = _hash(CACHE_VERSION, spec.size, spec.resize, channel_setting, spec.rescale16, spec.dicom_window,
                         spec.dicom_frame)[:8]
        content = _hash(settings, *(f"{f}|{s}" for f, s in zip(files, stats)))[:16]
        prefix = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-{settings}-"
        entry = root / f"{prefix}{content}"
        opened = _open_entry(entry)
        if opened is None:
            with _locked(root / f"{entry.name}.lock") as exclusive:
                opened = _open_entry(entry)  # another job may have finished it while we waited
                if opened is None:
                    _build(entry, prefix, files, stats, spec, channel_setting, workers, exclusive)
                    opened = _open_entry(entry)
            if opened is None:
                raise RuntimeError(f"image cache entry {entry} was not created")
        else:
            log.info("images: %d from cache %s", len(files), entry)
        arr, sources, meta = opened
        ok_u = sources["ok"].to_numpy(dtype=bool)
        reasons = sources["reason"].tolist()
        channels = int(meta["channels"])
    else:
        arr, ok_u, reasons, channels = _decode_all(files, stats, spec, channel_setting, workers, None)

    problems = [(files[i], reasons[i]) for i in np.flatnonzero(~ok_u)]
    if problems:
        if on_bad == "error":
            raise UserError(f"{label}: {len(problems)} of {len(files)} images cannot be used: {_listing(problems)}. "
                            "Fix or remove them, or set data.on_bad_image=skip to leave them out")
        log.warning("%s: skipping %d of %d images that cannot be used (data.on_bad_image=skip): %s", label,
                    len(problems), len(files), _listing(problems))
    return LoadedImages(images=arr, row_index=codes.astype(np.int64), ok=ok_u[codes], channels=channels,
                        location=entry)


def _resolve_channels(files, stats, spec: ImageSpec, setting: str, pool) -> tuple[ImageSpec, dict[int, str]]:
    """Fix ``auto`` channels from the file headers; headers that cannot be read mark the file bad."""
    if setting != "auto":
        return spec, {}
    present = [i for i, s in enumerate(stats) if not isinstance(s, str)]

    def probe(i):
        try:
            return imageio.header_channels(files[i])
        except DECODE_ERRORS as err:
            return imageio.unreadable_reason(err)

    found = list(_pmap(pool, probe, present))
    bad = {i: r for i, r in zip(present, found) if isinstance(r, str)}
    colour = any(r == 3 for r in found)
    return dataclasses.replace(spec, channels=3 if colour else 1), bad


def _decode_all(files, stats, spec, setting, workers, out_path: Path | None, reuse=None):
    """Decode every usable file into a new array (a .npy memmap when ``out_path`` is set).

    ``reuse(arr, channels) -> set of rows`` may fill rows from an older entry first.
    Returns (array, ok, reasons, channels).
    """
    with ThreadPoolExecutor(workers) as pool:
        spec, header_bad = _resolve_channels(files, stats, spec, setting, pool)
        shape = (len(files), spec.channels, spec.size, spec.size)
        if out_path is None:
            arr = np.zeros(shape, dtype=np.uint8)
        else:
            arr = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=shape)
            # The memmap file is sparse: on a full disk, writing its pages would kill the process with
            # SIGBUS. Reserving the blocks now turns that into an ENOSPC error here, before any decoding.
            with open(out_path, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), 0, os.path.getsize(out_path))
        reasons = [s if isinstance(s, str) else header_bad.get(i, "") for i, s in enumerate(stats)]
        done = reuse(arr, spec.channels) if reuse else set()
        todo = [i for i, r in enumerate(reasons) if not r and i not in done]

        def work(i):
            try:
                arr[i] = imageio.decode_image(files[i], spec)
                return ""
            except DECODE_ERRORS as err:
                return imageio.unreadable_reason(err)

        t0 = time.perf_counter()
        bar = tqdm(total=len(todo), desc="decoding images", unit="img", disable=None)
        for i, why in zip(todo, _pmap(pool, work, todo, chunk=16)):
            reasons[i] = why
            bar.update()
        bar.close()
    seconds = time.perf_counter() - t0
    if todo:
        log.info("images: decoded %d in %.1f s (%.0f images/s, %d threads), %d reused from an older cache entry",
                 len(todo), seconds, len(todo) / max(seconds, 1e-9), workers, len(done))
    ok = np.array([not r for r in reasons], dtype=bool)
    if out_path is not None:
        arr.flush()
    return arr, ok, reasons, spec.channels


def _build(entry: Path, prefix: str, files, stats, spec, setting, workers, exclusive: bool) -> None:
    root = entry.parent
    if exclusive:  # nobody else is building this entry: a temporary folder is a killed job's leftover
        for stale in root.glob(f"{entry.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    older = sorted((p for p in root.glob(f"{prefix}*") if p.is_dir() and p != entry and ".tmp-" not in p.name),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    tmp = root / f"{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    superseded: list[Path] = []

    def reuse(arr: np.ndarray, channels: int) -> set[int]:
        # Rows of the older entry (same label and settings) that has the most unchanged files
        # (same path, size and mtime): a frontal-only list can be cut out of a full one, say.
        wanted = {(f, s[0], s[1]): i for i, (f, s) in enumerate(zip(files, stats)) if not isinstance(s, str)}
        best: list[tuple[int, int]] = []
        best_arr = None
        for old in older:
            opened = _open_entry(old)
            if opened is None or int(opened[2]["channels"]) != channels:
                continue
            old_arr, old_src, _ = opened
            if set(old_src["path"]) == set(files):
                superseded.append(old)
            keys = zip(old_src["path"], old_src["bytes"], old_src["mtime_ns"], old_src["ok"])
            pairs = [(wanted[k[:3]], j) for j, k in enumerate(keys) if k[3] and k[:3] in wanted]
            if len(pairs) > len(best):
                best, best_arr = pairs, old_arr
        for start in range(0, len(best), 1024):
            dst, src = map(list, zip(*best[start:start + 1024]))
            arr[dst] = best_arr[src]
        return {d for d, _ in best}

    try:
        arr, ok, reasons, channels = _decode_all(files, stats, spec, setting, workers, tmp / "images.npy", reuse)
        del arr  # close the memmap before the folder moves
        pd.DataFrame({
            "path": files,
            "bytes": [s[0] if not isinstance(s, str) else -1 for s in stats],
            "mtime_ns": [s[1] if not isinstance(s, str) else -1 for s in stats],
            "ok": ok, "reason": reasons,
        }).to_csv(tmp / "sources.csv", index=False)
        meta = {"version": CACHE_VERSION, "images": len(files), "ok": int(ok.sum()), "channels": channels,
                "size": spec.size, "resize": spec.resize, "channel_setting": setting, "rescale16": spec.rescale16,
                "dicom_window": spec.dicom_window, "dicom_frame": spec.dicom_frame, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "index.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "index.json").exists():
                raise
            # Another builder (one without the lock) got there first; its entry is equivalent.
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write the image cache in {root}: {err.strerror or err}; free some disk space, "
                        "point data.cache_dir at a folder with room, or decode without a cache (data.cache=false); "
                        "existing cache entries are intact") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("images: cache entry %s written", entry)
    for old in superseded:  # same files, older versions: replaced by this entry
        log.info("images: removing superseded cache entry %s", old)
        shutil.rmtree(old, ignore_errors=True)
        Path(f"{old}.lock").unlink(missing_ok=True)
