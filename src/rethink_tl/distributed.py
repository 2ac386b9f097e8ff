"""Processes of a data-parallel run: which one this is, and the few collective operations the loops need; and the
device pool of a parallel local sweep, in which each job trains on a device slot no other job holds.

torchrun (RANK, WORLD_SIZE, ... in the environment) or a SLURM job with one task per GPU (through submitit)
starts the processes; nothing here starts one. Alone, a process is rank 0 of 1 and every operation is the
identity.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import NotYourRun, UserError
from .identity import process_rank

__all__ = ["DeviceClaim", "Processes", "claim_device", "lock_dir", "process_rank"]


@dataclass
class Processes:
    """This process's place in a data-parallel run (rank 0 of 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device_setting: str) -> "Processes":
        """Join the process group that torchrun (RANK, WORLD_SIZE ... in the environment) or a SLURM job with
        one task per GPU (through submitit) describes; alone otherwise. torchrun / submitit start the
        processes: nothing here starts one."""
        if not os.environ.get("WORLD_SIZE") and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
            try:
                import submitit

                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            except (ImportError, RuntimeError) as err:
                raise UserError(f"this SLURM job has {os.environ['SLURM_NTASKS']} tasks but their process group "
                                f"cannot be set up ({err}): launch with torchrun, or through the SLURM launcher "
                                "(hydra/launcher=slurm)") from err
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device_setting != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(rank, local, world)

    def device_setting(self, setting: str) -> str:
        # One GPU per process: torchrun's LOCAL_RANK says which.
        if self.world > 1 and setting in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return setting

    def agree(self, fn):
        """Run ``fn`` in the first process and hand its result, or its UserError, to every process: all go
        on, or all stop with the same message (instead of the others waiting for ever)."""
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except UserError as err:
                box[0] = ("error", type(err) is NotYourRun, str(err))
        dist.broadcast_object_list(box, src=0)
        if box[0][0] == "error":
            raise (NotYourRun if box[0][1] else UserError)(box[0][2])
        return box[0][1]

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` (tensors and plain containers) of every process, in rank order."""
        if self.world == 1:
            return [obj]
        buf = io.BytesIO()
        torch.save(obj, buf)  # tensors travel as torch's own serialisation, not as pickled storages
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, buf.getvalue())
        return [torch.load(io.BytesIO(b), weights_only=True) for b in out]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def end(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# --- the device pool of a parallel local sweep ---------------------------------------------------------------

def lock_dir() -> Path:
    """Where the device slots' lock files live: $RTL_DEVICE_LOCKS, else a folder of this user's in the machine's
    temporary folder (the locks are about this machine's devices, so never on a shared file system)."""
    if os.environ.get("RTL_DEVICE_LOCKS"):
        return Path(os.environ["RTL_DEVICE_LOCKS"])
    return Path(tempfile.gettempdir()) / f"rtl-devices-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _gpu_names() -> list[str]:
    """A name per visible GPU that is the same whatever CUDA_VISIBLE_DEVICES renumbers (its UUID where torch
    gives it)."""
    names = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        names.append(f"gpu-{uuid}" if uuid else f"cuda{i}")
    return names


@dataclass
class DeviceClaim:
    """A slot of one device held for a job's life (``release`` on any exit; the kernel frees the lock file of a
    killed process), and the CPU threads the job may use."""

    device: str  # runtime.device for the job: cuda:N, or cpu
    threads: int  # runtime.threads for the job (0: torch's default)
    slot: str = ""  # the lock file's name, for messages
    lock: Any = None

    def release(self) -> None:
        if self.lock is not None and self.lock.is_locked:
            self.lock.release()


def claim_device(device: str, threads: int, jobs_per_device: int, parallel_jobs: int,
                 wait_seconds: float = 1.0, log=None) -> DeviceClaim:
    """The device and threads of one job of a sweep that runs ``parallel_jobs`` at once on this machine.

    With ``device=auto`` and GPUs: the first free slot of ``jobs_per_device`` per GPU (a lock file each, held
    until ``release``); when every slot is taken the job waits for one. On a CPU-only machine the cores are
    split: ``threads`` = cores // parallel_jobs unless given. Any other ``device`` (cpu, cuda:N) is the user's
    choice and is kept."""
    from filelock import FileLock, Timeout

    cores = os.cpu_count() or 1
    if device != "auto" or not torch.cuda.is_available():
        share = threads or (max(1, cores // max(parallel_jobs, 1)) if parallel_jobs > 1 else 0)
        return DeviceClaim("cpu" if device == "auto" else device, share)
    names = _gpu_names()
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    slots = [(i, f"{name}-slot{k}") for k in range(max(jobs_per_device, 1)) for i, name in enumerate(names)]
    share = threads or max(1, cores // max(min(parallel_jobs, len(slots)), 1))
    said = False
    while True:
        for index, slot in slots:  # slot 0 of every GPU first: jobs spread over the GPUs before they share one
            lock = FileLock(str(folder / f"{slot}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            return DeviceClaim(f"cuda:{index}", share, slot, lock)
        if not said and log is not None:
            log.info("every device slot is taken (%d GPU(s) x runtime.jobs_per_device=%d): waiting for one",
                     len(names), jobs_per_device)
            said = True
        time.sleep(wait_seconds)
