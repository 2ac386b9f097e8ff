"""``rtl predict``: a trained model's probabilities for new images, one CSV row per image.

    rtl predict runs/covid/dens_t1/pretrained/f1/s0-1a2b3c4d new_xrays/ --out new_xrays.csv

IMAGES is a folder (searched recursively; image files by extension, in sorted order), a CSV with a path
column (paths relative to the CSV's folder, or absolute) or one image file. Every image is decoded exactly as
the run decoded its training images (``decoding``: image size, resize, 16-bit rescale, channels) and
normalised as the model was trained (``finished.infer``).

Channels. A run trained with ``data.channels=auto`` decoded luminance (1) when every training image was grey
and RGB (3) when any was colour. Re-resolving ``auto`` on the new images alone could disagree: a colour
photograph of a film would be fed as RGB to a model that only ever saw luminance. So the run's resolution
is used. Grey new images need no look at the training data: a grey image decoded as RGB is the same grey in
each channel, which is exactly what the model's input broadcast makes of one channel. Only when new images
are in colour are the training images' headers read to find what training did (``--channels`` says it when
they are gone).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from .. import atomic_io
from ..config import ImageFilesData
from ..data import trained_channels
from ..data.images import DECODE_ERRORS, ImageSpec, decode_image, file_channels, unreadable_reason
from ..engine import pick_device as pick
from ..errors import UserError
from .finished import FinishedRun, infer, one_run

CHUNK = 256  # images decoded and inferred at a time: memory stays bounded on large folders
_SHOW = 5  # bad files named in a message; the rest are counted


# --- decoding as the run did (shared with rtl evaluate) ------------------------------------------------

def pick_device(name: str) -> torch.device:
    try:
        return pick(name)
    except UserError as err:
        raise UserError(str(err).replace("runtime.device", "--device")) from None


def _default(key: str) -> str:
    """The schema's default for an image-file decoding key (one default per key: config.py)."""
    return str({f.name: f.default for f in dataclasses.fields(ImageFilesData)}[key])


def decoding(data: DictConfig, channels: int) -> ImageSpec:
    """The run's ImageSpec with ``channels`` resolved. Runs trained on arrays (synthetic, MedMNIST) never
    decoded a file: new files get the schema's defaults for resize and 16-bit rescale."""
    def setting(key: str) -> str:
        return str(data[key]) if key in data else _default(key)

    from ..data.cache import dicom_settings

    return ImageSpec(size=int(data.image_size), resize=setting("resize"), channels=channels,
                     rescale16=setting("rescale16"), **dicom_settings(data))


# --- which images ------------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageList:
    shown: list[str]  # the path written to the output (as listed in the CSV, or IMAGES/relative)
    files: list[str]  # where each file is read from
    note: str  # what was listed, in words


def list_images(images: str, path_column: Optional[str]) -> ImageList:
    from ..data.dicom import SUFFIXES, is_dicom
    from ..data.imagefolder import EXTENSIONS

    def is_image(p: Path) -> bool:  # DICOM from a PACS often has no extension: its DICM marker says
        return p.suffix.lower() in EXTENSIONS or is_dicom(str(p))

    looked = ", ".join((*EXTENSIONS, *SUFFIXES)) + " and DICOM files by their DICM marker"

    where = Path(images)
    if where.is_dir():
        if path_column is not None:
            raise UserError(f"--path-column applies to a CSV of paths; {images} is a folder")
        found, other = [], []
        for p in sorted(where.rglob("*"), key=lambda q: q.relative_to(where).as_posix()):
            if p.is_file():
                (found if is_image(p) else other).append(p)
        if not found:
            raise UserError(f"{images} holds no image file (looked for {looked}, recursively; "
                            f"{len(other)} other file(s))")
        note = f"{len(found)} image files in {images}"
        if other:
            names = ", ".join(str(p.relative_to(where)) for p in other[:3]) + (", ..." if len(other) > 3 else "")
            note += f" ({len(other)} other file(s) left out: {names})"
        return ImageList([str(p) for p in found], [str(p) for p in found], note)
    if not where.exists():
        raise UserError(f"{images} does not exist: pass a folder of images, a CSV with a path column, or an image")
    if where.suffix.lower() != ".csv" and is_image(where):
        if path_column is not None:
            raise UserError(f"--path-column applies to a CSV of paths; {images} is an image")
        return ImageList([images], [images], f"1 image ({images})")
    if where.suffix.lower() != ".csv":
        raise UserError(f"{images} is neither a folder, a CSV (.csv) nor an image file ({looked})")
    from ..data.tables import read_table, require_columns

    df = read_table(where, "IMAGES")
    column = path_column or "path"
    require_columns(df, [column], str(where), " (choose the column with --path-column)")
    rel = df[column].str.strip().tolist()
    if not rel:
        raise UserError(f"{images} lists no image")
    base = where.resolve().parent
    # An empty cell stays empty: the check of every file names it as missing.
    return ImageList(rel, [str(base / p) if p else "" for p in rel], f"{len(rel)} images listed in {images}")


def _listing(problems: Sequence[tuple[str, str]]) -> str:
    shown = "; ".join(f"{p or '(empty path)'} ({why})" for p, why in problems[:_SHOW])
    return shown + (f"; and {len(problems) - _SHOW} more" if len(problems) > _SHOW else "")


def choose_channels(run: FinishedRun, colour: bool, given: Optional[int]) -> int:
    if given is not None:
        return given
    data = run.cfg.data
    if "channels" in data and str(data.channels) == "auto" and not colour:
        return 1  # grey images: 1 and 3 channels give the model the same input (module docstring)
    trained = trained_channels(data)
    if trained is None:
        raise UserError(f"the run trained with data.channels=auto and its training images ({_where_trained(data)}) "
                        "cannot be read to tell whether it decoded them as grey or colour, and some new images are "
                        "colour: pass --channels 1 (decode as grey, as for an all-grey training set) or --channels 3")
    return trained


def _where_trained(data: DictConfig) -> str:
    for key in ("csv", "root"):
        if data.get(key):
            return f"data.{key}={data[key]}"
    return f"data={data.kind}"


# --- the command -------------------------------------------------------------------------------------

def predict_images(run: FinishedRun, listed: ImageList, *, skip_bad: bool, channels: Optional[int],
                   device: torch.device) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(one row per usable image: path, prob_<label>...; the files left out with why)."""
    model = run.model.to(device)
    rows, probs = [], []
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # file I/O and PIL decoding release the GIL
        # Every header first (cheap): missing and non-image files are all named before any decoding.
        got = list(pool.map(lambda f: file_channels(f) if f else "missing", listed.files))
        bad = [(listed.shown[i], g) for i, g in enumerate(got) if isinstance(g, str)]
        if bad and not skip_bad:
            raise UserError(f"{len(bad)} of {len(got)} images cannot be used: {_listing(bad)}. Fix or remove them, "
                            "or pass --skip-bad to leave them out")
        keep = [i for i, g in enumerate(got) if not isinstance(g, str)]
        if not keep:
            raise UserError(f"none of the {len(got)} images can be used: {_listing(bad)}")
        spec = decoding(run.cfg.data, choose_channels(run, any(got[i] == 3 for i in keep), channels))

        def decode(i: int) -> np.ndarray | str:
            try:
                return decode_image(listed.files[i], spec)
            except DECODE_ERRORS as err:  # a header that reads but pixels that do not: a truncated file
                return unreadable_reason(err)

        for start in range(0, len(keep), CHUNK):
            part = keep[start:start + CHUNK]
            arrays = []
            for i, a in zip(part, pool.map(decode, part)):
                if isinstance(a, str):
                    if not skip_bad:
                        raise UserError(f"{listed.shown[i]} cannot be used ({a}): fix or remove it, or pass "
                                        "--skip-bad to leave such files out")
                    bad.append((listed.shown[i], a))
                    continue
                rows.append(i)
                arrays.append(a)
            if arrays:
                probs.append(infer(model, torch.from_numpy(np.stack(arrays))))
    if not rows:
        raise UserError(f"none of the {len(got)} images can be used: {_listing(bad)}")
    p = np.concatenate(probs)
    table = {"path": [listed.shown[i] for i in rows]}
    table.update({f"prob_{label}": p[:, j] for j, label in enumerate(run.labels)})
    return pd.DataFrame(table), bad


def default_out(run_dir: str | os.PathLike, images: str) -> Path:
    """Where ``rtl predict`` writes without --out: RUN_DIR/predict/<name of IMAGES>.csv."""
    name = Path(os.path.normpath(images)).name or "images"
    return Path(run_dir) / "predict" / f"{Path(name).stem if Path(name).suffix else name}.csv"


def predict_to_file(run_dir: str, images: str, out: Optional[str] = None, *, force: bool = False,
                    path_column: Optional[str] = None, skip_bad: bool = False, channels: Optional[int] = None,
                    device: str = "auto") -> None:
    """``rtl predict``: one row per usable image of IMAGES into ``out`` (default ``default_out``)."""
    target = Path(out) if out is not None else default_out(run_dir, images)
    if target.is_dir():
        raise UserError(f"--out {target} is a folder: give a file name, e.g. --out {target / 'predictions.csv'}")
    if target.exists() and not force:
        raise UserError(f"{target} exists: choose another --out, or pass --force to replace it")
    if out is not None and not target.parent.is_dir():
        raise UserError(f"--out {target}: the folder {target.parent} does not exist")
    where = pick_device(device)
    run = one_run(run_dir, "rtl predict")
    listed = list_images(images, path_column)
    print(f"{run.path}: {listed.note}")
    table, bad = predict_images(run, listed, skip_bad=skip_bad, channels=channels, device=where)
    atomic_io.write_bytes(target, lambda: table.to_csv(index=False, float_format="%.9g").encode(), option="--out")
    if bad:
        print(f"rtl predict: left out {len(bad)} image(s) that cannot be used:", file=sys.stderr)
        for path, why in bad:
            print(f"  {path or '(empty path)'} ({why})", file=sys.stderr)
    labels = ", ".join(run.labels)
    print(f"wrote {len(table)} rows to {target} (prob_ of {labels})"
          + (f"; {len(bad)} image(s) left out" if bad else ""))
