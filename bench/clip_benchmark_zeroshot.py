"""CLIP_benchmark's own zero-shot evaluation, timed: the anchor `bench/eval.py` runs in a subprocess.

    PYTHONPATH=.anchors/clip_benchmark python bench/clip_benchmark_zeroshot.py \
        MODEL.json OUT.json THREADS BF16(0|1) CLI_ARGS...

Registers the exported model config with open_clip, sets torch's thread count, then runs
CLIP_benchmark's command line (`clip_benchmark.cli.main()`, unmodified: it loads the model
through open_clip and reads the webdataset folder with its own loader and DataLoader) with
`zeroshot_classification.evaluate` wrapped: one untimed warm-up forward of each encoder, then the
call alone is timed (classifier building, image embedding, scoring, metrics). OUT.json gets
{"seconds", "samples", "metrics"}. With BF16=1 the autocast dtype of the device is set to bf16,
so its `--amp` (torch.autocast with the device type and no dtype: bf16 on CPU, fp16 on CUDA)
means bf16 on either.

Same numpy shim as tests/clip_benchmark_launcher.py: its `accuracy` calls `float(array)` on a
one-element array, which numpy >= 2.4 refuses; nothing it computes changes.
"""
import builtins
import json
import sys
import time
from pathlib import Path

# this folder would head sys.path, and bench/eval.py shadow anything importing `eval`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402


def _float(value=0.0):
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())
    return builtins.float(value)


def warm_up(model, tokenizer, classnames, templates, device, amp, batch_size: int) -> None:
    """One forward of each encoder outside the timing (first calls pay one-off allocations)."""
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    with torch.no_grad(), torch.autocast(device, enabled=amp):
        model.encode_image(torch.randn(batch_size, 3, size, size, device=device))
        model.encode_text(tokenizer([template.format(c=classnames[0]) for template in templates]).to(device))


def main(argv: list) -> None:
    config, out, threads, bf16, cli_args = argv[0], Path(argv[1]), int(argv[2]), argv[3] == "1", argv[4:]
    torch.set_num_threads(threads)
    open_clip.add_model_config(config)
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    zeroshot_classification.float = _float
    if bf16:
        for device_type in ("cpu", "cuda"):
            torch.set_autocast_dtype(device_type, torch.bfloat16)
    batch_size = int(cli_args[cli_args.index("--batch_size") + 1])
    evaluate, run_classification = zeroshot_classification.evaluate, zeroshot_classification.run_classification
    report = {}

    def counted_classification(*args, **kwargs):
        logits, target = run_classification(*args, **kwargs)
        report["samples"] = len(target)
        return logits, target

    def timed_evaluate(model, dataloader, tokenizer, classnames, templates, device, amp=True, **kwargs):
        warm_up(model, tokenizer, classnames, templates, device, amp, batch_size)
        start = time.perf_counter()
        metrics = evaluate(model, dataloader, tokenizer, classnames, templates, device, amp=amp, **kwargs)
        report["seconds"] = time.perf_counter() - start
        report["metrics"] = metrics
        return metrics

    zeroshot_classification.evaluate = timed_evaluate
    zeroshot_classification.run_classification = counted_classification
    sys.argv = ["clip_benchmark", *cli_args]
    cli.main()
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
