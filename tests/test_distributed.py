"""distributed.py: alone, a process is rank 0 of 1 and every collective is the identity."""

from __future__ import annotations

import pytest
import torch

from rethink_tl.distributed import Processes
from rethink_tl.errors import NotYourRun, UserError


def test_alone_every_collective_is_the_identity(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    procs = Processes.start("cpu")
    assert (procs.rank, procs.world, procs.main) == (0, 1, True)
    assert procs.sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    t = {"a": torch.arange(3)}
    assert procs.gather(t) == [t]
    assert procs.agree(lambda: 7) == 7
    assert procs.device_setting("auto") == "auto"
    procs.barrier()
    procs.end()


@pytest.mark.parametrize("error", [UserError, NotYourRun])
def test_agree_passes_a_user_error_on_as_its_own_type(error):
    def refuse():
        raise error("no")

    with pytest.raises(error, match="no"):
        Processes().agree(refuse)


# --- the device pool of a parallel local sweep -------------------------------------------------------------

@pytest.fixture
def two_fake_gpus(tmp_path, monkeypatch):
    """A machine with two GPUs as far as claim_device can tell; its lock files in a folder of this test's."""
    import rethink_tl.distributed as distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "_gpu_names", lambda: ["gpu-a", "gpu-b"])
    monkeypatch.setenv("RTL_DEVICE_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 8)
    return tmp_path / "locks"


def test_jobs_spread_over_the_gpus_before_they_share_one(two_fake_gpus):
    from rethink_tl.distributed import claim_device

    claims = [claim_device("auto", 0, 2, 4) for _ in range(4)]
    assert [c.device for c in claims] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [c.slot for c in claims] == ["gpu-a-slot0", "gpu-b-slot0", "gpu-a-slot1", "gpu-b-slot1"]
    assert [c.threads for c in claims] == [2, 2, 2, 2]  # 8 cores over 4 jobs at once
    assert sorted(p.name for p in two_fake_gpus.iterdir()) == [f"{c.slot}.lock" for c in sorted(
        claims, key=lambda c: c.slot)]
    for c in claims:
        c.release()


def test_a_job_waits_for_a_free_slot_and_takes_the_one_released(two_fake_gpus):
    import threading

    from rethink_tl.distributed import claim_device

    held = [claim_device("auto", 3, 1, 3) for _ in range(2)]
    assert [c.device for c in held] == ["cuda:0", "cuda:1"] and held[0].threads == 3  # threads given: kept
    got = []
    waiter = threading.Thread(target=lambda: got.append(claim_device("auto", 0, 1, 3, wait_seconds=0.05)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and not got  # every slot taken: it waits, it does not double up on a GPU
    held[1].release()
    waiter.join(5)
    assert [c.device for c in got] == ["cuda:1"]
    got[0].release()
    held[0].release()


def test_the_slot_of_a_killed_job_is_free_again(two_fake_gpus):
    import os
    import signal
    import subprocess
    import sys
    import time

    from rethink_tl.distributed import claim_device

    two_fake_gpus.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from filelock import FileLock; "
        f"lock = FileLock({str(two_fake_gpus / 'gpu-a-slot0.lock')!r}); lock.acquire(); print('held', flush=True); "
        "time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    first = claim_device("auto", 0, 1, 2)
    assert first.device == "cuda:1"  # gpu-a is held by the other process
    os.kill(holder.pid, signal.SIGKILL)  # as the out-of-memory killer would
    holder.wait(10)
    deadline = time.time() + 5
    second = claim_device("auto", 0, 1, 2, wait_seconds=0.05)
    assert second.device == "cuda:0" and time.time() < deadline
    first.release()
    second.release()


@pytest.mark.parametrize("device, threads, parallel, expected", [
    ("auto", 0, 2, ("cpu", 4)),  # no GPU: the 8 cores split over the 2 jobs at once
    ("auto", 0, 3, ("cpu", 2)),
    ("auto", 1, 2, ("cpu", 1)),  # runtime.threads given: kept
    ("cpu", 0, 1, ("cpu", 0)),  # alone: torch's default
    ("cuda:1", 0, 4, ("cuda:1", 2)),  # the user's choice of device is kept
])
def test_without_gpus_the_cores_are_split(monkeypatch, tmp_path, device, threads, parallel, expected):
    import rethink_tl.distributed as distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 8)
    monkeypatch.setenv("RTL_DEVICE_LOCKS", str(tmp_path / "locks"))
    claim = distributed.claim_device(device, threads, 1, parallel)
    assert (claim.device, claim.threads) == expected and claim.lock is None
    assert not (tmp_path / "locks").exists()
