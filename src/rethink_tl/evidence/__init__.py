"""What runs show: the results schema and reading runs back (results), per-image predictions, bootstrap
intervals and paired tests (stats, compare), experiment designs, ``rtl report`` and its figures.

Every module here reads runs only through ``results`` (and the predictions files it points to)."""
