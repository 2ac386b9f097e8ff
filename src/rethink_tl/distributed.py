"""Processes of a data-parallel run: which one this is, and the few collective operations the loops need.

torchrun (RANK, WORLD_SIZE, ... in the environment) or a SLURM job with one task per GPU (through submitit)
starts the processes; nothing here starts one. Alone, a process is rank 0 of 1 and every operation is the
identity.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import NotYourRun, UserError
from .identity import process_rank

__all__ = ["Processes", "process_rank"]


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
