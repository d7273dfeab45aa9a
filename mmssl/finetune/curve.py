"""The WiSE-FT curve: accuracy on the in-distribution set and on each shifted set, per alpha.

Writes OUT/curve.json, OUT/curve.png (ID accuracy against mean shifted accuracy, one point per
alpha, as in the WiSE-FT paper's figure) and OUT/alpha_<A>.pt, the checkpoint at the chosen alpha.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence


def wise_curve(start: dict, objective, config_record: dict, datasets: Sequence[str], alphas: Sequence[float], chosen: float,
               out: Path, batch_size: int = 256, workers: int = 2) -> dict:
    """Score theta(alpha) for every alpha on `datasets` (the first: in-distribution); returns the curve."""
    from eval.classify import SavedClassifier, run_classify
    from eval.embed import LoadedModel
    from mmssl.finetune.objective import HEAD
    from mmssl.finetune.wise import interpolate
    from mmssl.models import image_transform

    finetuned_model = {key: value.detach().cpu() for key, value in objective.model.state_dict().items()}
    finetuned_head = {key: value.detach().cpu() for key, value in objective.heads_state_dict()[HEAD].items()}
    device = next(objective.model.parameters()).device
    model = copy.deepcopy(objective.model).eval()
    head = copy.deepcopy(objective.head).cpu().eval()
    loaded = LoadedModel(model, model.tokenizer, image_transform(model, train=False),
                         getattr(model, "model_name", "model"), "wise", device, None)
    points = []
    for alpha in sorted(set(alphas) | {chosen}):
        model.load_state_dict(interpolate(start["model"], finetuned_model, alpha))
        head.load_state_dict(interpolate(start["head"], finetuned_head, alpha))
        classifier = SavedClassifier(head, start["classnames"])
        scores = {data: run_classify(loaded, classifier, data, batch_size, workers)["result"]["metrics"]["acc1"]
                  for data in datasets}
        shifted = [scores[data] for data in datasets[1:]]
        points.append({"alpha": alpha, "id_acc1": scores[datasets[0]], "acc1": scores,
                       "shift_mean_acc1": sum(shifted) / len(shifted) if shifted else None})
    curve = {"id": datasets[0], "shifts": list(datasets[1:]), "points": points, "chosen_alpha": chosen}
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(curve, indent=2) + "\n")
    if len(datasets) > 1:
        plot_curve(curve, out / "curve.png")
    _write_chosen(start, finetuned_model, finetuned_head, config_record, chosen, out)
    return curve


def plot_curve(curve: dict, path: Path) -> None:
    """ID top-1 (x) against the mean shifted top-1 (y), one labelled point per alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve["points"]
    xs = [100 * p["id_acc1"] for p in points]
    ys = [100 * p["shift_mean_acc1"] for p in points]
    figure, axes = plt.subplots(figsize=(5, 4.2))
    axes.plot(xs, ys, "-o", color="tab:purple", markersize=4, label="WiSE-FT, alpha 0 .. 1")
    for point, x, y in zip(points, xs, ys):
        axes.annotate(f"{point['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for alpha, marker, name in ((0.0, "*", "zero-shot"), (1.0, "D", "fine-tuned")):
        end = next((i for i, p in enumerate(points) if p["alpha"] == alpha), None)
        if end is not None:
            axes.plot(xs[end], ys[end], marker, markersize=11, label=name)
    axes.set_xlabel(f"in-distribution top-1 (%): {Path(curve['id']).name}")
    axes.set_ylabel(f"mean top-1 over {len(curve['shifts'])} shifted set(s) (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _write_chosen(start, finetuned_model, finetuned_head, config_record: dict, alpha: float, out: Path) -> Path:
    from mmssl.finetune.objective import HEAD, ZEROSHOT_HEAD
    from mmssl.finetune.wise import wise_payload
    from mmssl.train.checkpoint import write_torch_file

    finetuned = {"model": finetuned_model, "config": config_record,
                 "heads": {HEAD: finetuned_head, ZEROSHOT_HEAD: start["head"]}}
    return write_torch_file(out / f"alpha_{alpha:g}.pt", wise_payload(start["model"], finetuned, alpha))
