"""Speed, measured: ``rtl bench`` (the training loop against the bare step and a naive loop: loop.py),
``rtl bench-pretrain`` (the pretraining input pipeline: pipeline.py) and the generated image folders they and
the tests use (folders.py)."""
