"""Training: the loop (`loop`), the optimizer and its schedule, checkpoints, metrics, torchrun setup.

The optimizer is `train.optimizer=adamw|muon`: AdamW with CLIP's weight-decay split (`optim`), or
Muon on the transformer block matrices with AdamW for every other parameter (`muon`); both follow
the same linear-warmup cosine schedule (`optim`). `accumulate` splits a step into micro-batches
without changing its gradient; `policy` is the one precision and device policy (also used by
`eval`). `allocator` and `attention` hold the CPU speed settings that give the same model faster.

`mmssl.train.loop.train(cfg)` runs a resolved `ExperimentConfig`; `mmssl train` is its CLI.
"""
