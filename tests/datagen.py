"""Tiny data sets on disk for the data tests: a CheXpert-layout tree, CSV image lists with mixed
formats, and MedMNIST-layout .npz files. Everything is deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from rethink_tl.data.chexpert import OBSERVATIONS

# Label cells cycle through these, so every column holds positives, negatives, uncertain and blanks.
CELL_VALUES = ("1.0", "0.0", "-1.0", "")


def film(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth grey image with some structure (JPEG-friendly), uint8 (height, width)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = 90 + 60 * np.sin(x / (3 + seed % 5)) * np.cos(y / 4) + rng.normal(0, 8, (height, width))
    return np.clip(img, 0, 255).astype(np.uint8)


def cell(i: int, j: int) -> str:
    return CELL_VALUES[(i + 3 * j) % len(CELL_VALUES)]


def make_chexpert(base: Path, n_patients: int = 40, n_valid: int = 5, folder: str = "CheXpert-v1.0-small") -> Path:
    """``base/<folder>`` with train.csv and valid.csv in the official layout.

    Train: patients 1..n_patients, one study each, a frontal view, plus a lateral view for even
    patients. Valid: patients n_patients+1.., one frontal view each, labels 0/1 only.
    Returns the dataset folder (what data.root points at).
    """
    root = base / folder
    rows = []
    for split, first, count in (("train", 1, n_patients), ("valid", n_patients + 1, n_valid)):
        for p in range(first, first + count):
            views = [("view1_frontal.jpg", "Frontal", "AP")]
            if split == "train" and p % 2 == 0:
                views.append(("view2_lateral.jpg", "Lateral", ""))
            for v, (fname, view, appa) in enumerate(views):
                rel = f"{folder}/{split}/patient{p:05d}/study1/{fname}"
                out = base / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                # Portrait and landscape sizes, as in real exports.
                Image.fromarray(film(40 + p % 3 * 8, 48 - v * 10, p * 10 + v)).save(out, quality=90)
                i = len(rows)
                labels = {obs: (cell(i, j) if split == "train" else str(float((i + j) % 2)))
                          for j, obs in enumerate(OBSERVATIONS)}
                rows.append({"split": split, "Path": rel, "Sex": "Female" if p % 2 else "Male", "Age": 40 + p,
                             "Frontal/Lateral": view, "AP/PA": appa, **labels})
    df = pd.DataFrame(rows)
    for split in ("train", "valid"):
        df[df.split == split].drop(columns="split").to_csv(root / f"{split}.csv", index=False)
    return root


def write_image(path: Path, kind: str, width: int, height: int, seed: int) -> None:
    """One image of a given storage ``kind``: png8, png16, jpeg, rgb (PNG), rgbjpeg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = film(width, height, seed)
    if kind == "png16":
        # 12-bit data in a 16-bit container, as X-ray exports often are.
        Image.fromarray((grey.astype(np.uint16) * 16)).save(path)
    elif kind == "png8":
        Image.fromarray(grey).save(path)
    elif kind == "jpeg":
        Image.fromarray(grey).save(path, quality=90)
    elif kind in ("rgb", "rgbjpeg"):
        rgb = np.stack([grey, np.roll(grey, 3, axis=1), 255 - grey], axis=-1)
        Image.fromarray(rgb).save(path, **({"quality": 90} if kind == "rgbjpeg" else {}))
    else:
        raise ValueError(kind)


GREY_KINDS = ("png8", "png16", "jpeg")


def make_csv(folder: Path, n: int = 30, kinds=GREY_KINDS, name: str = "images.csv") -> Path:
    """``folder/name`` listing ``n`` images in ``folder/img`` (mixed formats and sizes).

    Patient k has images 2k and 2k+1; image i is dated 2020-03-01 + i days. Labels: ``covid``
    alternates 1/0 per patient, ``opacity`` cycles 1/0/-1/blank; ``age`` and ``sex`` are not labels.
    """
    rows = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        ext = "jpg" if "jpeg" in kind else "png"
        rel = f"img/{i:03d}.{ext}"
        write_image(folder / rel, kind, 30 + (i % 4) * 10, 36 + (i % 3) * 12, i)
        rows.append({"path": rel, "patient_id": f"p{i // 2:02d}",
                     "date": (pd.Timestamp("2020-03-01") + pd.Timedelta(days=i)).strftime("%Y-%m-%d"),
                     "covid": (i // 2) % 2, "opacity": CELL_VALUES[i % 4], "age": 30 + i, "sex": "MF"[i % 2]})
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def make_npz(path: Path, counts=(20, 6, 8), size: int = 28, n_labels: int = 1, rgb: bool = False,
             n_classes: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """A .npz in the MedMNIST layout; returns its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if n_labels > 1:
            labels = (np.arange(n * n_labels).reshape(n, n_labels) + np.arange(n)[:, None]) % 3 == 0
        else:
            labels = (np.arange(n) % n_classes)[:, None]
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                signed: bool = False, window: tuple[float, float] | None = None,
                rescale: tuple[float, float] | None = None) -> Path:
    """An uncompressed (Explicit VR Little Endian) DICOM file of ``pixels``: (H, W) grey levels stored in 16 bits
    with ``bits_stored`` significant ones (signed when ``signed``), (F, H, W) for a multi-frame file, or
    (H, W, 3) uint8 RGB; ``window`` = (centre, width) and ``rescale`` = (slope, intercept) when given."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "OT", "anon"
    rgb = pixels.ndim == 3 and pixels.shape[-1] == 3
    if pixels.ndim == 3 and not rgb:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    if rgb:
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        data = pixels.astype(np.uint8)
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        data = pixels.astype(np.int16 if signed else np.uint16)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = data.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
