"""Chest X-ray weights: torchxrayvision's DenseNet121 in rtl's DenseNet models (init=xrv, that is
init=pretrained init.source=torchxrayvision).

torchxrayvision's real files cannot be had offline, so the tests make files in its layout with its own model
class (``xrv.models.DenseNet(weights=None)``, seeded, with non-trivial BatchNorm statistics): a state dict, and a
whole pickled model in torch's legacy format, as its release files are. Expected values come from torchxrayvision
itself (its tensors, ``xrv.datasets.normalize``, its forward pass), never from the code under test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import TINY_DATA, compose_cfg, fails_in_one_line
from omegaconf import OmegaConf

from rethink_tl.engine import Batcher
from rethink_tl.errors import UserError
from rethink_tl.identity import identity, setting_id
from rethink_tl.models import XRAY_MEAN, XRAY_STD, build_model
from rethink_tl.weights import apply_init
from rethink_tl.weights import sources

xrv = pytest.importorskip("torchxrayvision")

pytestmark = pytest.mark.usefixtures("one_thread")

XRV = {"name": "pretrained", "source": "torchxrayvision"}
ALL_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
ALL_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/" + ALL_FILE
# The setting id of this ImageNet run before init.source existed (measured on the code without it): unchanged.
IMAGENET_DENS_T2 = "a757d19f"
RUN = [o for o in TINY_DATA if o != "init=random"] + ["model=dens_t2", "train.epochs=1", "runtime.threads=1"]


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """torchxrayvision's cache is ~/.torchxrayvision/models_data: each test gets an empty HOME (and torch hub)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def xrv_net():
    """torchxrayvision's own DenseNet121 class, seeded, its BatchNorm statistics made non-trivial (fresh ones are
    0 and 1, which would hide a statistic that was not carried over), in eval mode."""
    torch.manual_seed(7)
    net = xrv.models.DenseNet(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def xrv_files(tmp_path_factory, xrv_net):
    """{"state": a state dict file, "pickled": the whole model pickled (legacy format, as torchxrayvision's releases),
    "imagenet": torchvision's DenseNet121 (3-channel) state dict} and the state dict they hold."""
    folder = tmp_path_factory.mktemp("xrv_files")
    state = xrv_net.state_dict()
    files = {"state": folder / "xrv_state.pt", "pickled": folder / ALL_FILE, "imagenet": folder / "densenet121.pth"}
    # A loaded xrv model's state dict also holds its output calibration, which is not a weight.
    torch.save({**state, "op_threshs": torch.rand(18)}, files["state"])
    torch.save(xrv_net, files["pickled"], _use_new_zipfile_serialization=False)
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), files["imagenet"])
    return files, state


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def grey_images(n: int = 3, size: int = 64, channels: int = 1, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8))


# --- the weights land by name ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["state", "pickled"])
def test_xrv_files_load_into_dens_t2_every_tensor_by_name(xrv_files, kind):
    files, state = xrv_files
    model = build_model({"name": "dens_t2"}, 2, init=XRV)
    assert model.info.in_chans == 1 and model.trunk.conv0.weight.shape == (64, 1, 7, 7)
    report = apply_init(model, {**XRV, "weights": str(files[kind])})
    trunk = model.trunk.state_dict()
    assert report.loaded == list(trunk) and len(trunk) == 234
    for key, tensor in trunk.items():
        assert torch.equal(tensor, state["features." + key]), key
    assert report.strategy == "Truncated-TL" and report.new == ["head"]
    assert report.source == str(files[kind]) and report.sha256 == sha256(files[kind])
    # Which of xrv's weights a file is, by the name its release gives it.
    named = {"pickled": "torchxrayvision densenet121-res224-all", "state": "torchxrayvision DenseNet121"}
    assert report.about == named[kind]


def test_dens_f_and_a_slim_model_take_the_file_by_name(xrv_files):
    files, state = xrv_files
    full = build_model({"name": "dens_f"}, 3, init=XRV)
    report = apply_init(full, {**XRV, "weights": str(files["state"])})
    trunk = full.trunk.state_dict()
    assert len(trunk) == len([k for k in state if k.startswith("features.")]) == 725
    assert report.loaded == list(trunk) and report.strategy == "TL"
    assert all(torch.equal(v, state["features." + k]) for k, v in trunk.items())

    slim = build_model({"name": "dens_s2"}, 3, init=XRV)
    report = apply_init(slim, {**XRV, "weights": str(files["pickled"])})
    trunk = slim.trunk.state_dict()
    kept = ("conv0.", "norm0.", "denseblock1.", "transition1.", "denseblock2.", "transition2.")
    assert report.loaded == [k for k in trunk if k.startswith(kept)] and "conv0.weight" in report.loaded
    assert all(torch.equal(trunk[k], state["features." + k]) for k in report.loaded)
    assert report.strategy == "Transfusion"
    assert report.new == ["head", "trunk.denseblock3", "trunk.transition3", "trunk.denseblock4", "trunk.norm5"]


def test_the_file_in_torchxrayvisions_cache_is_found(xrv_files, tmp_path):
    files, state = xrv_files
    cache = tmp_path / "home" / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    (cache / ALL_FILE).write_bytes(files["pickled"].read_bytes())
    model = build_model({"name": "dens_t1"}, 2, init=XRV)
    report = apply_init(model, {**XRV, "download": False})
    assert report.source == str(cache / ALL_FILE) and report.about == "torchxrayvision densenet121-res224-all"
    assert all(torch.equal(v, state["features." + k]) for k, v in model.trunk.state_dict().items())


def test_a_download_goes_to_torchxrayvisions_cache(xrv_files, tmp_path, monkeypatch):
    """init.download=true fetches the file where torchxrayvision keeps it (the network faked: tests never download)."""
    files, state = xrv_files
    fetched = []

    def fake_download(url, dst, *args, **kwargs):
        fetched.append(url)
        Path(dst).write_bytes(files["pickled"].read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = build_model({"name": "dens_t3"}, 2, init=XRV)
    report = apply_init(model, XRV)
    assert fetched == [ALL_URL]
    assert report.source == str(tmp_path / "home" / ".torchxrayvision" / "models_data" / ALL_FILE)
    assert all(torch.equal(v, state["features." + k]) for k, v in model.trunk.state_dict().items())


# --- the input is torchxrayvision's, and so are the features ----------------------------------------

def test_grey_input_equals_xrv_normalize_exactly():
    images = grey_images()
    assert images.min() == 0 and images.max() == 255
    info = build_model({"name": "dens_t1"}, 1, init=XRV).info
    assert (info.in_chans, info.mean, info.std) == (1, XRAY_MEAN, XRAY_STD)
    x = Batcher.for_model(info, torch.device("cpu"), channels_last=False)(images)
    expected = torch.stack([torch.from_numpy(xrv.datasets.normalize(im[0].numpy(), 255, reshape=True))
                            for im in images])
    assert x.shape == expected.shape == (3, 1, 64, 64) and x.dtype == expected.dtype == torch.float32
    assert torch.equal(x, expected)
    assert float(x.min()) == -1024.0 and float(x.max()) == 1024.0


def test_colour_input_is_the_mean_of_its_channels_as_xrv_shows():
    """xrv's README: ``img = xrv.datasets.normalize(img, 255); img = img.mean(2)[None, ...]``."""
    images = grey_images(channels=3, seed=1)
    info = build_model({"name": "dens_t1"}, 1, init=XRV).info
    x = Batcher.for_model(info, torch.device("cpu"), channels_last=True)(images)
    expected = torch.stack([torch.from_numpy(xrv.datasets.normalize(im.permute(1, 2, 0).numpy(), 255).mean(2)[None])
                            for im in images])
    assert x.shape == (3, 1, 64, 64)
    torch.testing.assert_close(x, expected, rtol=0, atol=2e-4)  # float32 at |x| <= 1024: a few ulp


def test_dens_f_computes_xrvs_features_and_logits(xrv_files, xrv_net):
    files, _ = xrv_files
    model = build_model({"name": "dens_f"}, 18, init=XRV)
    apply_init(model, {**XRV, "weights": str(files["pickled"])})
    model.head.load_state_dict(xrv_net.classifier.state_dict())  # the same head, to compare whole outputs
    model.eval()
    x = Batcher.for_model(model.info, torch.device("cpu"), channels_last=False)(grey_images(size=96, seed=2))
    with torch.no_grad():
        ours = F.adaptive_avg_pool2d(model.forward_trunk(x), 1).flatten(1)
        theirs = xrv_net.features2(x.clone())
        assert ours.shape == theirs.shape == (3, 1024) and float(theirs.abs().max()) > 0.1
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), xrv_net(x.clone()), rtol=1e-4, atol=1e-5)


# --- a real run: provenance, identity, folders, and being loaded back -----------------------------

def test_a_tiny_run_records_the_file_and_has_a_setting_of_its_own(xrv_files, tmp_path):
    from rethink_tl.cli import main
    from rethink_tl.evidence.results import read_run
    from rethink_tl.inference.finished import load_run

    files, _ = xrv_files
    weights = f"init.weights={files['pickled']}"
    run = tmp_path / "run"
    main(["train", *RUN, "init=pretrained", "init.source=torchxrayvision", weights, f"hydra.run.dir={run}"])
    row = read_run(run).row  # results.csv agrees with identity.json (the init column is the init's tag)
    assert row["init"] == "xrv" and row["strategy"] == "Truncated-TL"
    assert row["weights"] == str(files["pickled"]) and row["weights_sha256"] == sha256(files["pickled"])
    stored = OmegaConf.load(run / "identity.json")
    assert stored.settings["init.source"] == "torchxrayvision"
    assert stored.settings["init.weights"] == str(files["pickled"])

    xrv_cfg = compose_cfg([*RUN, "init=xrv", weights])
    assert row["setting_id"] == setting_id(xrv_cfg)  # init=xrv is this very setting
    imagenet = compose_cfg([*RUN, "init=pretrained", f"init.weights={files['imagenet']}"])
    assert setting_id(imagenet) != row["setting_id"]
    # Without init.source the ImageNet setting is what it was before init.source existed.
    assert "init.source" not in identity(compose_cfg([*RUN, "init=pretrained"]))
    assert setting_id(compose_cfg([*TINY_DATA[:-1], "model=dens_t2", "init=pretrained"])) == IMAGENET_DENS_T2

    with_hydra = compose_cfg_with_hydra([*RUN, "init=xrv", weights])
    assert f"/dens_t2/xrv/f1/s0-{row['setting_id']}" in str(with_hydra.hydra.run.dir)
    plain = compose_cfg_with_hydra([*RUN, "init=pretrained"])
    assert "/dens_t2/pretrained/f1/" in str(plain.hydra.run.dir)

    finished = load_run(run)  # rtl evaluate / predict / explain / export rebuild it from the run's config
    assert finished.model.info.in_chans == 1 and finished.model.trunk.conv0.weight.shape == (64, 1, 7, 7)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)["model"]
    assert torch.equal(finished.model.state_dict()["trunk.conv0.weight"], best["trunk.conv0.weight"])


def compose_cfg_with_hydra(overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rethink_tl.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    # hydra.run.dir holds ${rtl.setting_id:}, which reads the whole config: resolve it there.
    return OmegaConf.create({"hydra": {"run": {"dir": OmegaConf.select(cfg, "hydra.run.dir")}}})


def test_report_tells_imagenet_and_chest_xray_runs_apart(xrv_files, tmp_path):
    """A sweep of init=pretrained,xrv: two rows in the report and a paired TL-CXR vs TL comparison."""
    import pandas as pd

    from rethink_tl.cli import main

    files, _ = xrv_files
    sweep = tmp_path / "sweep"
    for init, path in (("pretrained", files["imagenet"]), ("xrv", files["pickled"])):
        main(["train", *RUN, f"init={init}", f"init.weights={path}", f"hydra.run.dir={sweep / init}"])
    main(["report", str(sweep), "--resamples", "200"])  # returns: every run is in the tables
    summary = pd.read_csv(sweep / "summary.csv")
    assert sorted(summary["init"]) == ["pretrained", "xrv"] and set(summary["model"]) == {"dens_t2"}
    comparisons = pd.read_csv(sweep / "comparisons.csv")
    pair = comparisons[comparisons["comparison"] == "TL-CXR vs TL"]
    assert len(pair) and set(pair["a_init"]) == {"xrv"} and set(pair["b_init"]) == {"pretrained"}


# --- what a user can get wrong: one line each ---------------------------------------------------------

def test_offline_without_the_file_names_it_where_it_goes_and_its_url(capsys, tmp_path):
    line = fails_in_one_line(capsys, ["train", *RUN, "init=xrv", "init.download=false",
                                      f"hydra.run.dir={tmp_path / 'r'}"])
    assert ALL_FILE in line and ALL_URL in line and "init.weights=FILE" in line and "init.download=true" in line
    assert str(tmp_path / "home" / ".torchxrayvision" / "models_data") in line


def test_a_failed_download_says_the_same_and_why(monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as err:
        apply_init(build_model({"name": "dens_t2"}, 2, init=XRV), XRV)
    message = str(err.value)
    assert "Name or service not known" in message and ALL_FILE in message and ALL_URL in message
    assert "\n" not in message


@pytest.mark.parametrize("model", [["model=res_f"], ["model=res_t2"], ["model=cbr_tiny", "data.image_size=96"],
                                   ["model=trunc", "model.backbone=resnet18", "model.cut=1"]])
def test_a_model_without_chest_xray_weights_is_refused(capsys, tmp_path, model):
    line = fails_in_one_line(capsys, ["train", *RUN, *model, "init=xrv", f"hydra.run.dir={tmp_path / 'r'}"])
    assert "init.source=torchxrayvision (init=xrv) has weights for the DenseNet121 models only" in line
    assert "dens_f" in line and "dens_t2" in line and "dens_s1" in line


def test_a_source_with_random_init_is_refused(capsys, tmp_path):
    line = fails_in_one_line(capsys, ["train", *RUN, "init=random", "init.source=torchxrayvision",
                                      f"hydra.run.dir={tmp_path / 'r'}"])
    assert "init=random" in line and "init=pretrained init.source=torchxrayvision" in line


def test_an_unknown_source_is_refused_by_name(capsys, tmp_path):
    line = fails_in_one_line(capsys, ["train", *RUN, "init=pretrained", "init.source=chexnet",
                                      f"hydra.run.dir={tmp_path / 'r'}"])
    assert "init.source" in line and "torchxrayvision" in line


def test_imagenet_weights_with_the_chest_xray_source_are_named_as_such(capsys, xrv_files, tmp_path):
    files, _ = xrv_files
    line = fails_in_one_line(capsys, ["train", *RUN, "init=xrv", f"init.weights={files['imagenet']}",
                                      f"hydra.run.dir={tmp_path / 'r'}"])
    assert "3-channel input" in line and "features.conv0.weight (64, 3, 7, 7)" in line and "no init.source" in line


def test_a_chest_xray_file_with_imagenet_init_points_to_init_xrv(capsys, xrv_files, tmp_path):
    files, _ = xrv_files
    line = fails_in_one_line(capsys, ["train", *RUN, "init=pretrained", f"init.weights={files['state']}",
                                      f"hydra.run.dir={tmp_path / 'r'}"])
    assert "1-channel input" in line and "init=xrv" in line


def test_a_file_that_is_no_weights_is_refused(capsys, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    line = fails_in_one_line(capsys, ["train", *RUN, "init=xrv", f"init.weights={garbage}",
                                      f"hydra.run.dir={tmp_path / 'r'}"])
    assert f"could not read weights file {garbage}" in line


def test_a_pickled_model_without_torchxrayvision_installed_says_what_to_do(xrv_files, monkeypatch):
    files, _ = xrv_files
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchxrayvision" else real(name, *a))
    model = build_model({"name": "dens_t2"}, 2, init=XRV)
    with pytest.raises(UserError) as err:
        apply_init(model, {**XRV, "weights": str(files["pickled"])})
    message = str(err.value)
    assert "not a plain state dict" in message and "pip install torchxrayvision" in message
    assert "torchxrayvision package is not installed" in message
    # A state dict needs no torchxrayvision at all.
    assert apply_init(model, {**XRV, "weights": str(files["state"])}).loaded
    # Nor is the release file downloaded only to be refused.
    fetched = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, *a, **k: fetched.append(url))
    with pytest.raises(UserError, match="pip install torchxrayvision .* first") as err:
        apply_init(model, XRV)
    assert fetched == [] and ALL_URL in str(err.value)


def test_a_model_built_without_the_init_is_a_bug_not_a_silent_mismatch():
    with pytest.raises(ValueError, match="build_model"):
        apply_init(build_model({"name": "dens_t2"}, 2), XRV)
    with pytest.raises(ValueError, match="build_model"):
        apply_init(build_model({"name": "dens_t2"}, 2, init=XRV), {"name": "pretrained"})


def test_rtls_facts_about_torchxrayvision_are_the_packages():
    """rtl names the files, URLs and cache itself (it reads state dicts without torchxrayvision): they are xrv's."""
    assert sources.xrv_url() == ALL_URL and sources.XRV_DENSENET["densenet121-res224-all"] == ALL_FILE
    assert set(sources.XRV_DENSENET) == {k for k in xrv.models.model_urls if k.startswith("densenet121-res224-")}
    for name, file in sources.XRV_DENSENET.items():
        assert xrv.models.model_urls[name]["weights_url"] == sources.XRV_RELEASE + file
    assert sources.xrv_cache_dir() == Path(xrv.utils.get_cache_dir())


# --- rtl advise takes init=xrv as one more init ------------------------------------------------------------

def test_advise_takes_xrv_as_an_init_and_compares_its_winner_with_both_others(tmp_path):
    from rethink_tl import advise as A

    opts, rest = A.parse(["advise.models=[dens_t2]", "advise.inits=[xrv,random]", "data.image_size=32",
                          "data.num_samples=240", "train.epochs=3", f"hydra.sweep.dir={tmp_path / 'adv'}"])
    plan = A.Plan(opts, rest, A.candidates(opts))
    plan.compose()
    assert [c.label for c in plan.arms] == ["dens_t2 TL-CXR", "dens_t2 RI"]
    assert "/dens_t2/xrv/f1/" in str(plan.runs[0, 0].path) and "/dens_t2/random/f1/" in str(plan.runs[1, 0].path)
    assert plan.runs[0, 0].setting_id == setting_id(compose_cfg(["model=dens_t2", "init=xrv", "data.image_size=32",
                                                                 "data.num_samples=240", "train.epochs=3"]))
    # The chest X-ray winner vs random and vs the whole network with the same (chest X-ray) weights: ImageNet is not
    # named in advise.inits, so no ImageNet arm is trained (a user with chest X-ray weights alone needs no other file).
    refs = A.references(plan, [0])
    assert [(plan.arms[r].tag, plan.arms[r].init) for r in refs] == [("dens_t2", "random"), ("dens_f", "xrv")]
    # named, ImageNet is compared too, and a random-init winner's whole network gets the first pretraining named
    opts, rest = A.parse(["advise.models=[dens_t2]", "advise.inits=[xrv,pretrained,random]", "data.image_size=32",
                          "data.num_samples=240", "train.epochs=3", f"hydra.sweep.dir={tmp_path / 'adv2'}"])
    plan = A.Plan(opts, rest, A.candidates(opts))
    plan.compose()
    refs = A.references(plan, [0])
    assert [(plan.arms[r].tag, plan.arms[r].init) for r in refs] == [("dens_t2", "pretrained"), ("dens_t2", "random"),
                                                                     ("dens_f", "xrv")]
    assert plan.whole_init("random") == "xrv" and plan.whole_init("pretrained") == "pretrained"
    assert not (tmp_path / "adv").exists()  # composing writes nothing to the advise folder


@pytest.mark.parametrize("args, message", [
    (["advise.models=[res_f,dens_t2]", "advise.inits=[xrv,random]"],
     "init.source=torchxrayvision (init=xrv) has weights for the DenseNet121 models only, not for model=res_f"),
    (["advise.inits=[imagenet,random]"], "unknown init 'imagenet'; inits are: pretrained, random, xrv"),
    (["init.source=torchxrayvision"], "rtl advise sets init itself for every candidate: use advise.inits"),
])
def test_advise_refuses_what_cannot_be_in_one_line(capsys, tmp_path, args, message):
    out = tmp_path / "adv"
    line = fails_in_one_line(capsys, ["advise", *args, "data.image_size=32", f"hydra.sweep.dir={out}"])
    assert message in line
    assert not out.exists()


# --- the figure of `make xrv` / rtl report --figure xrv ------------------------------------------------------

def test_the_xrv_figure_draws_random_imagenet_and_chest_xray_bars(tmp_path):
    from test_evidence_figures import bars, fabricated_summary

    from rethink_tl.evidence import figures

    summary, plan = fabricated_summary(tmp_path, "xrv", seeds=(0, 1))
    assert plan.models == ["dens_t1", "dens_t2", "dens_t3", "dens_f"] and plan.inits == ["random", "pretrained", "xrv"]
    fig = figures.FIGURES["xrv"](summary, plan.models, "a note")
    assert "chest X-ray" in fig._suptitle.get_text()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["RI", "TL", "TL-CXR"]
    ax = fig.axes[0]  # AUROC at 5 %
    at = summary[summary.fraction == 0.05].set_index(["model", "init"])
    for drawn, init in zip(bars(ax), plan.inits):
        assert [b.get_height() for b in drawn] == pytest.approx([at.loc[(m, init), "test_auroc_mean"]
                                                                 for m in plan.models])


class _Boom:
    """A pickle that would run a command when unpickled."""

    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/rtl_xrv_pickle_ran",))


def test_a_pickle_naming_anything_but_torchxrayvision_is_refused_unread(tmp_path):
    import os

    from rethink_tl.errors import UserError
    from rethink_tl.weights.sources import read_xrv_file

    evil = tmp_path / "evil.pt"
    torch.save({"x": _Boom()}, evil)
    if os.path.exists("/tmp/rtl_xrv_pickle_ran"):
        os.unlink("/tmp/rtl_xrv_pickle_ran")
    with pytest.raises(UserError, match="names posix.system|names os.system|refused unread"):
        read_xrv_file(evil)
    assert not os.path.exists("/tmp/rtl_xrv_pickle_ran")


def test_a_pickled_xrv_model_given_to_imagenet_init_is_one_line(tmp_path):
    xrv = pytest.importorskip("torchxrayvision")
    from rethink_tl.errors import UserError
    from rethink_tl.weights.sources import read_weights_file

    path = tmp_path / "xrv_model.pt"
    torch.save(xrv.models.DenseNet(weights=None), path)
    with pytest.raises(UserError) as err:
        read_weights_file(path)
    assert "pickled torchxrayvision model" in str(err.value) and "init=xrv" in str(err.value)
    assert "\n" not in str(err.value)
