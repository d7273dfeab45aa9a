"""The report's sections, each a function of the artefacts: results, training, queries, confusion, reproduce."""
from __future__ import annotations

from pathlib import Path

from mmssl.report import page, plots
from mmssl.report.artefacts import Artefacts
from mmssl.report.thumbnails import query_hits

FIGURES = "figures"


def all_sections(found: Artefacts) -> list[str]:
    return [part for part in (results(found), training(found), queries(found), confusion(found),
                              reproduce(found)) if part]


def subtitle(found: Artefacts) -> str:
    parts = []
    if found.train_config:
        model, train = found.train_config["model"], found.train_config["train"]
        parts.append(f"model {page.esc(model['name'])}, {train['steps']} steps × batch {train['batch_size']}")
    if found.plan and found.plan.get("total_seconds"):
        parts.append(f"quickstart wall time {found.plan['total_seconds'] / 60:.1f} min")
    if found.plan and found.plan.get("smoke"):
        parts.append("<b>smoke run</b> (tiny data, a few steps: the numbers mean nothing)")
    return " · ".join(parts) or "artefacts of an mmssl run"


def _count(found: Artefacts, split: str, fallback="?") -> str:
    manifest = found.datasets.get(split)
    return f"{manifest['num_samples']:,}" if manifest else fallback


def results(found: Artefacts) -> str:
    rows = []
    for split, what in (("val", "seen colour-shape pairs"), ("heldout", "the 6 unseen pairs")):
        result = found.zeroshot.get(split)
        if result is None:
            continue
        data = f"{split}: {result['num_samples']:,} images of {what}"
        metrics = result["metrics"]
        rows += [
            ["zero-shot classification", data, f"top-1 accuracy ({result['num_classes']} classes)", page.percent(metrics["acc1"])],
            ["", "", "top-5 accuracy", page.percent(metrics.get("acc5"))],
            ["", "", "mean per-class recall", page.percent(metrics.get("mean_per_class_recall"))],
        ]
    if found.retrieval:
        metrics = found.retrieval["metrics"]
        data = f"val: {found.retrieval['num_samples']:,} images, {found.retrieval['num_captions']:,} captions"
        for k in (1, 5, 10):
            rows.append(["retrieval" if k == 1 else "", data if k == 1 else "", f"text → image recall@{k}",
                         page.percent(metrics.get(f"image_retrieval_recall@{k}"))])
        for k in (1, 5, 10):
            rows.append(["", "", f"image → text recall@{k}", page.percent(metrics.get(f"text_retrieval_recall@{k}"))])
    if not rows:
        return ""
    heldout = ", ".join(found.datasets.get("heldout", {}).get("heldout_pairs", [])) or "see data/heldout/manifest.json"
    body = page.table(["evaluation", "data", "metric", "value"], rows, numeric_from=3) + f"""
<p class="note"><b>Zero-shot classification</b> compares each image embedding with one text embedding per
class (the average of the prompts in <code>templates.txt</code>, such as “a photo of a {{}}”) and predicts the
closest; every image is scored over all 48 colour + shape class names, so chance top-1 is 1/48 ≈ 2.1%.
<b>heldout</b> images show the six colour-shape pairs that never appear in any training image or caption
({page.esc(heldout)}): the model saw each colour and each shape, but never together, so heldout accuracy
measures compositional generalisation. <b>Retrieval</b> ranks all val images for each caption (text → image) and
all captions for each image (image → text); captions repeat across images (many read “a red circle”), so
several images fit a caption equally well and recall@1 counts only the one image it was written for.</p>"""
    return page.section("results", "1. Results", body)


def training(found: Artefacts) -> str:
    if not found.metrics:
        return ""
    config = (found.train_config or {}).get("train", {})
    batch = config.get("batch_size")
    figures_dir = found.out / FIGURES
    parts = [page.figure(
        _relative(found, plots.plot_loss(found.metrics, figures_dir / "loss.png", batch)), "training loss curve",
        "Training loss: symmetric InfoNCE (image → text and text → image cross-entropy over the batch), "
        "averaged over each logging window. Its floor is above 0 because captions repeat within a batch.")]
    num_classes = found.zeroshot.get("val", {}).get("num_classes")
    accuracy = plots.plot_accuracy(found.metrics, figures_dir / "accuracy.png", num_classes)
    if accuracy is not None:
        parts.append(page.figure(_relative(found, accuracy), "validation accuracy curve",
                                 "Zero-shot accuracy on val measured during training "
                                 "(<code>train.val_every</code> steps apart), over all class names."))
    body = f"<div class=\"figures\">{''.join(parts)}</div>\n" + _settings_table(found, config)
    return page.section("training", "2. Training", body)


def _settings_table(found: Artefacts, config: dict) -> str:
    last = found.metrics[-1]
    timed = [r["samples_per_s"] for r in found.metrics if "samples_per_s" in r]
    rows = [["training images (data/train)", _count(found, "train")]]
    if found.train_config:
        model = found.train_config["model"]
        rows += [
            ["model", model["name"]],
            ["optimizer steps × batch size", f"{last['step']} × {config['batch_size']} = "
                                             f"{last['step'] * config['batch_size']:,} image-caption pairs"],
            ["peak learning rate, warmup steps, weight decay",
             f"{config['lr']:g}, {config['warmup']}, {config['weight_decay']:g}"],
            ["precision", config["precision"]],
        ]
    rows.append(["final training loss", f"{last['loss']:.3f}"])
    if "logit_scale" in last:
        rows.append(["final logit scale (1 / temperature)", f"{last['logit_scale']:.1f}"])
    if timed:
        rows.append(["throughput (median over log windows)", f"{sorted(timed)[len(timed) // 2]:.0f} image-caption pairs/s"])
    seconds = _step_seconds(found, "train")
    if seconds:
        rows.append(["training wall time (incl. validation)", f"{seconds:.0f} s"])
    return page.table(["setting", "value"], rows, numeric_from=2)


def queries(found: Artefacts) -> str:
    blocks = [page.query_block(search["query"], query_hits(search, found.out, number))
              for number, search in enumerate(found.searches, start=1)]
    if not blocks:
        return ""
    body = "\n".join(blocks) + """
<p class="note">Each row is one text query to the search index (built from the val images), followed by the five
images it returns first, best match on the left. Under each image: its rank, its own caption from the data set (the
ground truth; the search sees only the image) and the cosine similarity between the query's and the image's
embeddings. “a blue circle” is a held-out composition: neither the training set nor the indexed val images contain
one, so its hits show what the model associates with the phrase.</p>"""
    return page.section("queries", "3. Example text queries (top-5 images)", body)


def confusion(found: Artefacts) -> str:
    parts = []
    if found.confusion is not None:
        parts.append(page.figure(
            _relative(found, found.confusion), "confusion matrix on val",
            "Zero-shot confusion matrix on val: rows are true classes, columns predicted classes, colour is the "
            "fraction of a row's images (each row sums to 1). Classes go colour by colour, six shapes each, so a "
            "mistake inside a 6 × 6 diagonal block confuses shapes of one colour. Click for full size.", width=1000))
    heldout = found.per_class.get("heldout")
    if heldout:
        rows = [[row["classname"], row["support"], row["correct"], page.percent(float(row["recall"]))]
                for row in heldout if int(row["support"])]
        parts.append("<h3>Held-out compositions, per class</h3>"
                     + page.table(["class (never seen in training)", "images", "correct", "recall"], rows))
    val = found.per_class.get("val")
    if val:
        scored = sorted((float(r["recall"]), r["classname"], r["support"]) for r in val if int(r["support"]))
        rows = [[name, support, page.percent(recall)] for recall, name, support in scored[:5]]
        parts.append("<h3>Hardest val classes</h3>" + page.table(["class", "images", "recall"], rows))
    if not parts:
        return ""
    return page.section("confusion", "4. Confusion matrix and per-class recall", "\n".join(parts))


def reproduce(found: Artefacts) -> str:
    if not found.plan:
        return ""
    blocks = [page.command_block(step["title"], step["command"], step.get("seconds"))
              for step in found.plan["steps"]]
    intro = ("<p class=\"note\">Every artefact above comes from one of these ordinary commands, run from the folder "
             "quickstart was started in; each can be re-run alone. <a href=\"commands.sh\">commands.sh</a> holds "
             "them all (<code>bash commands.sh</code>). Wall time of each step in parentheses.</p>")
    return page.section("reproduce", "5. Reproduce each step", intro + "\n".join(blocks))


def _step_seconds(found: Artefacts, name: str):
    for step in (found.plan or {}).get("steps", []):
        if step["name"] == name:
            return step.get("seconds")
    return None


def _relative(found: Artefacts, path: Path) -> str:
    return Path(path).resolve().relative_to(found.out.resolve()).as_posix()
