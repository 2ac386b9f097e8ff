"""Hydra configs of rtl. Importing this package (as Hydra does to find them) registers the schemas they
extend (rethink_tl/config.py), so they compose from any entry point."""

from .. import config  # noqa: F401  (registers base_model, base_train, ... with the ConfigStore)
