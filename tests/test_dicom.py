"""DICOM input (issue 22, item 1): the display chain on hand-worked files, pydicom's own test files against
pydicom's apply_modality_lut + apply_voi_lut, refusals with their reasons, and a CSV of DICOM files that trains
and predicts (a MONOCHROME1 file and its MONOCHROME2 twin give one probability)."""

from __future__ import annotations

import shutil
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg
from datagen import film, make_csv, write_dicom
from rethink_tl.data.dicom import DicomError, is_dicom, read_dicom
from rethink_tl.data.images import ImageSpec, decode_image, file_channels, header_channels
from rethink_tl.errors import UserError
from rethink_tl.identity import identity

pydicom = pytest.importorskip("pydicom", reason="DICOM needs the dicom extra: pip install 'rethink-tl[dicom]'")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def shipped(name: str) -> str:
    """One of the test files in pydicom's wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not in pydicom's wheel"
    return path


def test_a_monochrome1_file_decodes_to_its_monochrome2_twin(tmp_path):
    grey = (film(40, 30, 1).astype(np.int64) * 16 + 7)  # 12-bit data, 7..4087
    two = write_dicom(tmp_path / "two.dcm", grey)
    one = write_dicom(tmp_path / "one.dcm", 4095 - grey, photometric="MONOCHROME1")
    for window in ("auto", "minmax", "none"):
        a, b = read_dicom(str(two), window), read_dicom(str(one), window)
        assert a.shape == (30, 40) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    # MONOCHROME2 bright where the data is large: the brightest input pixel is white
    assert read_dicom(str(two))[np.unravel_index(grey.argmax(), grey.shape)] == 255
    spec = ImageSpec(size=16, resize="crop", channels=1)
    np.testing.assert_array_equal(decode_image(str(two), spec), decode_image(str(one), spec))


def test_a_window_follows_the_linear_rule_by_hand(tmp_path):
    # 12-bit unsigned, window centre 1000.5 width 101: the output range 0..4095 maps onto 0..255.
    # x <= c - 0.5 - (w-1)/2 = 950 -> 0; x > 1050 -> 255; else ((x - 1000) / 100 + 0.5) * 255
    x = np.array([[950, 975, 1000, 1010, 1051, 2000]])
    path = write_dicom(tmp_path / "w.dcm", x, window=(1000.5, 101))
    assert read_dicom(str(path), "auto").tolist() == [[0, 64, 128, 153, 255, 255]]  # 63.75, 127.5, 153.0
    # minmax ignores the window: (x - 950) * 255 / 1050
    assert read_dicom(str(path), "minmax").tolist() == [[0, 6, 12, 15, 25, 255]]  # 6.07, 12.14, 14.57, 24.53
    # none: the 12 stored bits' whole range, x * 255 / 4095
    assert read_dicom(str(path), "none").tolist() == [[59, 61, 62, 63, 65, 125]]  # 59.16, 60.71, 62.27, 62.89,
    #                                                                                  65.44, 124.54


def test_ct_numbers_stored_signed_or_with_an_intercept_give_one_image(tmp_path):
    # Hounsfield units -160, 40, 139, 240 in a soft-tissue window (40, 400): ((HU - 39.5) / 399 + 0.5) * 255
    # over the modality LUT's range: 0, 127.82, 191.09, 255.
    hu = np.array([[-160, 40, 139, 240]])
    signed = write_dicom(tmp_path / "signed.dcm", hu, bits_stored=16, signed=True, window=(40, 400))
    shifted = write_dicom(tmp_path / "shifted.dcm", hu + 1024, window=(40, 400), rescale=(1, -1024))
    for path in (signed, shifted):
        assert read_dicom(str(path)).tolist() == [[0, 128, 191, 255]]


def _by_pydicom(ds) -> np.ndarray:
    """pydicom's modality LUT + VOI LUT, onto 0..255 over the range the standard gives the VOI output: the
    stored bits' range through the rescale when a window applies, the image's own range when none does."""
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    if ds.get("WindowCenter") is not None:
        bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        lo, hi = lo * slope + intercept, hi * slope + intercept
    else:
        lo, hi = values.min(), values.max()
    return np.rint(np.clip((values - lo) * 255 / (hi - lo), 0, 255)).astype(np.uint8)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPGExtended.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "693_J2KI.dcm",
                                  "MR_small_bigendian.dcm"])
def test_pydicoms_own_files_decode_to_pydicoms_display_pixels(name):
    path = shipped(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        want = _by_pydicom(ds)
        got = read_dicom(path)
    assert got.shape == (ds.Rows, ds.Columns)
    np.testing.assert_array_equal(got, want)
    assert header_channels(path) == 1
    assert decode_image(path, ImageSpec(size=32, resize="pad", channels=3)).shape == (3, 32, 32)


def test_colour_files_are_rgb_through_pydicom():
    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle.dcm"):
        path = shipped(name)
        ds = pydicom.dcmread(path)
        assert header_channels(path) == 3
        np.testing.assert_array_equal(read_dicom(path), ds.pixel_array)  # YBR turned into RGB by pydicom
    rgb = pydicom.dcmread(shipped("SC_rgb_rle.dcm")).pixel_array
    grey = decode_image(shipped("SC_rgb_rle.dcm"), ImageSpec(size=100, resize="stretch", channels=1))
    assert grey.shape == (1, 100, 100) and abs(float(grey.mean()) - float(rgb.mean(axis=2).mean())) < 20


def test_files_that_cannot_be_used_say_why(tmp_path):
    with pytest.raises(DicomError, match="12-bit JPEG Extended.*dcmdjpeg"):
        read_dicom(shipped("JPEG-lossy.dcm"))
    with pytest.raises(DicomError, match=r"multi-frame DICOM file \(15 frames\): set data.dicom_frame=K"):
        read_dicom(shipped("rtdose.dcm"))
    with pytest.raises(DicomError, match="without an image.*RT Plan"):
        read_dicom(shipped("rtplan.dcm"))
    (tmp_path / "text.dcm").write_text("not DICOM")
    with pytest.raises(DicomError, match="not a DICOM file") as err:
        read_dicom(str(tmp_path / "text.dcm"))
    assert "force=True" not in str(err.value)  # pydicom's advice to its own callers, not to a user of rtl
    data = open(shipped("MR_small.dcm"), "rb").read()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 3000])
    with pytest.raises(DicomError, match="damaged"):
        read_dicom(str(tmp_path / "cut.dcm"))
    (tmp_path / "short.dcm").write_bytes(open(shipped("CT_small.dcm"), "rb").read()[:2000])  # cut in the header
    with pytest.raises(DicomError, match="damaged"):
        read_dicom(str(tmp_path / "short.dcm"))
    assert file_channels(str(tmp_path / "text.dcm")).startswith("unreadable: not a DICOM file")
    with pytest.raises(UserError, match="data.dicom_window must be one of auto, minmax, none"):
        read_dicom(shipped("MR_small.dcm"), "lung")


def test_a_file_no_plugin_decodes_logs_nothing_of_pydicoms_own(caplog):
    import logging

    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DicomError):
            read_dicom(shipped("JPEG-lossy.dcm"))
    assert not [r for r in caplog.records if r.name.startswith("pydicom") and r.levelno >= logging.WARNING]


def test_a_multi_frame_file_gives_the_frame_asked_for(tmp_path):
    frames = np.stack([np.full((6, 8), v) for v in (100, 2000, 4000)])
    frames[:, 0, 0] = 0  # each frame's own min..max: 0 and its level
    path = write_dicom(tmp_path / "cine.dcm", frames)
    with pytest.raises(DicomError, match="3 frames"):
        read_dicom(str(path))
    assert read_dicom(str(path), "none", frame=1)[1, 1] == round(2000 * 255 / 4095)
    assert read_dicom(str(path), "none", frame=2)[1, 1] == round(4000 * 255 / 4095)
    with pytest.raises(DicomError, match=r"data.dicom_frame=3, but the file has 3 frames \(0..2\)"):
        read_dicom(str(path), frame=3)
    one = write_dicom(tmp_path / "one.dcm", frames[1])  # a single frame: frame 0 only, never silently frame 0
    assert read_dicom(str(one), "none", frame=0)[1, 1] == round(2000 * 255 / 4095)
    with pytest.raises(DicomError, match=r"data.dicom_frame=1, but the file has 1 frame \(0..0\)"):
        read_dicom(str(one), frame=1)


def test_a_pacs_export_without_an_extension_is_dicom_by_its_marker(tmp_path):
    shutil.copy(shipped("MR_small.dcm"), tmp_path / "IM000001")
    (tmp_path / "README").write_text("x" * 200)
    assert is_dicom(str(tmp_path / "IM000001")) and not is_dicom(str(tmp_path / "README"))
    np.testing.assert_array_equal(read_dicom(str(tmp_path / "IM000001")), read_dicom(shipped("MR_small.dcm")))


def test_without_pydicom_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(UserError, match=r"needs pydicom.*pip install 'rethink-tl\[dicom\]'"):
        read_dicom(shipped("MR_small.dcm"))


def test_decoding_settings_are_part_of_the_run_and_the_cache():
    from rethink_tl.data.cache import image_spec

    base = ["data=csv", "data.csv=/d/images.csv"]
    plain = identity(compose_cfg(base))
    assert "data.dicom_window" not in plain and "data.dicom_frame" not in plain  # earlier runs keep their ids
    changed = identity(compose_cfg([*base, "data.dicom_window=none", "data.dicom_frame=0"]))
    assert changed["data.dicom_window"] == "none" and changed["data.dicom_frame"] == 0
    spec, _ = image_spec(compose_cfg([*base, "data.dicom_window=minmax"]).data)
    assert spec.dicom_window == "minmax" and spec.key() != ImageSpec(224, "crop").key()
    with pytest.raises(UserError, match="data.dicom_frame must be a frame number"):
        image_spec(compose_cfg([*base, "data.dicom_frame=-1"]).data)


@pytest.mark.slow
def test_a_csv_of_dicom_files_trains_and_predicts(tmp_path, capsys):
    """make_csv's images re-written as 12-bit DICOM (every third one windowed), plus a MONOCHROME1 copy of
    image 0 (the same patient): training reads them, and rtl predict gives the twins one probability."""
    from rethink_tl import cli
    from rethink_tl.train import run

    csv = make_csv(tmp_path, n=40)
    table = pd.read_csv(csv)
    from PIL import Image

    paths = []
    for i, rel in enumerate(table["path"]):
        grey = np.asarray(Image.open(tmp_path / rel).convert("L")).astype(np.int64) * 16
        out = tmp_path / "dcm" / f"{i:03d}.dcm"
        write_dicom(out, grey, window=(2048, 4096) if i % 3 == 0 else None)
        paths.append(f"dcm/{i:03d}.dcm")
        if i == 0:
            write_dicom(tmp_path / "dcm" / "000_mono1.dcm", 4095 - grey, photometric="MONOCHROME1",
                        window=(2048, 4096))
    table["path"] = paths
    twin = table.iloc[[0]].assign(path="dcm/000_mono1.dcm")
    table = pd.concat([table, twin], ignore_index=True)
    table.to_csv(tmp_path / "dicom.csv", index=False)

    out = tmp_path / "run"
    cfg = compose_cfg(["model=trunc", "model.cut=1", "data=csv", f"data.csv={tmp_path / 'dicom.csv'}",
                       "data.image_size=32", "data.labels=[covid]", "train.epochs=2", "train.batch_size=8",
                       "train.lr=1e-3", "runtime.progress=false"])
    row = run(cfg, out)
    assert row["n_train"] + row["n_val"] + row["n_test"] == 41 and 0.0 <= float(row["test_auroc"]) <= 1.0
    cli.main(["predict", str(out), str(tmp_path / "dicom.csv"), "--out", str(tmp_path / "p.csv"), "--device", "cpu"])
    got = pd.read_csv(tmp_path / "p.csv")
    assert len(got) == 41
    two, one = got.iloc[0], got.iloc[40]
    assert two["path"] == "dcm/000.dcm" and one["path"] == "dcm/000_mono1.dcm"
    assert two["prob_covid"] == one["prob_covid"]
    assert got["prob_covid"].nunique() > 10  # the images differ, and so do the probabilities


def test_a_pretraining_tree_reads_dicom_files_by_name_or_marker(tmp_path):
    """rtl pretrain's ImageFolder index and reader: .dcm and extension-less DICOM files are images of their class;
    read as RGB (grey replicated) with the same display chain; a damaged one is a BadImage naming it."""
    from rethink_tl.data.imagefolder import BadImage, index_folder, read_rgb

    for split in ("train", "val"):
        for k, cls in enumerate(("a", "b")):
            write_dicom(tmp_path / split / cls / "x.dcm", film(20, 16, k).astype(np.int64) * 16)
            shutil.copy(shipped("MR_small.dcm"), tmp_path / split / cls / "IM0001")
            (tmp_path / split / cls / "notes.txt").write_text("not an image")
    index = index_folder(tmp_path)
    assert index.classes == ["a", "b"] and len(index.train) == 4 and len(index.val) == 4
    by_name = dict(index.train)
    rgb = read_rgb(str(tmp_path / "train" / "a" / "IM0001"))
    assert rgb.shape == (3, 64, 64) and str(rgb.dtype) == "torch.uint8"
    assert (rgb[0] == rgb[1]).all() and (rgb[0].numpy() == read_dicom(shipped("MR_small.dcm"))).all()
    assert by_name[str(tmp_path / "train" / "b" / "x.dcm")] == 1
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 10)
    with pytest.raises(BadImage, match="bad.dcm.*not a DICOM file"):
        read_rgb(str(tmp_path / "bad.dcm"))


def test_a_transfer_syntax_without_its_plugin_names_the_package(monkeypatch):
    """As when pylibjpeg-openjpeg is not installed: pydicom cannot decode JPEG 2000, and the message names it."""
    import pydicom.dataset

    def no_plugin(self):
        raise RuntimeError("Unable to decompress 'JPEG 2000 Image Compression' pixel data because all plugins are "
                           "missing dependencies:\n    pylibjpeg - requires pylibjpeg-openjpeg")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_plugin))
    with pytest.raises(DicomError, match=r"transfer syntax JPEG 2000 Image Compression.*pylibjpeg-openjpeg.*"
                                         r"rethink-tl\[dicom\]"):
        read_dicom(shipped("JPEG2000.dcm"))
