"""Models by name: ``build_model(cfg.model, num_labels)``.

Importing the model modules registers their names; ``MODEL_NAMES`` is read after that.
"""

from . import cbr, slim, truncated  # noqa: F401  (registration side effect)
from .registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    XRAY_MEAN,
    XRAY_SOURCE,
    XRAY_STD,
    Classifier,
    ModelInfo,
    Trunk,
    build_model,
    canonical_name,
    check_image_size,
    check_model_keys,
    check_source,
    chest_xray_input,
    model_names,
    register,
)

MODEL_NAMES: tuple[str, ...] = model_names()

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_NAMES",
    "XRAY_MEAN",
    "XRAY_SOURCE",
    "XRAY_STD",
    "Classifier",
    "ModelInfo",
    "Trunk",
    "build_model",
    "canonical_name",
    "check_image_size",
    "check_model_keys",
    "check_source",
    "chest_xray_input",
    "model_names",
    "register",
]
