"""rtl explain: which test images it picks, where Grad-CAM looks (every zoo model), the figure, bad input."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import compose_cfg, train_tiny
from rethink_tl.cli import main
from rethink_tl.inference.explain import explain, grad_cam, pick, target_layer, target_layer_name
from rethink_tl.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_CONFIGS = sorted(p.name[:-len(".yaml")] for p in resources.files("rethink_tl.conf").joinpath("model").iterdir()
                       if p.name.endswith(".yaml"))
# The block each zoo model is explained at: ResNet's last bottleneck, DenseNet's last transition (cut) or last dense
# block (whole, slim), the last block of the stage a timm trunk is cut after (whole: its head convolution), a CBR
# net's last convolution.
TARGETS = {
    "cbr_large_t": "conv5", "cbr_large_w": "conv4", "cbr_small": "conv4", "cbr_tiny": "conv4",
    "dens_f": "denseblock4", "densenet121": "denseblock4", "dens_s1": "denseblock4", "dens_s2": "denseblock4",
    "dens_s3": "denseblock4", "dens_t1": "transition1", "dens_t2": "transition2", "dens_t3": "transition3",
    "res_f": "layer4.2", "resnet50": "layer4.2", "res_t1": "layer3.0", "res_t2": "layer3.4", "res_t3": "layer4.0",
    "res_t4": "layer4.1", "res_t5": "layer4.2",
    "timm": "conv_head", "trunc": "blocks.4.2", "lite0_t2": "blocks.2.1", "lite0_t3": "blocks.4.2",
}
GROUP_TITLES = {"tp": "highest-scored positives", "fn": "lowest-scored positives", "fp": "highest-scored negatives"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One finished tiny run (trunc cut=1, synthetic 32 px; 60 test images: 24 opacity, 18 nodule positives)."""
    out = tmp_path_factory.mktemp("explain") / "run"
    train_tiny(out)
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("last.pt", "explain"))
    return copy


def _test_predictions(run_dir: Path) -> pd.DataFrame:
    with gzip.open(run_dir / "predictions.csv.gz", "rt") as fh:
        df = pd.read_csv(fh, dtype={"id": str})
    return df[df["split"] == "test"].reset_index(drop=True)


def _expected(df: pd.DataFrame, label: str, n: int) -> dict[str, list[str]]:
    """The groups, worked out from the file with plain Python: sort keys (probability, file position)."""
    rows = [(r[f"prob_{label}"], k, r["id"], r[f"true_{label}"]) for k, r in df.iterrows() if r[f"mask_{label}"] == 1]
    pos = [r for r in rows if r[3] == 1]
    neg = [r for r in rows if r[3] == 0]
    top = [r[2] for r in sorted(pos, key=lambda r: (-r[0], r[1]))][:n]
    return {"tp": top,
            "fn": [r[2] for r in sorted(pos, key=lambda r: (r[0], r[1])) if r[2] not in top][:n],
            "fp": [r[2] for r in sorted(neg, key=lambda r: (-r[0], r[1]))][:n]}


def _shown(stdout: str) -> dict[tuple[str, str], list[str]]:
    """What rtl explain printed per row: (label, group) -> ids."""
    out = {}
    for line in stdout.splitlines():
        for key, title in GROUP_TITLES.items():
            head = f", {title}: "
            if head in line:
                label, rest = line.split(head)
                out[(label, key)] = [] if rest == "none" else [item.split(" (p=")[0] for item in rest.split(", ")]
    return out


# --- picking ------------------------------------------------------------------------------------------------------

def test_pick_orders_groups_and_skips_masked_entries():
    probs = np.array([0.9, 0.8, 0.7, 0.2, 0.95, 0.6, 0.1, 0.8, 0.99])
    truth = np.array([1, 1, 0, 1, 0, 0, 0, 1, 1])
    counted = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=bool)  # row 8 (the top probability) is unknown
    got = pick(probs, truth, counted, n=2)
    assert got == {"tp": [0, 1], "fn": [3, 7], "fp": [4, 2]}  # no image in two groups
    # Ties keep file order (rows 1 and 7 share 0.8), and a group shorter than n shows what there is.
    got = pick(probs, truth, counted, n=10)
    assert got == {"tp": [0, 1, 7, 3], "fn": [], "fp": [4, 2, 5, 6]}
    assert pick(probs, truth, np.zeros(9, dtype=bool), n=3) == {"tp": [], "fn": [], "fp": []}


# --- where Grad-CAM looks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_target_layer_is_the_last_conv_block_feeding_the_features(name):
    """For every zoo model: the last convolution to run lies in the target, nothing after it convolves, and its
    output is the trunk's feature map (channels and size), or for CBR nets that map before the last max-pool.
    Shapes only: the forward runs on the meta device, so 217 px CBR inputs cost nothing."""
    model = build_model(compose_cfg([f"model={name}"]).model, num_labels=2, image_size=64).eval()
    layer = target_layer(model)
    assert target_layer_name(model) == TARGETS[name]
    inside = set(layer.modules())
    model = model.to("meta")
    order: list[nn.Module] = []
    out_shape: list[torch.Size] = []

    def record(module, args, output):
        order.append(module)
        if module is layer:
            out_shape.append(output.shape)

    watched = [m for m in model.trunk.modules()
               if m is layer or any(p.ndim == 4 for p in m.parameters(recurse=False))
               or isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    handles = [m.register_forward_hook(record) for m in watched]
    size = max(64, model.info.min_image_size)
    with torch.no_grad():
        features = model.forward_trunk(torch.zeros(2, 3, size, size, device="meta"))
    for h in handles:
        h.remove()

    assert len(out_shape) == 1, f"{name}: {target_layer_name(model)} ran {len(out_shape)} times"
    convs = [m for m in order if any(p.ndim == 4 for p in m.parameters(recurse=False))]
    assert convs[-1] in inside, f"{name}: a convolution runs after {target_layer_name(model)}"
    after = order[order.index(layer) + 1:]
    assert not [m for m in after if m not in inside and m in convs]
    n, c, h, w = out_shape[0]
    assert (n, c) == tuple(features.shape[:2]) == (2, model.info.num_features)
    if any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in after):
        assert name.startswith("cbr_") and h > features.shape[2] and w > features.shape[3]
    else:
        assert (h, w) == tuple(features.shape[2:])


def test_every_model_config_has_a_target():
    assert sorted(TARGETS) == MODEL_CONFIGS


@pytest.mark.parametrize("name", ["res_t1", "dens_t1", "dens_s3", "lite0_t2"])
def test_grad_cam_maps_every_image_at_its_size(name):
    torch.manual_seed(0)
    model = build_model(compose_cfg([f"model={name}"]).model, num_labels=2, image_size=64).eval()
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    maps = grad_cam(model, images, label_index=1)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind on the model


# --- the command ----------------------------------------------------------------------------------------------------

def test_explain_draws_the_picked_images(run_dir, capsys):
    main(["explain", str(run_dir), "--n", "3"])
    out = capsys.readouterr().out
    png, pdf = run_dir / "explain" / "explain.png", run_dir / "explain" / "explain.pdf"
    assert f"{png}\n{pdf}" in out
    with Image.open(png) as im:
        width, height = im.size
    # 3 columns of tiles, 2 labels x 3 groups = 6 rows: a tall page of readable tiles.
    assert 500 <= width <= 1200 and 1.5 * width < height <= 3000
    assert pdf.read_bytes()[:5] == b"%PDF-"
    df = _test_predictions(run_dir)
    shown = _shown(out)
    for label in ("opacity", "nodule"):
        for key, ids in _expected(df, label, 3).items():
            assert shown[(label, key)] == ids, (label, key)
    # Synthetic data: the maps are measured against the painted findings.
    assert "opacity: CAM mass inside the painted finding: " in out and "x its area share" in out


def test_explain_tiles_are_the_runs_test_images(run_dir):
    from rethink_tl.data import build_data
    from rethink_tl.inference.finished import infer, load_run

    result = explain(run_dir, label="nodule", n=2, write=False)
    assert [r.group for r in result.rows] == ["tp", "fn", "fp"] and result.layer == "blocks.1.1"
    run = load_run(run_dir)
    test = build_data(run.cfg.data, train_seed=0).test
    for row in result.rows:
        for t in row.tiles:
            image = test.images[test.ids.index(t.id)]
            assert np.array_equal(np.rint(t.image * 255).astype(np.uint8), image[0].numpy())
            # the checkpoint says of this image what predictions.csv.gz says
            assert infer(run.model, image[None])[0, 1] == pytest.approx(t.prob, abs=1e-5)
            assert t.cam.shape == (32, 32) and t.finding.shape == (32, 32)
            assert t.finding.any() == bool(t.truth)  # a painted nodule exactly where the truth says so
    mass, area, count = result.inside["nodule"]
    assert count == 2 and 0 < area < 0.2 and 0 <= mass <= 1


def test_explain_one_label_with_too_few_images(run_dir, tmp_path, capsys):
    main(["explain", str(run_dir), "--label", "nodule", "--n", "16", "--out", str(tmp_path / "maps")])
    out = capsys.readouterr().out
    # 18 nodule positives in the tiny test split: 16 highest-scored, the other 2 lowest-scored; negatives abound.
    assert "note: nodule: only 2 lowest-scored positives to show, not 16" in out
    assert "highest-scored negatives to show" not in out and "only 16" not in out
    shown = _shown(out)
    assert [len(shown[("nodule", k)]) for k in ("tp", "fn", "fp")] == [16, 2, 16]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["nodule.pdf", "nodule.png"]


def _no_best(run: Path) -> list[str]:
    (run / "best.pt").unlink()
    return [str(run)]


def _data_changed(run: Path) -> list[str]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    cfg.data.seed = 5  # other images, other labels: the rebuilt test split is not the run's
    OmegaConf.save(cfg, run / "config.yaml")
    return [str(run)]


@pytest.mark.parametrize("make, words", [
    (_no_best, "has no best.pt"),
    (lambda run: [str(run), "--label", "effusion"], "no label 'effusion'; its labels: opacity, nodule"),
    (lambda run: [str(run), "--n", "0"], "--n must be 1 to 16"),
    (lambda run: [str(run), "--n", "1000"], "--n must be 1 to 16"),
    (_data_changed, "changed since the run"),
])
def test_bad_input_is_one_line_exit_2(run_dir, tmp_path, capsys, make, words):
    args = make(_copy(run_dir, tmp_path))
    with pytest.raises(SystemExit) as exc:
        main(["explain", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("rtl: error: ") and err.count("\n") == 1 and words in err
    assert not (tmp_path / "run" / "explain").exists()


@pytest.mark.slow
def test_unknown_run_dir_in_a_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rethink_tl.cli", "explain", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("rtl: error: ") and "is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
