"""The report's training figures, drawn from metrics.jsonl with matplotlib's file-only Agg backend."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

FIGSIZE = (5.2, 3.5)  # inches at 100 dpi: two plots side by side in the report
LOSS_TERMS = ("contrastive_loss", "mlm_loss", "inpaint_loss")  # drawn beside the total when logged


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(records: list, path: Path, batch_size: Optional[int] = None) -> Path:
    """Training loss (mean over each log window) against the optimizer step."""
    plt = _pyplot()
    steps = [r["step"] for r in records]
    figure, axes = plt.subplots(figsize=FIGSIZE)
    axes.plot(steps, [r["loss"] for r in records], marker="o", markersize=3, label="total loss")
    for term in LOSS_TERMS:
        if term in records[0] and any(abs(r[term] - r["loss"]) > 1e-9 for r in records):
            axes.plot(steps, [r[term] for r in records], linestyle="--", label=term.replace("_", " "))
    per_step = f" ({batch_size} image-caption pairs each)" if batch_size else ""
    axes.set_xlabel(f"optimizer step{per_step}")
    axes.set_ylabel("training loss (nats)")
    axes.set_title("Training loss")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(plt, figure, path)


def plot_accuracy(records: list, path: Path, num_classes: Optional[int] = None) -> Optional[Path]:
    """Periodic zero-shot accuracy on val (the `val/...` fields) against the step; None if never validated."""
    validated = [r for r in records if "val/acc1" in r]
    if not validated:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in validated]
    figure, axes = plt.subplots(figsize=FIGSIZE)
    axes.plot(steps, [100 * r["val/acc1"] for r in validated], marker="o", label="top-1")
    if all(r.get("val/acc5") is not None for r in validated):
        axes.plot(steps, [100 * r["val/acc5"] for r in validated], marker="s", label="top-5")
    if num_classes:
        axes.axhline(100 / num_classes, color="grey", linestyle=":", label=f"chance top-1 (1/{num_classes})")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("zero-shot accuracy on val (%)")
    axes.set_title("Zero-shot accuracy during training")
    axes.set_xlim(left=0)
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return _save(plt, figure, path)


def plot_fewshot(ks: list, means: list, stds: list, path: Path, zeroshot_acc1: Optional[float] = None,
                 title: str = "Few-shot linear probe") -> Path:
    """Top-1 (%) against labelled images per class on a log2 axis, error bars one std over seeds;
    zero-shot (k=0, which a log axis cannot place) as a dashed horizontal line."""
    from matplotlib.ticker import FixedLocator, NullLocator

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=FIGSIZE)
    axes.errorbar(ks, [100 * m for m in means], yerr=[100 * s for s in stds], marker="o", capsize=3,
                  label="linear probe (mean ± std over seeds)")
    if zeroshot_acc1 is not None:
        axes.axhline(100 * zeroshot_acc1, color="grey", linestyle="--", label="zero-shot (k=0)")
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_locator(FixedLocator(ks))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([str(k) for k in ks])
    axes.set_xlabel("labelled training images per class (k)")
    axes.set_ylabel("top-1 accuracy on test (%)")
    axes.set_title(title)
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _save(plt, figure, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for axes in figure.axes:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
