"""Hydra configs of rtl. Importing this package (as Hydra does to find them) registers the schemas they
extend (rethink_tl/config.py) and the resolvers their run-directory patterns call (rethink_tl/identity.py),
so they compose from any entry point."""

from .. import config, identity  # noqa: F401  (ConfigStore schemas; rtl.* resolvers)
