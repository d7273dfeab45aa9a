"""Training: the loop (`loop`), AdamW + schedule (`optim`), checkpoints, metrics, torchrun setup.

`mmssl.train.loop.train(cfg)` runs a resolved `ExperimentConfig`; `mmssl train` is its CLI.
"""
