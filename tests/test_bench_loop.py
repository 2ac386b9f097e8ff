import importlib.util
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from rethink_tl.bench import loop as bench
from test_cli import rtl

ROOT = Path(__file__).resolve().parents[1]
TINY_BENCH = ["model=trunc", "model.cut=1", "data.image_size=32", "train.batch_size=8", "bench.steps=2",
              "bench.warmup=1", "bench.eval_images=16", "bench.naive_workers=0", "bench.score_n=2000",
              "runtime.progress=false"]


def bench_cfg(*overrides):
    with initialize_config_module(config_module="rethink_tl.conf", version_base="1.3"):
        return compose(config_name="bench", overrides=[*TINY_BENCH, *overrides])


@pytest.mark.slow
def test_bench_reports_the_three_loops(tmp_path):
    out = tmp_path / "bench"
    proc = rtl("bench", *TINY_BENCH, f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = pd.read_csv(out / "bench.csv").iloc[0]
    for col in ("a_bare_ips", "b_loop_ips", "c_naive_ips", "eval_ips", "a_peak_gb", "b_peak_gb", "c_peak_gb",
                "score_seconds"):
        assert row[col] > 0, col
    assert row.b_over_a == pytest.approx(row.b_loop_ips / row.a_bare_ips, rel=0.01)
    assert row.b_over_c == pytest.approx(row.b_loop_ips / row.c_naive_ips, rel=0.01)
    assert row.precision == "fp32" and row.image_size == 32 and row.batch_size == 8
    # On a CPU nothing moves to a device, and fp32 means fp32 (no TF32 to stand in for it).
    assert not row.b_data_on_device and row.c_precision == "fp32" and not row.c_cudnn_benchmark
    assert row.c_timed_batches == 2  # no workers: nothing prefetched, bench.steps batches timed
    assert row.memory.startswith("peak RSS of the process")
    assert "(b) rtl train loop" in proc.stdout and "b/a =" in proc.stdout and "peak GB" in proc.stdout


@pytest.mark.slow
def test_bench_refuses_a_size_too_small(tmp_path, rtl_here):
    proc = rtl_here("bench", "model=cbr_small", "data.image_size=64", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert proc.returncode == 2 and "at least 121 px" in proc.stderr and "Traceback" not in proc.stderr


# --- each phase its own memory ----------------------------------------------------------------------

def test_each_phase_reports_its_own_rss_peak(monkeypatch, tmp_path):
    if not bench._reset_rss_peak():
        pytest.skip("this kernel does not let a process reset its peak RSS")
    held = []

    def bare_step(*args):
        big = torch.ones(100_000_000)  # 400 MB, touched: resident
        held.append(float(big[-1]))
        return 1.0

    monkeypatch.setattr(bench, "bare_step", bare_step)
    monkeypatch.setattr(bench, "loop", lambda *a: bench.LoopResult(1.0, 1.0, False))
    monkeypatch.setattr(bench, "naive", lambda *a: bench.NaiveResult(1.0, 2, 1.0, "fp32", False))
    row = bench.run_bench(bench_cfg(), tmp_path)
    assert held == [1.0]
    # (a)'s 400 MB were freed before (b) began: a peak over the whole run would show them in (b) and (c).
    assert row["a_peak_gb"] > row["b_peak_gb"] + 0.3 and row["a_peak_gb"] > row["c_peak_gb"] + 0.3
    assert row["memory"] == "peak RSS of the process during the phase"


def test_cuda_peaks_are_reset_per_phase(monkeypatch):
    allocator = SimpleNamespace(peak=0)
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: calls.append(("reset", device)) or setattr(allocator, "peak", 0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: calls.append(("read", device)) or allocator.peak)
    gpu = torch.device("cuda", 1)
    with bench.peak_memory(gpu) as first:
        allocator.peak = 3e9
    with bench.peak_memory(gpu) as second:
        allocator.peak = max(allocator.peak, 1e9)
    assert (first.gb, second.gb) == (3.0, 1.0)
    assert calls == [("reset", gpu), ("read", gpu)] * 2
    assert first.kind == "CUDA peak allocated during the phase"


# --- the naive loop's clock -------------------------------------------------------------------------

class Clock:
    """A clock that moves one second per batch the loader hands out, and not otherwise."""

    def __init__(self):
        self.now, self.fetched = 0.0, 0

    def perf_counter(self):
        return self.now


def counting_loader(clock):
    class Counting(bench.DataLoader):
        def __iter__(self):
            inner = super().__iter__()

            class It:
                def __iter__(self):
                    return self

                def __next__(self):
                    batch = next(inner)
                    clock.now += 1.0
                    clock.fetched += 1
                    return batch

            return It()

    return Counting


@pytest.mark.parametrize("workers, warmup_batches, timed_batches", [
    (0, 1, 2),  # nothing prefetched: bench.warmup, then bench.steps
    (1, 1 + 2, 4),  # 1 worker x prefetch 2: the warm-up drains 2 more, the timed part is twice the depth
])
@pytest.mark.slow
def test_naive_loop_times_exactly_its_timed_batches(monkeypatch, tmp_path, workers, warmup_batches, timed_batches):
    clock = Clock()
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "DataLoader", counting_loader(clock))
    cfg = bench_cfg(f"bench.naive_workers={workers}")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32), dtype=np.uint8)
    y = (rng.random((12, 2)) < 0.5).astype(np.float32)
    result = bench.naive(cfg, torch.device("cpu"), images, y, batch=4, size=32, warmup=1, steps=2, workdir=tmp_path)
    assert clock.fetched == warmup_batches + timed_batches
    assert result.timed_batches == timed_batches
    # The clock moved once per timed fetch, the first included; every timed image, and only those, counted.
    assert result.seconds == timed_batches
    assert result.ips == 4.0


def test_fp32_is_named_as_it_runs():
    assert bench.fp32_name(torch.device("cpu")) == "fp32"
    gpu = torch.device("cuda", 0)
    saved = bench._switches()
    try:
        bench._set_switches({"matmul_tf32": False, "cudnn_tf32": True, "cudnn_benchmark": False})
        assert bench.fp32_name(gpu) == "fp32 (tf32 conv)"
        bench._set_switches({"matmul_tf32": True, "cudnn_tf32": True, "cudnn_benchmark": False})
        assert bench.fp32_name(gpu) == "fp32 (tf32 conv+matmul)"
        bench._set_switches({"matmul_tf32": False, "cudnn_tf32": False, "cudnn_benchmark": False})
        assert bench.fp32_name(gpu) == "fp32"
    finally:
        bench._set_switches(saved)


# --- scripts/gpu_check.py -----------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_check_says_it_needs_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no CUDA GPU" in proc.stderr and proc.stdout == ""


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


class FakeSyncDebug:
    """torch.cuda's sync debug mode on a CPU: reading a tensor's value (the epoch's deliberate syncs), or
    calling ``sync()``, warns or raises as a GPU would in that mode."""

    def __init__(self, monkeypatch, message):
        self.mode, self.message = 0, message
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", self.set)
        for name in ("__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, self.syncing(getattr(torch.Tensor, name)))

    def set(self, mode):
        self.mode = {"default": 0, "warn": 1, "error": 2}.get(mode, mode)

    def sync(self):
        if self.mode == 2:
            raise RuntimeError(self.message)
        if self.mode == 1:
            warnings.warn(self.message)

    def syncing(self, real):
        def read(tensor):
            self.sync()
            return real(tensor)

        return read


@pytest.mark.slow
def test_gpu_check_sync_check_arms_over_the_steps_only(monkeypatch):
    gpu_check = load_gpu_check()
    fake = FakeSyncDebug(monkeypatch, gpu_check.SYNC_MESSAGE)
    check = gpu_check.sync_check("cpu", "off", replace(gpu_check.TOY, batch=8, sync_steps=3))
    assert check.ok, check.numbers
    # The two reads after the loop (first bad step, loss total) are counted under "warn", never raised.
    assert check.numbers == "error mode: none in 3 steps; warn: 2 syncs per epoch of 3 steps, 2 of 6"
    assert fake.mode == 0


@pytest.mark.slow
def test_gpu_check_sync_check_finds_a_sync_per_step(monkeypatch):
    from rethink_tl import engine

    gpu_check = load_gpu_check()
    fake = FakeSyncDebug(monkeypatch, gpu_check.SYNC_MESSAGE)
    real_step = engine.train_step

    def syncing_step(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        fake.sync()
        return loss

    monkeypatch.setattr(engine, "train_step", syncing_step)
    check = gpu_check.sync_check("cpu", "off", replace(gpu_check.TOY, batch=8, sync_steps=3))
    assert not check.ok and engine.train_step is syncing_step and fake.mode == 0
    assert check.numbers.startswith("error mode: a sync in step 1 at ") and "engine.py" in check.numbers
    assert check.numbers.endswith("warn: 5 syncs per epoch of 3 steps, 8 of 6")
