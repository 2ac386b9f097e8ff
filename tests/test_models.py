"""Every registered model builds and runs; architectures match the paper's definitions."""

import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.densenet import _DenseLayer

import rethink_tl

from rethink_tl.identity import identity
from rethink_tl.errors import UserError
from conftest import compose_cfg
from rethink_tl.models import MODEL_NAMES, Classifier, ModelInfo, build_model, canonical_name, check_image_size

# The paper's CBR table, written out again here so the tests do not just echo the implementation:
# (kernel, channels, max-pool after each conv).
CBR_TABLE = {
    "cbr_large_t": (7, [32, 64, 128, 256, 512], [True, True, True, True, False]),
    "cbr_large_w": (7, [64, 128, 256, 512], [True] * 4),
    "cbr_small": (7, [32, 64, 128, 256], [True] * 4),
    "cbr_tiny": (5, [64, 128, 256, 512], [True] * 4),
}
CONF_MODEL = Path(rethink_tl.__file__).parent / "conf" / "model"
RESNET_CONVS = {"res_t1": 25, "res_t2": 37, "res_t3": 43, "res_t4": 46, "res_t5": 49}


pytestmark = pytest.mark.usefixtures("one_thread")


def _forward(model: nn.Module, size: int, batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


def cbr_min_size(kernel: int, pools: list[bool]) -> int:
    """Backwards from a 1x1 output: a valid kxk conv needs k-1 more pixels, a 3/2 max-pool 2n+1."""
    size = 1
    for pool in reversed(pools):
        if pool:
            size = 2 * size + 1
        size += kernel - 1
    return size


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_and_predicts_from_its_config_file(name):
    cfg = compose_cfg([f"model={name}"]).model
    assert cfg.name == canonical_name(name)  # an alias's config names the model it stands for
    model = build_model(cfg, num_labels=3)
    info = model.info
    assert isinstance(model, Classifier) and isinstance(info, ModelInfo)
    assert info.kind in ("cbr", "full", "truncated", "slim")
    assert len(info.mean) == 3 and len(info.std) == 3
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (info.num_features, 3)
    size = max(64, info.min_image_size)
    assert _forward(model, size).shape == (2, 3)
    trunk_keys = list(model.trunk.state_dict())
    for prefix in info.reused_prefixes:
        assert any(k.startswith(prefix) for k in trunk_keys), prefix


# Config files that are a registered model with fixed options (model=lite0_t2 is model=trunc
# model.backbone=tf_efficientnet_lite0 model.cut=2), not models of their own.
PRESETS = {"lite0_t2": ("trunc", 2), "lite0_t3": ("trunc", 3)}


def test_every_config_file_names_a_model():
    assert sorted(p.stem for p in CONF_MODEL.glob("*.yaml")) == sorted([*MODEL_NAMES, *PRESETS])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_preset_is_the_same_setting_as_the_model_it_names(preset):
    name, cut = PRESETS[preset]
    a = compose_cfg([f"model={preset}"])
    b = compose_cfg([f"model={name}", "model.backbone=tf_efficientnet_lite0", f"model.cut={cut}"])
    assert identity(a) == identity(b) and a.model.tag == f"trunc-tf_efficientnet_lite0-cut{cut}"


def test_config_tags_name_each_model_once():
    cfgs = {name: compose_cfg([f"model={name}"]).model for name in MODEL_NAMES}
    tags = {name: cfg.tag for name, cfg in cfgs.items()}
    assert tags["resnet50"] == tags["res_f"] == "res_f" and tags["densenet121"] == tags["dens_f"] == "dens_f"
    assert len(set(tags.values())) == len(MODEL_NAMES) - 2
    trunc = cfgs["trunc"]
    trunc.backbone, trunc.cut = "resnet18", 1
    assert trunc.tag == "trunc-resnet18-cut1"


def test_aliases_build_the_canonical_models():
    assert {"resnet50", "densenet121"} <= set(MODEL_NAMES)
    assert build_model({"name": "resnet50"}, 2).info.name == "res_f"
    assert build_model({"name": "densenet121"}, 2).info.name == "dens_f"


def test_model_info_of_deep_and_timm_models():
    dens = build_model({"name": "dens_f"}, 2).info
    assert (dens.kind, dens.arch, dens.family) == ("full", "densenet121", "torchvision")
    assert dens.source_prefix == "features."
    assert dens.mean == (0.485, 0.456, 0.406) and dens.num_features == 1024
    lite = build_model({"name": "timm", "backbone": "tf_efficientnet_lite0"}, 2).info
    assert (lite.kind, lite.arch, lite.family, lite.num_features) == ("full", "tf_efficientnet_lite0", "timm", 1280)
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5)


def test_unknown_config_keys_are_errors():
    with pytest.raises(UserError, match="model.whatever"):
        build_model({"name": "cbr_tiny", "whatever": 1}, 2)


@pytest.mark.parametrize("name", sorted(RESNET_CONVS))
def test_truncated_resnets_keep_the_papers_number_of_convs(name):
    trunk = build_model({"name": name}, 2).trunk
    convs = [n for n, m in trunk.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    assert len(convs) == RESNET_CONVS[name]
    # torchvision names survive, so pretrained keys map one to one.
    reference = torchvision.models.resnet50().state_dict()
    for key, value in trunk.state_dict().items():
        assert reference[key].shape == value.shape


def test_res_t5_is_the_whole_resnet_trunk():
    whole = build_model({"name": "res_f"}, 2).trunk.state_dict()
    cut = build_model({"name": "res_t5"}, 2).trunk.state_dict()
    assert list(cut) == list(whole)
    assert set(torchvision.models.resnet50().state_dict()) - set(whole) == {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_truncated_densenets_end_at_their_transition(blocks):
    model = build_model({"name": f"dens_t{blocks}"}, 2)
    names = [n for n, _ in model.trunk.named_children()]
    assert names[-1] == f"transition{blocks}"
    assert not any(n == f"denseblock{j}" for j in range(blocks + 1, 5) for n in names)
    assert model.info.num_features == {1: 128, 2: 256, 3: 512}[blocks]
    features = torchvision.models.densenet121().features.state_dict()
    for key, value in model.trunk.state_dict().items():
        assert features[key].shape == value.shape


def test_full_densenet_applies_the_final_relu():
    model = build_model({"name": "dens_f"}, 2)
    names = [n for n, _ in model.trunk.named_children()]
    assert names[-2:] == ["norm5", "relu5"]
    assert isinstance(model.trunk.relu5, nn.ReLU)
    model.eval()
    with torch.no_grad():
        features = model.forward_trunk(torch.randn(1, 3, 32, 32))
    assert features.min() >= 0


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_slim_densenets_halve_the_growth_rate_above_block_k(keep):
    model = build_model({"name": f"dens_s{keep}"}, 2)
    layers_per_block = {1: 6, 2: 12, 3: 24, 4: 16}
    for block in range(1, 5):
        layers = [m for m in getattr(model.trunk, f"denseblock{block}").modules() if isinstance(m, _DenseLayer)]
        assert len(layers) == layers_per_block[block]
        growth = 32 if block <= keep else 16
        assert {layer.conv2.out_channels for layer in layers} == {growth}
        assert {layer.conv1.out_channels for layer in layers} == {4 * growth}  # bn_size 4
    assert model.info.kind == "slim"
    assert not any(p.startswith(f"denseblock{keep + 1}") for p in model.info.reused_prefixes)
    assert f"transition{keep}." in model.info.reused_prefixes


def test_slim_widths_follow_densenet_rules():
    # dens_s2: 256 ch after transition2; block3 adds 24 x 16 -> 640, transition3 halves -> 320,
    # block4 adds 16 x 16 -> 576.
    model = build_model({"name": "dens_s2"}, 2)
    assert model.trunk.transition3.conv.out_channels == 320
    assert model.trunk.norm5.num_features == 576 == model.info.num_features


@pytest.mark.parametrize("name", sorted(CBR_TABLE))
def test_cbr_parameter_count_matches_the_layer_table(name):
    kernel, channels, _ = CBR_TABLE[name]
    expected, cin = 0, 3
    for cout in channels:
        expected += kernel * kernel * cin * cout + 2 * cout  # bias-free conv, BN weight and bias
        cin = cout
    expected += cin * 3 + 3  # head
    model = build_model({"name": name}, num_labels=3)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", sorted(CBR_TABLE))
def test_cbr_min_image_size_is_exact(name):
    kernel, _, pools = CBR_TABLE[name]
    smallest = cbr_min_size(kernel, pools)
    model = build_model({"name": name}, num_labels=3)
    assert model.info.min_image_size == smallest
    assert _forward(model, smallest, batch=1).shape == (1, 3)
    with pytest.raises(RuntimeError):
        _forward(model, smallest - 1, batch=1)


def test_cbr_min_sizes_by_name():
    assert {n: cbr_min_size(k, p) for n, (k, _, p) in CBR_TABLE.items()} == {
        "cbr_large_t": 217, "cbr_large_w": 121, "cbr_small": 121, "cbr_tiny": 91}


def test_check_image_size_names_the_smallest_size():
    model = build_model({"name": "cbr_large_t"}, 2)
    with pytest.raises(UserError, match=r"cbr_large_t.*at least 217 px \(got 64\).*data\.image_size=217"):
        check_image_size(model, 64)
    check_image_size(model, 217)
    check_image_size(build_model({"name": "dens_t1"}, 2), 64)


def test_unknown_model_lists_known_names():
    with pytest.raises(UserError) as err:
        build_model({"name": "densenet12"}, 2)
    message = str(err.value)
    assert "densenet12" in message
    for name in MODEL_NAMES:
        assert name in message
    with pytest.raises(UserError, match="cbr_tiny"):
        build_model({}, 2)


def test_trunc_keeps_timm_names_and_shapes():
    model = build_model({"name": "trunc", "backbone": "tf_efficientnet_lite0", "cut": 2}, 3)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="").state_dict()
    trunk = model.trunk.state_dict()
    assert set(trunk) < set(full)
    assert all(full[k].shape == v.shape for k, v in trunk.items())
    assert not any(k.startswith(("blocks.3.", "conv_head.")) for k in trunk)
    assert model.info.kind == "truncated" and model.info.num_features == 40
    assert _forward(model, 64).shape == (2, 3)
    # Stage 2 of EfficientNet is at stride 8.
    assert model.forward_trunk(torch.randn(1, 3, 64, 64)).shape == (1, 40, 8, 8)


@pytest.mark.parametrize("cut, message", [(5, r"0\.\.4"), (-1, r"0\.\.4"), ("two", r"model.cut: .*Integer")])
def test_trunc_rejects_cuts_out_of_range(cut, message):
    with pytest.raises(UserError, match=message):
        build_model({"name": "trunc", "backbone": "tf_efficientnet_lite0", "cut": cut}, 2)


def test_unknown_timm_backbone_is_a_user_error():
    for cfg in ({"name": "timm"}, {"name": "trunc", "cut": 1}):
        with pytest.raises(UserError, match="timm.list_models"):
            build_model({**cfg, "backbone": "tf_efficientnet_lite9000"}, 2)


@pytest.mark.parametrize("model_cfg, message", [
    ({"name": "dens_t1", "cut": 1}, "model.cut=1 does not apply to model=dens_t1 (only to model=trunc): leave it out"),
    ({"name": "dens_f", "backbone": "resnet18"}, "model.backbone=resnet18 does not apply to model=dens_f (only to "
     "model=timm / trunc)"),
    ({"name": "trunc", "backbone": "resnet18"}, "model=trunc needs model.cut"),
    ({"name": "timm", "backbone": " "}, "model=timm needs model.backbone"),
])
def test_model_keys_apply_only_to_the_models_that_read_them(model_cfg, message):
    from rethink_tl.models import check_model_keys

    with pytest.raises(UserError, match=re.escape(message)):
        check_model_keys(model_cfg)
    with pytest.raises(UserError, match=re.escape(message)):
        build_model(model_cfg, 2)
