"""The names of the files rtl writes: the one place that spells them. Every other module imports them.

An ``rtl train`` run directory (``<data>/<model.tag>/<init>/f<fraction>/s<seed>-<setting_id>``) holds

    identity.json       {"setting_id": ..., "settings": {...}}: every result-affecting setting (identity.py)
    config.yaml         the resolved config (its ``experiment`` key says which figure the run was made for)
    metrics.csv         one row per epoch
    last.pt / best.pt   the state to resume from / the best-validation model
    predictions.csv.gz  per-image predictions of the best model on val and test (evidence/predictions.py)
    results.csv         one row: what the run measured and used (evidence/results.py); marks it finished
    error.txt           why the run failed, in a sweep that went on without it

An ``rtl pretrain`` run directory holds identity.json, config.yaml, last.pt, pretrain.csv (one row per epoch),
weights.pth and weights.json (which marks it finished); an installed-weights folder holds the last two.
``rtl evaluate`` writes ``<run>/external/<name>/`` with results.csv, predictions.csv.gz and external.json.
``rtl export`` writes a model file (default ``<run>/export/<format>/model.onnx`` or ``model.pt``) with MODEL_CARD.md
and ``<model file stem>.preprocessing.json`` beside it.
"""

from __future__ import annotations

IDENTITY = "identity.json"
CONFIG = "config.yaml"
METRICS = "metrics.csv"
LAST = "last.pt"
BEST = "best.pt"
PREDICTIONS = "predictions.csv.gz"
RESULTS = "results.csv"
ERROR = "error.txt"
LOCK = ".rtl.lock"
# error.txt's first line says why; a later line "kind: damaged" marks a file of the run that cannot be read (its
# last.pt, say): mended by the user, not a property of the run's settings.
ERROR_KIND, KIND_DAMAGED = "kind: ", "damaged"

WEIGHTS = "weights.pth"
WEIGHTS_META = "weights.json"
PRETRAIN_HISTORY = "pretrain.csv"

# A sweep's record of its jobs, under hydra.sweep.dir: <SWEEP_RECORDS>/<invocation>/<job number>.json.
SWEEP_RECORDS = ".rtl_jobs"

EXTERNAL_DIR = "external"
EXTERNAL_MARK = "external.json"

EXPORT_DIR = "export"
EXPORT_STEM = "model"  # the model file's name without its suffix, in EXPORT_DIR/<format>/
MODEL_CARD = "MODEL_CARD.md"
PREPROCESSING_SUFFIX = ".preprocessing.json"

# What each kind of run writes; the first file of STARTED_* says a run was started there.
TRAIN_FILES = (RESULTS, METRICS, LAST, BEST, PREDICTIONS, IDENTITY, CONFIG, ERROR)
PRETRAIN_FILES = (PRETRAIN_HISTORY, LAST, WEIGHTS, WEIGHTS_META, IDENTITY, CONFIG, ERROR)
# A train run's files that say it was started (a lone config.yaml does not: any folder may have one, and
# Hydra's .hydra/ is left by a command refused before it claimed the folder).
TRAIN_STARTED = (RESULTS, ERROR, IDENTITY, METRICS, LAST, BEST)

# What rtl report writes into its --out folder.
SUMMARY = "summary.csv"
SUMMARY_MD = "summary.md"
COMPARISONS = "comparisons.csv"
EXTERNAL_TABLE = "external.csv"
