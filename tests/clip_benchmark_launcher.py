"""Runs CLIP_benchmark's own command line, unmodified, on a model `mmssl export` wrote.

    PYTHONPATH=.anchors/clip_benchmark python tests/clip_benchmark_launcher.py MODEL.json ARGS... [--- ARGS...]

Registers the exported model config with open_clip (so `--model NAME --pretrained
DIR/open_clip_model.safetensors` loads it), then calls `clip_benchmark.cli.main()` once per
`---`-separated argument list, in one process so its imports are paid once.

One shim, for the numpy this environment has: CLIP_benchmark 1.6.2's `accuracy` turns a
one-element array into a float with `float(array)`, which numpy >= 2.4 refuses (older numpy
accepted it). Its module's `float` is given numpy's old behaviour for one-element arrays; no
computation of CLIP_benchmark is changed.
"""
import builtins
import sys

import numpy as np
import open_clip


def _float(value=0.0):
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())
    return builtins.float(value)


def main(argv: list) -> None:
    config, rest = argv[0], argv[1:]
    open_clip.add_model_config(config)
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    zeroshot_classification.float = _float
    commands, current = [], []
    for word in rest:
        if word == "---":
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    for command in commands:
        sys.argv = ["clip_benchmark", *command]
        cli.main()


if __name__ == "__main__":
    main(sys.argv[1:])
