"""Using finished runs: loading one back (finished), external validation (``rtl evaluate``), probabilities for
new images (``rtl predict``) and Grad-CAM maps (``rtl explain``)."""
