"""CLIP_benchmark's webdataset layout: `mmssl prep export-clip-benchmark` writes it, `mmssl eval`
reads it, and CLIP_benchmark's own CLI (1.6.2, unmodified, run from its isolated install) scores
the same model on the same data to the same numbers; `mmssl eval suite`'s table has the rows its
`build` makes of the same JSONs."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import anchor, http_server, to_tensor, write_micro_checkpoint, write_shards
from mmssl.cli import main
from mmssl.data import build_eval_loader, resolve_shards
from mmssl.data.benchmark_layout import find_split
from mmssl.errors import UserError

TESTS = Path(__file__).resolve().parent
COMMON = ["--workers", "0", "--batch-size", "16", "--precision", "fp32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A micro model and its export; synthetic val (48 labelled samples, 48 classes) and a
    3-captions-per-image set, each exported to CLIP_benchmark's layout; a suite over the exports."""
    root = tmp_path_factory.mktemp("clip_benchmark")
    assert main(["prep", "synthetic", "--out", str(root / "syn"), "--num-train", "1", "--num-val", "48",
                 "--num-heldout", "4", "--workers", "1", "--quiet"]) == 0
    write_shards(root / "captioned", [7, 6], captions_json=True)
    checkpoint = write_micro_checkpoint(root / "micro.pt")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(root / "export")]) == 0
    assert main(["prep", "export-clip-benchmark", "--data", str(root / "syn" / "val"), "--out", str(root / "wds_syn"),
                 "--quiet"]) == 0
    assert main(["prep", "export-clip-benchmark", "--data", str(root / "captioned"), "--out",
                 str(root / "wds_captions"), "--dataset-type", "retrieval", "--shard-size", "5", "--quiet"]) == 0
    (root / "suite.txt").write_text("zeroshot wds_syn\nretrieval wds_captions\nzeroshot syn/val name=ours\n")
    assert main(["eval", "suite", "--checkpoint", str(checkpoint), "--datasets", str(root / "suite.txt"),
                 "--out", str(root / "suite"), *COMMON]) == 0
    return root


def _clip_benchmark(world: Path, *commands: list) -> None:
    """CLIP_benchmark's CLI on the exported micro model, one process for all `commands`."""
    folder = anchor("clip_benchmark")
    argv = [word for command in commands for word in ["---", *command]][1:]
    env = {**os.environ, "PYTHONPATH": str(folder)}
    done = subprocess.run([sys.executable, str(TESTS / "clip_benchmark_launcher.py"), str(world / "export" / "micro.json"),
                           *argv], env=env, cwd=world, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def theirs(world):
    """CLIP_benchmark's JSONs for both exports, and its `build` CSV over the suite's JSONs."""
    model = ["--model", "micro", "--pretrained", str(world / "export" / "open_clip_model.safetensors"),
             "--no_amp", "--batch_size", "16", "--num_workers", "0", "--quiet"]
    _clip_benchmark(world,
                    ["eval", "--dataset", "wds/syn", "--dataset_root", "wds_syn", "--task", "zeroshot_classification",
                     "--output", "cb_zeroshot.json", *model],
                    ["eval", "--dataset", "wds/captions", "--dataset_root", "wds_captions",
                     "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10", "--output", "cb_retrieval.json",
                     *model],
                    ["build", "suite", "--output", "cb_build.csv"])
    return {name: json.loads((world / f"cb_{name}.json").read_text()) for name in ("zeroshot", "retrieval")}


def _ours(capsys, *argv) -> dict:
    assert main(["eval", *argv, *COMMON]) == 0
    return json.loads(capsys.readouterr().out)


def test_zeroshot_on_the_export_equals_clip_benchmark_and_our_own_shards(world, theirs, capsys):
    exported = _ours(capsys, "zeroshot", "--checkpoint", str(world / "micro.pt"), "--data", str(world / "wds_syn"))
    shards = _ours(capsys, "zeroshot", "--checkpoint", str(world / "micro.pt"), "--data", str(world / "syn" / "val"))
    assert exported["num_samples"] == 48 and (exported["num_classes"], exported["num_templates"]) == (48, 8)
    assert set(theirs["zeroshot"]["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    for name, value in theirs["zeroshot"]["metrics"].items():
        # acc1/acc5 are counts over 48 and mean_per_class_recall sklearn's float64 on both sides
        assert exported["metrics"][name] == pytest.approx(value, abs=1e-12), name
        assert shards["metrics"][name] == exported["metrics"][name], name
    assert theirs["zeroshot"]["metrics"]["acc5"] > theirs["zeroshot"]["metrics"]["acc1"]  # not a degenerate score


def test_retrieval_on_the_export_equals_clip_benchmark(world, theirs, capsys):
    ours = _ours(capsys, "retrieval", "--checkpoint", str(world / "micro.pt"), "--data", str(world / "wds_captions"))
    assert (ours["num_samples"], ours["num_captions"]) == (13, 39)
    recalls = {name: value for name, value in ours["metrics"].items() if "recall@" in name}
    assert set(recalls) == set(theirs["retrieval"]["metrics"]) and len(recalls) == 6
    for name, value in theirs["retrieval"]["metrics"].items():
        # CLIP_benchmark averages its hits in float32 (`.float().mean()`): equal to float32 rounding
        assert recalls[name] == pytest.approx(value, abs=1e-6), name
    assert len({round(value, 6) for value in recalls.values()}) > 1


def test_suite_table_has_the_rows_clip_benchmark_build_makes_of_its_jsons(world, theirs):
    def rows(path):
        with open(path, newline="") as handle:
            return sorted(tuple(sorted(row.items())) for row in csv.DictReader(handle))

    assert rows(world / "suite" / "results.csv") == rows(world / "cb_build.csv")
    table = list(csv.DictReader(open(world / "suite" / "results.csv", newline="")))
    assert [row["dataset"] for row in table] == ["wds_syn", "wds_captions", "ours"]
    assert float(table[0]["acc1"]) == theirs["zeroshot"]["metrics"]["acc1"]
    assert float(table[1]["text_retrieval_recall@5"]) == pytest.approx(
        theirs["retrieval"]["metrics"]["text_retrieval_recall@5"], abs=1e-6)


# --- the layout as data (no CLIP_benchmark needed) ---------------------------------------------


def _samples(source, **options):
    loader = build_eval_loader(source, transform=to_tensor, batch_size=5, num_workers=0, **options)
    return [(label, captions) for batch in loader
            for label, captions in zip(batch.labels.tolist() if batch.labels is not None else [None] * len(batch.keys),
                                       batch.captions)]


def test_export_reads_back_as_the_samples_it_came_from(world):
    assert _samples(str(world / "wds_syn")) == _samples(str(world / "syn" / "val"))
    assert _samples(str(world / "wds_captions")) == _samples(str(world / "captioned"))
    split = find_split(str(world / "wds_captions"))
    assert (split.split, split.dataset_type, split.shard_names) == ("test", "retrieval", ("0.tar", "1.tar", "2.tar"))
    assert (world / "wds_syn" / "test" / "nshards.txt").read_text() == "1\n"
    templates = (world / "wds_syn" / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates[0] == "a {c}" and len(templates) == 8
    assert (world / "wds_syn" / "classnames.txt").read_text() == (world / "syn" / "val" / "classnames.txt").read_text()
    assert sorted(os.listdir(world / "wds_syn")) == ["classnames.txt", "dataset_type.txt", "test",
                                                     "zeroshot_classification_templates.txt"]


def test_newlines_inside_captions_survive_the_export(tmp_path):
    import webdataset as wds

    from helpers import jpeg_bytes

    (tmp_path / "src").mkdir()
    with wds.TarWriter(str(tmp_path / "src" / "00000.tar")) as sink:
        sink.write({"__key__": "a", "jpg": jpeg_bytes(0), "json": json.dumps({"captions": ["two\nlines", "one"]})})
    (tmp_path / "src" / "manifest.json").write_text(json.dumps({"shards": [{"url": "00000.tar", "count": 1}]}))
    assert main(["prep", "export-clip-benchmark", "--data", str(tmp_path / "src"), "--out", str(tmp_path / "wds"),
                 "--quiet"]) == 0
    import tarfile

    with tarfile.open(tmp_path / "wds" / "test" / "0.tar") as tar:
        assert tar.extractfile("s0000000.txt").read() == b"two\\nlines\none"
    assert (tmp_path / "wds" / "dataset_type.txt").read_text() == "retrieval\n"
    assert _samples(str(tmp_path / "wds")) == [(None, ["two\nlines", "one"])]


def test_split_option_and_split_folders(world, tmp_path, capsys, monkeypatch):
    root = tmp_path / "wds"
    for split, data in (("train", world / "captioned"), ("test", world / "syn" / "val")):
        assert main(["prep", "export-clip-benchmark", "--data", str(data), "--out", str(root), "--split", split,
                     "--dataset-type", "classification", "--quiet"]) == 0
    capsys.readouterr()
    assert len(_samples(str(root))) == 48 and len(_samples(str(root), split="train")) == 13
    assert [s.url for s in resolve_shards(str(root), split="train")] == [str(root / "train" / "0.tar")]
    assert [s.url for s in resolve_shards(str(root / "train"))] == [str(root / "train" / "0.tar")]
    with pytest.raises(UserError, match="has no 'val' split.*its splits: test, train"):
        resolve_shards(str(root), split="val")
    with pytest.raises(UserError, match="is the 'train' split folder"):
        resolve_shards(str(root / "train"), split="test")
    with pytest.raises(UserError, match="applies to CLIP_benchmark folders"):
        resolve_shards(str(world / "syn" / "val"), split="train")
    base = ["--checkpoint", str(world / "micro.pt"), *COMMON]
    assert main(["eval", "zeroshot", "--data", str(world / "syn" / "val"), "--split", "test", *base]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # linear probe: --train ROOT reads ROOT/train, --test ROOT reads ROOT/test (the probe itself is
    # eval.linear_probe's, tested there; here it only records what it was given)
    from eval import linear_probe

    seen = []
    monkeypatch.setattr(linear_probe, "linear_probe", lambda *sets, **_: seen.append([len(s) for s in sets]) or
                        linear_probe.ProbeResult({"lp_acc1": 1.0}, 1.0, {}))
    probe = _ours(capsys, "linear-probe", "--train", str(root), "--test", str(root), *base[:2])
    assert (probe["num_train_samples"], probe["num_samples"]) == (13, 48) and seen == [[13, 13, 48, 48]]


def test_remote_folder_is_read_through_fsspec_only_when_allowed(world, capsys):
    local = _ours(capsys, "zeroshot", "--checkpoint", str(world / "micro.pt"), "--data", str(world / "wds_syn"))
    with http_server(directory=world) as base:
        url = f"{base}/wds_syn"
        assert main(["eval", "zeroshot", "--checkpoint", str(world / "micro.pt"), "--data", url, *COMMON]) == 2
        assert "--allow-remote" in capsys.readouterr().err
        remote = _ours(capsys, "zeroshot", "--checkpoint", str(world / "micro.pt"), "--data", url, "--allow-remote")
        assert main(["eval", "zeroshot", "--checkpoint", str(world / "micro.pt"), "--data", f"{base}/missing",
                     "--allow-remote", *COMMON]) == 2
        err = capsys.readouterr().err
        assert "missing/test/nshards.txt" in err and err.count("\n") == 1
    assert remote["metrics"] == local["metrics"] and remote["num_classes"] == 48


def _copy_layout(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda r: (r / "test" / "nshards.txt").write_text("two\n"), "must hold the number of shards"),
    (lambda r: (r / "test" / "nshards.txt").write_text("0\n"), "must hold the number of shards"),
    (lambda r: (r / "test" / "nshards.txt").write_text("99999999\n"), "must hold the number of shards"),
    (lambda r: (r / "test" / "nshards.txt").write_text("1" * 200), "over 64 bytes"),
    (lambda r: (r / "test" / "nshards.txt").write_text("2\n"), "shard not found"),
    (lambda r: (r / "dataset_type.txt").write_text("multilabel\n"), "multilabel sets"),
    (lambda r: (r / "dataset_type.txt").write_text("segmentation\n"), "must say classification or retrieval"),
    (lambda r: (r / "classnames.txt").write_text("a\n\nb\n"), "line 2: empty class name"),
    (lambda r: (r / "zeroshot_classification_templates.txt").write_text("no placeholder\n"), "placeholder"),
])
def test_malformed_folders_are_one_line_errors(world, tmp_path, capsys, edit, message):
    root = _copy_layout(world / "wds_syn", tmp_path / "wds")
    edit(root)
    assert main(["eval", "zeroshot", "--checkpoint", str(world / "micro.pt"), "--data", str(root), *COMMON]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmssl: error: ") and err.count("\n") == 1 and message in err, err


def test_a_shard_linked_from_outside_the_folder_is_refused(world, tmp_path):
    root = _copy_layout(world / "wds_syn", tmp_path / "wds")
    (root / "test" / "0.tar").unlink()
    (root / "test" / "0.tar").symlink_to(world / "wds_captions" / "test" / "0.tar")
    with pytest.raises(UserError, match="points outside the folder named"):
        resolve_shards(str(root))


def test_corrupt_sample_is_left_out_of_the_export_and_counted(tmp_path, capsys):
    write_shards(tmp_path / "src", [4], corrupt={"000000002"})
    assert main(["prep", "export-clip-benchmark", "--data", str(tmp_path / "src"), "--out", str(tmp_path / "wds")]) == 0
    out = capsys.readouterr().out
    assert "3 samples written, 1 skipped (000000002: " in out and "classification" in out
    labels = [label for label, _ in _samples(str(tmp_path / "wds"))]
    assert labels == [0, 1, 3]  # keys renumbered s0000000.., labels kept in input order


def test_export_refuses_what_it_would_overwrite(world, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    base = ["prep", "export-clip-benchmark", "--data", str(world / "syn" / "val"), "--quiet"]
    assert main([*base, "--out", str(foreign)]) == 2
    assert "not a CLIP_benchmark folder" in capsys.readouterr().err
    assert sorted(os.listdir(foreign)) == ["notes.txt"]

    out = tmp_path / "wds"
    assert main([*base, "--out", str(out)]) == 0
    assert main([*base, "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (out / "classnames.txt").write_text("other\n")
    assert main([*base, "--out", str(out), "--split", "train"]) == 2
    assert "exists with other content" in capsys.readouterr().err
    assert main([*base, "--out", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["classnames.txt", "dataset_type.txt", "test",
                                       "zeroshot_classification_templates.txt"]
    assert (out / "classnames.txt").read_text() == (world / "syn" / "val" / "classnames.txt").read_text()

    (tmp_path / "odd").mkdir()
    write_shards(tmp_path / "odd", [2])
    (tmp_path / "odd" / "templates.txt").write_text("a {} {x}\n")
    assert main(["prep", "export-clip-benchmark", "--data", str(tmp_path / "odd"), "--out", str(tmp_path / "o2")]) == 2
    assert "no other braces" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "test").exists() and not any((tmp_path / "o2").glob(".*"))
