"""Pretrained weights: where they are kept (store: $RTL_WEIGHTS), where they come from (sources: files, the
torch and Hugging Face caches, pip packages, a download; each non-native source with its rename map) and how
they get into a model (transfer: by name, strictly, with a report of what was loaded and what is new)."""

from .sources import read_weights_file
from .store import (check_slot, install, installed, list_installed, read_meta, remove_installed, sha256_file,
                    weights_home, weights_slot)
from .transfer import InitReport, apply_init, strategy_for

__all__ = ["InitReport", "apply_init", "check_slot", "install", "installed", "list_installed", "read_meta",
           "read_weights_file", "remove_installed", "sha256_file", "strategy_for", "weights_home", "weights_slot"]
