"""``python -m rethink_tl`` is ``rtl`` (rtl advise runs its rungs this way, with the same interpreter)."""

from .cli import main

main()
