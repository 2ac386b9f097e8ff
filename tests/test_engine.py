"""The engine's CUDA decisions, checked on a CPU: torch.cuda is patched where a GPU would answer."""

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rethink_tl import engine
from rethink_tl.engine import Batcher, configure_device, resolve_precision, restore_rng, rng_state

CPU = torch.device("cpu")


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


def assert_same_draws(a, b):
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


class FakeCuda:
    """The parts of torch.cuda that rng_state / restore_rng touch, for a machine with ``count`` GPUs."""

    def __init__(self, monkeypatch, count=1):
        self.count, self.got, self.set = count, [], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.forbidden)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.forbidden)

    def get_rng_state(self, device="cuda"):
        device = torch.device(device)
        self.got.append(device)
        return torch.full((16,), device.index or 0, dtype=torch.uint8)

    def set_rng_state(self, state, device="cuda"):
        device = torch.device(device)
        if device.index is not None and device.index >= self.count:
            raise IndexError(f"no GPU {device.index} on a {self.count}-GPU machine")
        self.set.append((state.clone(), device))

    def forbidden(self, *args, **kwargs):
        raise AssertionError("every GPU's generator was touched: a checkpoint would not move between machines")


def saved_and_loaded(state, tmp_path):
    # Through a file, as last.pt goes: weights_only loading must accept every entry.
    torch.save({"rng": state}, tmp_path / "last.pt")
    return torch.load(tmp_path / "last.pt", weights_only=True)["rng"]


def test_a_cpu_run_saves_no_gpu_state():
    assert set(rng_state(CPU)) == {"python", "torch", "numpy"}


@pytest.mark.parametrize("gpu_entries", ["old_list", "device"])
def test_a_checkpoint_from_a_4_gpu_machine_resumes_on_a_cpu(tmp_path, gpu_entries):
    state = rng_state(CPU)
    expected = draws()
    gpu_state = torch.zeros(16, dtype=torch.uint8)
    if gpu_entries == "old_list":
        state["cuda"] = [gpu_state] * 4  # the layout that set_rng_state_all choked on
    else:
        state["device"] = gpu_state
    state = saved_and_loaded(state, tmp_path)
    draws()  # move every generator on
    restore_rng(state, CPU)
    assert_same_draws(draws(), expected)


def test_a_1_gpu_machine_saves_and_restores_only_its_own_generator(monkeypatch, tmp_path):
    cuda = FakeCuda(monkeypatch, count=1)
    gpu0 = torch.device("cuda", 0)
    state = rng_state(gpu0)
    assert cuda.got == [gpu0] and torch.equal(state["device"], torch.zeros(16, dtype=torch.uint8))

    # Written on GPU 3 of a 4-GPU machine, with the old every-GPU list as well.
    state["device"] = torch.full((16,), 3, dtype=torch.uint8)
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]
    expected = draws()
    state = saved_and_loaded(state, tmp_path)
    draws()
    restore_rng(state, gpu0)
    assert_same_draws(draws(), expected)
    assert len(cuda.set) == 1
    restored, device = cuda.set[0]
    assert device == gpu0 and torch.equal(restored, torch.full((16,), 3, dtype=torch.uint8))


def test_a_cpu_checkpoint_resumes_on_a_gpu(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=1)
    restore_rng(rng_state(CPU), torch.device("cuda", 0))
    assert cuda.set == []  # nothing saved for the GPU, nothing restored; the CPU generators are


# --- precision --------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, name, scaled", [
    ((6, 0), "fp16", True),  # P100
    ((7, 0), "fp16", True),  # V100: bf16 only emulated
    ((7, 5), "fp16", True),  # T4
    ((8, 0), "bf16", False),  # A100
    ((8, 9), "bf16", False),
    ((9, 0), "bf16", False),  # H100 / H200
])
def test_amp_auto_picks_by_compute_capability_of_the_chosen_gpu(monkeypatch, capability, name, scaled):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # so GradScaler stays enabled
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    # Emulated bf16 counts as support here: it must not decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu1 = torch.device("cuda", 1)
    precision = resolve_precision("auto", gpu1)
    assert precision.name == name
    assert isinstance(precision.scaler, torch.amp.GradScaler) if scaled else precision.scaler is None
    assert asked and all(torch.device(d) == gpu1 for d in asked)


def test_explicit_amp_does_not_ask_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: pytest.fail("asked"))
    gpu = torch.device("cuda", 0)
    assert resolve_precision("bf16", gpu).name == "bf16"
    assert resolve_precision("fp16", gpu).name == "fp16"
    assert resolve_precision("off", gpu).name == "fp32"


@pytest.fixture
def restore_switches():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cuda_1_becomes_the_current_gpu(monkeypatch, restore_switches):
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    rc = OmegaConf.create({"device": "cuda:1", "threads": 0, "cudnn_benchmark": True})
    assert configure_device(rc) == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]


# --- batches ----------------------------------------------------------------------------------------

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("channels_last", [True, False])
def test_batcher_matches_the_plain_formula(channels, channels_last):
    images = torch.randint(0, 256, (5, channels, 12, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = Batcher(MEAN, STD, CPU, channels_last)(images)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    expected = ((images.float() / 255).expand(5, 3, 12, 10) - MEAN) / STD
    expected = expected.contiguous(memory_format=fmt)
    assert out.shape == (5, 3, 12, 10) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_batcher_augmentation_keeps_the_layout_and_is_seeded():
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batcher = Batcher(MEAN, STD, CPU, True, rotate_degrees=10, scale_jitter=0.1)
    a = batcher(images, engine.epoch_generator(0, 1))
    b = batcher(images, engine.epoch_generator(0, 1))
    assert a.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)
    assert not torch.equal(a, Batcher(MEAN, STD, CPU, True)(images))
