import errno

import pandas as pd
import pytest
import torch

from rethink_tl import checkpoint
from rethink_tl.errors import UserError


def test_atomic_save_roundtrip_and_weights_only(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"w": torch.arange(3.0), "epoch": 2}, path)
    state = checkpoint.load(path)
    assert torch.equal(state["w"], torch.arange(3.0)) and state["epoch"] == 2
    # weights_only: an arbitrary pickled object is refused, not executed.
    torch.save({"obj": object()}, tmp_path / "evil.pt")
    with pytest.raises(Exception):
        checkpoint.load(tmp_path / "evil.pt")


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1}, path)

    def no_space(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", no_space)
    with pytest.raises(UserError, match="No space left on device.*previous version of the file"):
        checkpoint.save({"epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_csv_into_an_unwritable_place(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="could not write"):
        checkpoint.write_csv(pd.DataFrame({"a": [1]}), blocker / "results.csv")
