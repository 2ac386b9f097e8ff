"""The speed switches (AMP, channels_last, compile) change speed, not results."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from rethink_tl.errors import UserError
from rethink_tl.models import build_model
from rethink_tl.engine import Precision, maybe_compile, resolve_precision


def model_and_input(name="dens_t1", **extra):
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"name": name, **extra}), num_labels=3)
    return model, torch.randn(4, 3, 48, 48)


def one_step(model, x, precision: Precision, channels_last: bool):
    model = copy.deepcopy(model).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with precision.autocast(torch.device("cpu")):
        logits = model(x)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), torch.ones(4, 3))
    loss.backward()
    # Gradients, not Adam's first update: that one is about lr * sign(grad), which turns float
    # noise on near-zero gradients into full-size differences.
    return logits.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_channels_last_gives_the_same_outputs_and_gradients():
    model, x = model_and_input()
    ref_out, ref_grads = one_step(model, x, Precision(), channels_last=False)
    out, grads = one_step(model, x, Precision(), channels_last=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    # Measured against the whole gradient: a few BN weights have gradients near 1e-6 whose float
    # noise is large relative to themselves under either memory format.
    ref = torch.cat([g.flatten() for g in ref_grads.values()])
    got = torch.cat([grads[name].flatten() for name in ref_grads])
    assert float((got - ref).norm() / ref.norm()) < 1e-3


@pytest.mark.slow
def test_bf16_autocast_stays_within_bf16_noise():
    model, x = model_and_input()
    ref_out, _ = one_step(model, x, Precision(), channels_last=True)
    out, _ = one_step(model, x, Precision(torch.bfloat16), channels_last=True)
    # bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per op.
    torch.testing.assert_close(out, ref_out, rtol=0.05, atol=0.05)
    assert not torch.equal(out, ref_out)  # autocast really ran in bf16


@pytest.mark.slow
def test_compile_gives_the_same_outputs():
    model, x = model_and_input("trunc", backbone="tf_efficientnet_lite0", cut=1)
    model.eval()
    compiled = maybe_compile(model, OmegaConf.create({"compile": True}))
    assert maybe_compile(model, OmegaConf.create({"compile": False})) is model
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    # The compiled module shares its parameters: checkpoints of `model` stay plain.
    assert all(a is b for a, b in zip(compiled.parameters(), model.parameters()))


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype is None
    assert resolve_precision("off", cpu).name == "fp32"
    assert resolve_precision("bf16", cpu).dtype is torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(UserError, match="runtime.amp must be"):
        resolve_precision("fp8", cpu)
