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
