"""Decoding one image (grey levels, channels, geometry) and the decode-once cache."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rethink_tl.data import cache, images
from rethink_tl.data.cache import load_images
from rethink_tl.data.images import DECODE_ERRORS, ImageSpec, decode_image, header_channels
from rethink_tl.config import ImageFilesData, typed
from rethink_tl.errors import UserError

from datagen import write_image


def spec(size=32, resize="crop", **kw):
    return ImageSpec(size=size, resize=resize, **kw)


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    # 12-bit data (0..4095) in a 16-bit PNG: a horizontal ramp.
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    out = decode_image(str(tmp_path / "ramp.png"), spec(64))
    assert out.shape == (1, 64, 64) and out.dtype == np.uint8
    row = out[0, 32].astype(int)
    assert row[0] == 0 and row[-1] == 255  # the image's own range maps onto 0..255
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 50  # a ramp, not a clipped step
    full = decode_image(str(tmp_path / "ramp.png"), spec(64, rescale16="full"))
    assert full.max() == round(4095 / 257)  # the 16-bit scale: 12-bit data stays dark


def test_8_bit_grey_is_kept_as_is(tmp_path):
    a = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    Image.fromarray(a).save(tmp_path / "a.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "a.png"), spec(32))[0], a)


def test_channels_rgb_to_luminance_or_kept(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    grey = decode_image(str(tmp_path / "red.png"), spec(16, channels=1))
    assert grey.shape == (1, 16, 16) and (grey == 76).all()  # ITU-R 601 luma of pure red
    rgb = decode_image(str(tmp_path / "red.png"), spec(16, channels=3))
    assert rgb.shape == (3, 16, 16) and (rgb[0] == 255).all() and (rgb[1:] == 0).all()
    Image.new("L", (16, 16), 200).save(tmp_path / "grey.png")
    assert (decode_image(str(tmp_path / "grey.png"), spec(16, channels=3)) == 200).all()  # replicated


def test_header_channels(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "l.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.jpg")
    Image.new("L", (8, 8)).convert("P").save(tmp_path / "grey_palette.png")
    Image.new("RGB", (8, 8), (10, 200, 30)).convert("P").save(tmp_path / "colour_palette.png")
    assert [header_channels(str(tmp_path / n)) for n in ("l.png", "rgb.jpg", "grey_palette.png",
                                                         "colour_palette.png")] == [1, 3, 1, 3]


def test_pad_crop_and_stretch_geometry(tmp_path):
    Image.new("L", (64, 32), 255).save(tmp_path / "wide.png")  # 2:1 landscape, all white
    pad = decode_image(str(tmp_path / "wide.png"), spec(32, resize="pad"))[0]
    assert (pad[:8] == 0).all() and (pad[-8:] == 0).all() and (pad[9:-9] == 255).all()  # black bars
    assert (decode_image(str(tmp_path / "wide.png"), spec(32, resize="crop")) == 255).all()
    assert (decode_image(str(tmp_path / "wide.png"), spec(32, resize="stretch")) == 255).all()


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    write_image(tmp_path / "big.jpg", "jpeg", 512, 400, 0)
    out = decode_image(str(tmp_path / "big.jpg"), spec(32))
    assert out.shape == (1, 32, 32) and 60 < out[0, 8:24].mean() < 160


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_files_raise_decode_errors(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        write_image(path, "jpeg", 64, 64, 1)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(DECODE_ERRORS):
        decode_image(str(path), spec(32))


# ---------------------------------------------------------------------------------------------
# The cache


def make_files(folder, n=12, kinds=("png8", "png16", "jpeg")):
    paths = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        p = folder / f"{i:02d}.{'jpg' if kind == 'jpeg' else 'png'}"
        write_image(p, kind, 20 + 4 * i, 30, i)
        paths.append(str(p))
    return paths


def cfg(tmp_path, **kw):
    return typed(ImageFilesData, {"image_size": 24, "cache_dir": str(tmp_path / "cache"), **kw}, where="data")


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = images.decode_image

    def counting(path, spec):
        calls.append(path)  # list.append is atomic: safe from the decoding threads
        return real(path, spec)

    monkeypatch.setattr(images, "decode_image", counting)
    return calls


def entries(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())


def test_second_load_decodes_nothing_and_touching_a_file_decodes_only_it(tmp_path, count_decodes):
    paths = make_files(tmp_path / "img")
    first = load_images(paths, cfg(tmp_path), label="t", anchor=tmp_path)
    assert len(count_decodes) == 12 and isinstance(first.images, np.memmap)
    count_decodes.clear()
    again = load_images(paths, cfg(tmp_path), label="t", anchor=tmp_path)
    assert count_decodes == []
    np.testing.assert_array_equal(again.images, first.images)
    # The cached arrays are exactly what decoding gives.
    np.testing.assert_array_equal(again.images[3], decode_image(paths[3], ImageSpec(24, "crop")))

    st = os.stat(paths[5])
    os.utime(paths[5], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    write_image(Path(paths[5]), "jpeg", 44, 30, 99)  # new content too
    before = entries(tmp_path)
    changed = load_images(paths, cfg(tmp_path), label="t", anchor=tmp_path)
    assert count_decodes == [paths[5]]  # the other 11 rows come from the old entry
    np.testing.assert_array_equal(changed.images[5], decode_image(paths[5], ImageSpec(24, "crop")))
    np.testing.assert_array_equal(np.delete(changed.images, 5, 0), np.delete(first.images, 5, 0))
    after = entries(tmp_path)
    assert len(before) == len(after) == 1 and before != after  # the superseded entry is gone


def test_other_settings_make_other_entries(tmp_path, count_decodes):
    paths = make_files(tmp_path / "img", n=4)
    load_images(paths, cfg(tmp_path), label="t", anchor=tmp_path)
    load_images(paths, cfg(tmp_path, image_size=16), label="t", anchor=tmp_path)
    load_images(paths, cfg(tmp_path, resize="pad"), label="t", anchor=tmp_path)
    assert len(count_decodes) == 12 and len(entries(tmp_path)) == 3
    # A subset of the same files (e.g. frontal_only) gets its own entry built from the old rows.
    count_decodes.clear()
    sub = load_images(paths[:2], cfg(tmp_path), label="t", anchor=tmp_path)
    assert count_decodes == [] and sub.images.shape == (2, 1, 24, 24)


def test_default_geometry_is_the_papers_centre_crop(tmp_path):
    # "Cropped and resized to 224x224": a 2:1 film whose outer quarters are black loses exactly them.
    a = np.full((32, 64), 255, dtype=np.uint8)
    a[:, :16] = a[:, 48:] = 0
    Image.fromarray(a).save(tmp_path / "wide.png")
    assert str(cfg(tmp_path).resize) == "crop"
    out = load_images([str(tmp_path / "wide.png")], cfg(tmp_path, image_size=32), label="t", anchor=tmp_path)
    assert out.images.shape == (1, 1, 32, 32) and (out.images[0] == 255).all()
    padded = load_images([str(tmp_path / "wide.png")], cfg(tmp_path, image_size=32, resize="pad"), label="t",
                         anchor=tmp_path).images[0, 0]
    assert (padded[:8] == 0).all() and (padded[12:20, :6] == 0).all() and (padded[12:20, 12:20] == 255).all()


def test_cache_off_decodes_every_time(tmp_path, count_decodes):
    paths = make_files(tmp_path / "img", n=3)
    for _ in range(2):
        out = load_images(paths, cfg(tmp_path, cache=False), label="t", anchor=tmp_path)
    assert len(count_decodes) == 6 and not (tmp_path / "cache").exists()
    assert out.images.shape == (3, 1, 24, 24)


def test_auto_channels(tmp_path):
    grey = make_files(tmp_path / "grey", n=3)
    assert load_images(grey, cfg(tmp_path, channels="auto"), label="g", anchor=tmp_path).channels == 1
    mixed = grey + make_files(tmp_path / "rgb", n=1, kinds=("rgb",))
    out = load_images(mixed, cfg(tmp_path, channels="auto"), label="m", anchor=tmp_path)
    assert out.channels == 3 and out.images.shape == (4, 3, 24, 24)
    assert (out.images[0, 0] == out.images[0, 2]).all()  # grey images replicated


def test_duplicate_paths_are_decoded_once(tmp_path, count_decodes):
    paths = make_files(tmp_path / "img", n=2)
    out = load_images([paths[0], paths[1], paths[0]], cfg(tmp_path), label="t", anchor=tmp_path)
    assert len(count_decodes) == 2 and out.images.shape[0] == 2 and list(out.row_index) == [0, 1, 0]
    assert out.take(np.array([2, 0])).shape == (2, 1, 24, 24)


@pytest.mark.parametrize("with_lock", [True, False])
def test_concurrent_builders_leave_one_complete_entry(tmp_path, monkeypatch, count_decodes, with_lock):
    paths = make_files(tmp_path / "img", n=8)
    if not with_lock:
        monkeypatch.setattr(cache, "fcntl", None)  # rename alone must still keep the cache whole
    results, errors = [], []
    start = threading.Barrier(3)

    def job():
        start.wait()
        try:
            results.append(load_images(paths, cfg(tmp_path), label="t", anchor=tmp_path).images)
        except Exception as err:  # surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 3
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    names = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(entries(tmp_path)) == 1 and not [n for n in names if ".tmp-" in n]
    if with_lock:
        assert len(count_decodes) == 8  # the others waited for the first builder


def test_leftovers_of_a_killed_build_are_removed(tmp_path):
    paths = make_files(tmp_path / "img", n=2)
    entry = load_images(paths, cfg(tmp_path), label="t", anchor=tmp_path).location
    shutil.rmtree(entry)
    dead = entry.parent / f"{entry.name}.tmp-999999-deadbeef"
    dead.mkdir()
    (dead / "images.npy").write_bytes(b"half")
    load_images(paths, cfg(tmp_path), label="t", anchor=tmp_path)
    assert not dead.exists() and json.loads((entry / "index.json").read_text())["ok"] == 2


def test_default_cache_dir_next_to_data_or_in_xdg(tmp_path, monkeypatch):
    assert cache.default_cache_dir(tmp_path) == tmp_path / ".rtl_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the data folder should be: .rtl_cache cannot be made
    assert cache.default_cache_dir(blocked) == tmp_path / "xdg" / "rethink_tl"


def test_bad_files_are_all_listed_or_skipped(tmp_path):
    paths = make_files(tmp_path / "img", n=6)
    (tmp_path / "img" / "02.jpg").write_bytes(b"garbage")
    gone = [str(tmp_path / "img" / f"gone{i}.png") for i in range(7)]
    with pytest.raises(UserError) as err:
        load_images(paths + gone, cfg(tmp_path), label="t", anchor=tmp_path)
    msg = str(err.value)
    assert "8 of 13 images cannot be used" in msg and "02.jpg (unreadable" in msg and "gone0.png (missing)" in msg
    assert "and 3 more" in msg and "data.on_bad_image=skip" in msg and "\n" not in msg
    out = load_images(paths + gone, cfg(tmp_path, on_bad_image="skip"), label="t", anchor=tmp_path)
    assert out.ok.tolist() == [True, True, False, True, True, True] + [False] * 7


def test_nothing_exists_hints_at_the_root(tmp_path):
    with pytest.raises(UserError, match="none of the 2 image files exists.*data.root"):
        load_images([str(tmp_path / "a.png"), str(tmp_path / "b.png")], cfg(tmp_path), label="t", anchor=tmp_path)


@pytest.mark.parametrize("key,value", [("resize", "squash"), ("channels", "2"), ("on_bad_image", "ignore"),
                                       ("rescale16", "clip")])
def test_bad_settings(tmp_path, key, value):
    paths = make_files(tmp_path / "img", n=1)
    with pytest.raises(UserError, match=f"data.{key}"):
        load_images(paths, cfg(tmp_path, **{key: value}), label="t", anchor=tmp_path)
