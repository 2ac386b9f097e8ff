"""DICOM files as the training loop's 8-bit images, the way a radiologist's viewer shows them.

Grey-level (MONOCHROME1 / MONOCHROME2) pixels go through the DICOM display chain (PS3.3 C.11, PS3.4 N.2):

1. the **modality LUT**: Rescale Slope / Intercept (CT's Hounsfield units) or a Modality LUT Sequence;
2. the **VOI LUT**, by ``data.dicom_window``:

   - ``auto`` (default): the file's VOI LUT Sequence if it has one, else its first Window Center / Width, mapped
     onto 0..255 over the range the standard gives the VOI output (what pydicom's ``apply_voi_lut`` returns);
     a file with neither is stretched over its own min..max;
   - ``minmax``: every image over its own min..max after the modality LUT, whatever window it carries;
   - ``none``: no window: the whole range the stored bits can hold (after the modality LUT) onto 0..255, so one
     value means the same grey in every file of a data set;

3. **MONOCHROME1** (0 is white) inverted over that same range, so bone is bright in every image and a
   MONOCHROME1 file decodes to the same pixels as its MONOCHROME2 twin.

Signed and 16-bit data come out of pydicom as such; RGB and YBR files are converted to RGB by pydicom (its
``pixel_array`` default), PALETTE COLOR through the palette. A multi-frame file is refused unless
``data.dicom_frame=K`` picks frame K of every file (a file without a frame K is refused: a single-frame file has
frame 0 only). Compressed transfer syntaxes need pydicom's pixel-data plugins: ``pip install 'rethink-tl[dicom]'`` installs pylibjpeg with its JPEG, JPEG-LS, JPEG 2000
and RLE decoders; a file that none of them decodes is named with what would.

Which files are DICOM: a ``.dcm`` / ``.dicom`` name, or the ``DICM`` marker at byte 128 of the file (PACS
exports often have no extension).
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from ..errors import UserError

SUFFIXES = (".dcm", ".dicom")
WINDOWS = ("auto", "minmax", "none")
_INSTALL = "pip install 'rethink-tl[dicom]'"

# The pixel-data decoders a transfer syntax needs (pydicom's plugin table, by UID prefix), for the message.
_NEEDS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg (or Pillow)",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",  # JPEG extended, 8-bit (12-bit: see _pixel_array)
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg",  # JPEG-LS
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (or numpy, pydicom's own)",  # RLE
}


class DicomError(ValueError):
    """A DICOM file that cannot be used as an image (a ValueError: one of images.DECODE_ERRORS)."""


def is_dicom(path: str) -> bool:
    """By name (.dcm, .dicom) or by the DICM marker after the 128-byte preamble."""
    if str(path).lower().endswith(SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise UserError(f"reading DICOM files needs pydicom, which is not installed: {_INSTALL}") from None
    # pydicom logs every failed decoder attempt with its traceback; a file rtl cannot use is reported by rtl,
    # once, with its reason.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    return pydicom


def _read(path: str, pixels: bool):
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError as err:
        why = str(err).split(". Use force=True")[0].split(" - ")[0].strip()
        raise DicomError(f"not a DICOM file ({why or 'no DICOM header'})") from None
    except (EOFError, OSError, KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
        raise DicomError(f"a damaged DICOM file ({type(err).__name__}: {err})") from None
    has_image = (any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")) if pixels
                 else ds.get("Rows") is not None)
    kind = ds.get("SOPClassUID")
    an_image_class = kind is not None and "Image" in str(getattr(kind, "name", ""))
    if not has_image and pixels and (ds.get("Rows") is not None or an_image_class):
        raise DicomError("a damaged DICOM file: it describes an image but its Pixel Data is missing or cut off "
                         "(truncated?)")
    if not has_image:
        raise DicomError(f"a DICOM file without an image (no Pixel Data{f'; SOP class {kind.name}' if kind else ''})")
    return ds


def _photometric(ds) -> str:
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()


def header_channels(path: str) -> int:
    """1 for a grey-level DICOM file, 3 for RGB / YBR / PALETTE COLOR, from the header alone."""
    ds = _read(path, pixels=False)
    return 1 if _photometric(ds).startswith("MONOCHROME") and int(ds.get("SamplesPerPixel", 1) or 1) == 1 else 3


def _frame(ds, arr: np.ndarray, frame: Optional[int]) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame is not None and frame >= frames:
        raise DicomError(f"data.dicom_frame={frame}, but the file has {frames} frame{'s' if frames > 1 else ''} "
                         f"(0..{frames - 1})")
    if frames <= 1:
        return arr
    if frame is None:
        raise DicomError(f"a multi-frame DICOM file ({frames} frames): set data.dicom_frame=K to use frame K of "
                         "every file (0 is the first)")
    return arr[frame]


def _pixel_array(ds) -> np.ndarray:
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as err:
        uid = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        name = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", uid) if uid else "unknown"
        needs = _NEEDS.get(uid)
        first = str(err).strip().splitlines()[0].rstrip(":")
        hint = f"it needs {needs} ({_INSTALL})" if needs else f"no pydicom plugin decodes it ({first})"
        if uid == "1.2.840.10008.1.2.4.51" and int(ds.get("BitsStored", 8) or 8) > 8:
            hint = ("no pydicom plugin decodes 12-bit JPEG Extended (pydicom's pylibjpeg, Pillow and GDCM plugins refuse it): "
                    "convert the file to an uncompressed transfer syntax (dcmtk: dcmdjpeg IN OUT)")
        raise DicomError(f"cannot decode its pixel data (transfer syntax {name}): {hint}") from None
    except (ValueError, EOFError, OSError, KeyError, AttributeError, TypeError) as err:  # truncated pixel data
        raise DicomError(f"damaged pixel data ({type(err).__name__}: {err})") from None


def stored_range(ds) -> tuple[float, float]:
    """The range pydicom's windowing maps onto: the stored bits' range through the modality LUT (PS3.3
    C.11.2.1.2: the VOI output spans the values the modality LUT can give)."""
    if ds.get("ModalityLUTSequence"):
        depth = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** depth - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        lo, hi = 0.0, float(2 ** bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
        lo, hi = min(a, b), max(a, b)
    return lo, hi


def _voi(ds, values: np.ndarray, window: str) -> tuple[np.ndarray, float, float]:
    """The VOI step: (values, the range that maps onto 0..255)."""
    from pydicom.pixels import apply_voi_lut

    if window == "auto":
        has_lut = bool(ds.get("VOILUTSequence")) and None not in (
            ds.VOILUTSequence[0].get("LUTDescriptor"), ds.VOILUTSequence[0].get("LUTData"))
        has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
        if has_lut or has_window:
            try:
                out = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
            except (ValueError, NotImplementedError, IndexError, AttributeError, TypeError) as err:
                raise DicomError(f"its VOI LUT / window cannot be applied ({err}): set data.dicom_window=minmax "
                                 "or none to ignore it") from None
            if has_lut:
                return out, 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
            lo, hi = stored_range(ds)
            return out, lo, hi
    if window == "none":
        lo, hi = stored_range(ds)
        return np.clip(values, lo, hi), lo, hi
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    return values, lo, hi


def grey_levels(ds, arr: np.ndarray, window: str) -> np.ndarray:
    """float64 in 0..255 (not rounded) of a grey-level frame: modality LUT, VOI, MONOCHROME1 inversion."""
    from pydicom.pixels import apply_modality_lut

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    values, lo, hi = _voi(ds, values, window)
    if _photometric(ds) == "MONOCHROME1":  # inverted over the range that maps to 0..255: a MONOCHROME2 twin
        values = (lo + hi) - values
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((np.nan_to_num(values, nan=lo) - lo) * 255.0 / (hi - lo), 0.0, 255.0)


def _colour(ds, arr: np.ndarray) -> np.ndarray:
    """uint8 RGB of a colour frame (pydicom already turned YBR into RGB)."""
    if _photometric(ds) == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        depth = 8 if arr.dtype == np.uint8 else 16
    else:
        depth = int(ds.get("BitsStored", 8) or 8)
    if depth > 8:
        arr = np.rint(arr.astype(np.float64) * (255.0 / (2 ** depth - 1)))
    return np.clip(arr, 0, 255).astype(np.uint8)[..., :3]


def read_dicom(path: str, window: str = "auto", frame: Optional[int] = None) -> np.ndarray:
    """uint8 (H, W) for a grey-level file, (H, W, 3) RGB for a colour one, at the file's own size.

    Raises DicomError (a ValueError) for a file that cannot be used, UserError when pydicom is missing."""
    if window not in WINDOWS:
        raise UserError(f"data.dicom_window must be one of {', '.join(WINDOWS)}, got {window}")
    ds = _read(path, pixels=True)
    arr = _frame(ds, _pixel_array(ds), frame)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) or not _photometric(ds).startswith("MONOCHROME"):
        if arr.ndim != 3 and _photometric(ds) != "PALETTE COLOR":
            raise DicomError(f"photometric interpretation {_photometric(ds)} with pixel array of shape {arr.shape}")
        return _colour(ds, arr)
    if arr.ndim != 2:
        raise DicomError(f"a grey-level image of shape {arr.shape}: one 2-D frame was expected")
    return np.rint(grey_levels(ds, arr, window)).astype(np.uint8)

