"""The weights ``rtl pretrain`` makes, installed where ``init=pretrained`` finds them.

``weights_home()`` ($RTL_WEIGHTS, default ``~/.cache/rethink_tl/weights``) holds one folder per model
(``weights_slot``) with the weights file and its record (``runfiles.WEIGHTS`` and ``runfiles.WEIGHTS_META``).
Such a file is of the model itself (trunk and an ImageNet head), so its whole trunk is loaded, for CBR nets and
deep models alike. Installing is atomic and never silently replaces other weights: runs made from the old file
would no longer match what ``init=pretrained`` finds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from .. import atomic_io, runfiles as rf
from ..errors import UserError
from ..models import canonical_name

log = logging.getLogger(__name__)

SLOT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
META_KEYS = ("slot", "sha256", "dataset", "num_classes", "image_size", "epochs", "val_top1", "run_dir")


def weights_home() -> Path:
    """Where ``rtl pretrain`` installs weights and ``init=pretrained`` finds them: $RTL_WEIGHTS, else
    $XDG_CACHE_HOME/rethink_tl/weights (``~/.cache/rethink_tl/weights``)."""
    if os.environ.get("RTL_WEIGHTS"):
        home = Path(os.path.expanduser(os.environ["RTL_WEIGHTS"]))
        if home.exists() and not home.is_dir():
            raise UserError(f"RTL_WEIGHTS={home} is a file, not a folder: point RTL_WEIGHTS at a folder (or unset it "
                            "for ~/.cache/rethink_tl/weights)")
        return home
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rethink_tl" / "weights"


def weights_slot(model_cfg: Mapping[str, Any]) -> str:
    """The installed-weights folder name of a model: its canonical name, with the timm backbone and cut for
    model=timm / trunc (cbr_small, dens_t1, trunc-resnet18-cut2). The head is not part of it: only the trunk
    is transferred."""
    name = canonical_name(str(model_cfg["name"]))
    if name in ("timm", "trunc"):
        name += f"-{model_cfg['backbone']}"
        if name.startswith("trunc"):
            name += f"-cut{model_cfg['cut']}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def check_slot(slot: str) -> str:
    """A model's weights folder name, never a path: ``rtl weights remove ../x`` must not reach outside."""
    if not SLOT_NAME.match(slot) or slot in (".", ".."):
        raise UserError(f"{slot!r} is not a model name (e.g. cbr_small; rtl weights list shows what is installed)")
    return slot


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_meta(path: Path) -> dict[str, Any]:
    """A weights record (weights.json), checked for the keys the rest of rtl reads; UserError when it is damaged."""
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is missing or damaged ({err})") from err
    return meta


def installed(slot: str) -> tuple[Path, dict[str, Any]] | None:
    """(weights file, its record) installed for ``slot``, or None."""
    folder = weights_home() / check_slot(slot)
    path = folder / rf.WEIGHTS
    if not path.is_file():
        return None
    try:
        return path, read_meta(folder / rf.WEIGHTS_META)
    except UserError as err:
        raise UserError(f"{err}: install the weights again with rtl weights install RUN_DIR --replace, or remove "
                        f"them with rtl weights remove {slot}") from None


def install(run_dir: str | os.PathLike, meta: dict[str, Any] | None = None, replace: bool = False) -> Path:
    """Copy a finished pretraining's weights file and record into ``weights_home()/<slot>``, atomically.

    An empty slot, or one holding the same file, takes it. A slot holding other weights (or damaged ones) is
    replaced only with ``replace``: the runs made from the old file would otherwise no longer match what
    init=pretrained finds."""
    run_dir = Path(run_dir)
    src = run_dir / rf.WEIGHTS
    if meta is None:
        if not (run_dir / rf.WEIGHTS_META).is_file() or not src.is_file():
            raise UserError(f"{run_dir} holds no finished pretraining ({rf.WEIGHTS} and {rf.WEIGHTS_META}): run rtl "
                            "pretrain to the end first")
        meta = read_meta(run_dir / rf.WEIGHTS_META)
    slot = check_slot(str(meta["slot"]))
    if sha256_file(src) != meta["sha256"]:
        raise UserError(f"{src} does not match the sha256 in {run_dir / rf.WEIGHTS_META}: the file changed after the "
                        "pretraining wrote it; run the pretraining again with runtime.force=true")
    folder = weights_home() / slot
    target = folder / rf.WEIGHTS
    # What is there now, judged by the file itself (a damaged copy or record is "other weights").
    there = sha256_file(target) if target.is_file() else None
    try:
        recorded = read_meta(folder / rf.WEIGHTS_META)["sha256"] if there else None
    except UserError:
        recorded = None
    if there is not None and (there != meta["sha256"] or recorded != meta["sha256"]) and not replace:
        raise UserError(f"{folder} already holds other {slot} weights (sha256 {there[:12]}), so {run_dir} was not "
                        f"installed; to replace them: rtl weights install {run_dir} --replace")
    try:
        if there != meta["sha256"]:
            atomic_io.write_bytes(target, src.read_bytes())
        atomic_io.write_json(meta, folder / rf.WEIGHTS_META)
    except UserError as err:
        raise UserError(f"could not install into {folder} (RTL_WEIGHTS): {str(err).split(': ', 1)[-1].split(';')[0]}; "
                        f"set RTL_WEIGHTS to a writable folder and run rtl weights install {run_dir} (the pretraining "
                        "itself is finished)") from err
    log.info("installed %s weights (val top-1 %.4f) into %s; init=pretrained uses them", slot, meta["val_top1"],
             folder)
    return folder


def list_installed() -> list[dict[str, Any]]:
    home = weights_home()
    rows = []
    for folder in sorted(home.iterdir()) if home.is_dir() else []:
        if (folder / rf.WEIGHTS).is_file():
            try:
                meta = read_meta(folder / rf.WEIGHTS_META)
            except UserError:
                meta = {"slot": folder.name, "damaged": True}
            rows.append({**meta, "path": str(folder / rf.WEIGHTS)})
    return rows


def remove_installed(slot: str) -> Path:
    folder = weights_home() / check_slot(slot)
    if not (folder / rf.WEIGHTS).is_file():
        raise UserError(f"no weights installed for {slot} in {weights_home()} (rtl weights list shows what is)")
    shutil.rmtree(folder)
    return folder
