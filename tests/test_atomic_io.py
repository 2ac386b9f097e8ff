import errno

import pandas as pd
import pytest
import torch

from rethink_tl import atomic_io as checkpoint
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

    def no_space(fd):  # the data did not fit: the kernel says so when it is flushed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
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


def test_files_get_the_umask_permissions_not_0600(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        checkpoint.write_csv(pd.DataFrame({"a": [1]}), tmp_path / "results.csv")
        checkpoint.save({"epoch": 1}, tmp_path / "last.pt")
        checkpoint.write_json({"a": 1}, tmp_path / "identity.json")
    finally:
        os.umask(old)
    for name in ("results.csv", "last.pt", "identity.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", None])
def test_a_damaged_checkpoint_is_named_with_the_fix(tmp_path, content):
    path = tmp_path / "last.pt"
    if content is None:  # a real checkpoint cut in half, as a kill during a copy would leave it
        checkpoint.save({"w": torch.zeros(1000)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=f"{path} is damaged or incomplete .*; delete it"):
        checkpoint.load(path, fix="delete it to start over")
