"""model.head=pool|flatten and model.dropout: what the Linear layer reads, and what the options leave alone."""

import re

import pytest
import torch
import torchvision
from torch import nn

from rethink_tl import config as C
from rethink_tl import identity as ID
from rethink_tl.cli import _hydra_message
from rethink_tl.errors import UserError
from rethink_tl.models import build_model, check_image_size
from rethink_tl.models.registry import _BUILDERS
from rethink_tl.weights import apply_init
from conftest import compose_cfg

# DenseNet121 up to transition1: the /4 stem, dense block 1 (64 + 6 * 32 = 256 channels), then the
# transition halves both the channels (128) and the map (/8): 64 px -> 128 x 8 x 8.
DENS_T1_64 = (128, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_flatten_head_reads_the_whole_dens_t1_feature_map():
    labels = 3
    flat = build_model({"name": "dens_t1", "head": "flatten"}, labels, image_size=64)
    pool = build_model({"name": "dens_t1"}, labels, image_size=64)
    c, h, w = DENS_T1_64
    assert flat.feature_shape == DENS_T1_64
    assert (flat.head.in_features, flat.head.out_features) == (c * h * w, labels) == (8192, 3)
    assert (pool.head.in_features, pool.feature_shape) == (c, None)
    assert n_params(flat) - n_params(pool) == (c * h * w - c) * labels
    flat.eval()
    with torch.no_grad():
        assert flat(torch.randn(5, 3, 64, 64)).shape == (5, labels)


def test_the_probe_changes_neither_the_weights_nor_the_random_stream():
    torch.manual_seed(0)
    trunk = _BUILDERS["dens_t1"]("dens_t1", C.typed(C.ModelConfig, {"name": "dens_t1"}))
    expected_head = nn.Linear(8192, 2)  # the next draws after the trunk's, as if no probe had run
    expected_next = torch.rand(4)
    torch.manual_seed(0)
    flat = build_model({"name": "dens_t1", "head": "flatten"}, 2, image_size=64)
    assert torch.equal(flat.head.weight, expected_head.weight) and torch.equal(flat.head.bias, expected_head.bias)
    assert torch.equal(torch.rand(4), expected_next)
    fresh = trunk.module.state_dict()
    for key, value in flat.trunk.state_dict().items():
        assert torch.equal(value, fresh[key]), key  # running means, variances and batch counts included
    assert flat.trunk.norm0.num_batches_tracked.item() == 0
    assert flat.training and all(m.training for m in flat.trunk.modules())


def test_defaults_keep_the_state_dict_keys_of_a_pooling_head():
    model = build_model({"name": "dens_t1"}, 2)
    trunk_keys = [f"trunk.{k}" for k in model.trunk.state_dict()]
    assert list(model.state_dict()) == [*trunk_keys, "head.weight", "head.bias"]
    assert model.dropout is None and model.feature_shape is None
    # Dropout holds no tensors: a checkpoint of a model without it loads into one with it.
    with_dropout = build_model({"name": "dens_t1", "dropout": 0.1}, 2)
    assert list(with_dropout.state_dict()) == list(model.state_dict())
    with_dropout.load_state_dict(model.state_dict())
    flat = build_model({"name": "dens_t1", "head": "flatten"}, 2, image_size=32)
    assert list(flat.state_dict()) == list(model.state_dict())


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = build_model({"name": "dens_t1", "dropout": 0.1}, 2)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.1
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_no_dropout_at_zero():
    model = build_model({"name": "dens_t1", "dropout": 0.0}, 2)
    assert model.dropout is None
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    x = torch.randn(4, 3, 32, 32)
    model.train()  # batch statistics only: two training-mode passes agree without dropout
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_flatten_needs_the_image_size():
    with pytest.raises(ValueError, match="flatten head needs the input image size"):
        build_model({"name": "dens_t1", "head": "flatten"}, 2)


def test_flatten_at_another_image_size_is_a_clear_error():
    model = build_model({"name": "dens_t1", "head": "flatten"}, 2, image_size=64).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=re.escape(
            "dens_t1 has a flatten head built for 64 px images (128x8x8 features), not for 32x32 px ones (128x4x4)")):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(UserError, match="built for 64 px images and cannot take 32 px ones"):
        check_image_size(model, 32)
    check_image_size(model, 64)
    check_image_size(build_model({"name": "dens_t1"}, 2, image_size=64), 32)  # pooling fits any size


def test_flatten_below_the_minimum_size_is_the_usual_user_error():
    with pytest.raises(UserError, match="cbr_tiny needs images of at least 91 px"):
        build_model({"name": "cbr_tiny", "head": "flatten"}, 2, image_size=64)


@pytest.mark.parametrize("cfg, extra_size, shape", [
    # Four valid 5x5 convs, each followed by a 3/2 max-pool: 107 -> 103, 51 -> 47, 23 -> 19, 9 -> 5, 2.
    ({"name": "cbr_tiny"}, 16, (512, 2, 2)),
    ({"name": "cbr_small"}, 0, (256, 1, 1)),  # its minimum size is the one that leaves a 1x1 map
    # 64 -> 256 (block 1) -> 128 -> 512 (block 2) -> 256, then growth 16: 256 + 24*16 -> 320 + 16*16; /32.
    ({"name": "dens_s2"}, 32, (576, 2, 2)),
    ({"name": "trunc", "backbone": "tf_efficientnet_lite0", "cut": 2}, 32, (40, 8, 8)),  # stage 2: 40 ch, /8
    ({"name": "timm", "backbone": "tf_efficientnet_lite0"}, 32, (1280, 2, 2)),  # conv_head: 1280 ch, /32
], ids=["cbr_tiny", "cbr_small", "dens_s2", "trunc", "timm"])
def test_flatten_head_shapes_across_model_kinds(cfg, extra_size, shape):
    info = build_model(cfg, 1).info
    size = info.min_image_size + extra_size
    model = build_model({**cfg, "head": "flatten", "dropout": 0.1}, 3, image_size=size).eval()
    c, h, w = shape
    assert model.feature_shape == shape
    assert model.head.in_features == c * h * w
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 3)


def test_pretrained_weights_fill_the_trunk_and_leave_the_flatten_head_fresh(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.densenet121(weights=None).state_dict()
    path = tmp_path / "densenet121.pth"
    torch.save(state, path)
    model = build_model({"name": "dens_t1", "head": "flatten", "dropout": 0.1}, 2, image_size=32)
    head_before = model.head.weight.clone()
    report = apply_init(model, {"name": "pretrained", "weights": str(path), "download": False})
    assert report.strategy == "Truncated-TL" and report.new == ["head"]
    for key, value in model.trunk.state_dict().items():
        assert torch.equal(value, state[f"features.{key}"]), key
    assert torch.equal(model.head.weight, head_before)


# --- the config -------------------------------------------------------------------------------------

def test_an_unknown_head_is_refused_with_the_choices():
    with pytest.raises(Exception) as err:
        compose_cfg(["model.head=bogus"])
    assert _hydra_message(err.value).startswith("model.head: Invalid value 'bogus', expected one of [pool, flatten]")
    with pytest.raises(UserError, match="model.head"):
        build_model({"name": "dens_t1", "head": "bogus"}, 2)


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1"])
def test_dropout_out_of_range_is_refused(value):
    with pytest.raises(UserError, match=re.escape(f"model.dropout={float(value)} is out of range: it must be >= 0 "
                                                  "and < 1")):
        C.validate(compose_cfg([f"model.dropout={value}"]))


def test_defaults_are_pooling_without_dropout_and_both_options_are_part_of_the_identity():
    cfg = compose_cfg()
    C.validate(cfg)
    assert (cfg.model.head, cfg.model.dropout) == ("pool", 0.0)
    base = ID.identity(cfg)
    assert (base["model.head"], base["model.dropout"]) == ("pool", 0.0)
    flat = ID.identity(compose_cfg(["model.head=flatten"]))
    assert flat["model.head"] == "flatten" and flat != base and ID.setting_id(flat) != ID.setting_id(base)
    assert ID.identity(compose_cfg(["model.dropout=0.1"])) != base
    assert ID.identity(compose_cfg(["model.dropout=0"])) == base
