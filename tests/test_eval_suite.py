"""`mmssl eval suite`: the datasets file format, one JSON per (model, evaluation) equal to what
`mmssl eval` prints, each model loaded once, and resuming (finished pairs skipped, a killed suite
rerun ends with the same table)."""
import json
import os

import pytest

from helpers import write_micro_checkpoint, write_shards
from mmssl.cli import main
from mmssl.errors import UserError

COMMON = ["--workers", "0", "--batch-size", "16", "--precision", "fp32"]
MODELS = ("micro.pt", "micro2.pt")  # two random inits (an openclip:NAME without weights is a new one per load)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two small labelled / captioned shard sets, a micro checkpoint, and a datasets file over them."""
    root = tmp_path_factory.mktemp("suite")
    labelled = write_shards(root / "data" / "labelled", [6, 4])
    (labelled / "classnames.txt").write_text("zero\none\ntwo\nthree\nfour\n")
    (labelled / "templates.txt").write_text("a photo of a {}.\n")
    write_shards(root / "data" / "captioned", [5], captions_json=True)
    write_micro_checkpoint(root / "micro.pt")
    write_micro_checkpoint(root / "micro2.pt", seed=1)
    (root / "datasets.txt").write_text(
        "# task  data                          options\n"
        "zeroshot      data/labelled\n"
        "\n"
        "retrieval     data/captioned              # three captions per image\n"
        "linear-probe  data/labelled data/captioned  name=probe seed=3\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def calls():
    """Counts model loads and evaluations (reset per test by `counted`); the linear probe's fit
    (eval.linear_probe's own tests cover it) is replaced by a recorder, which keeps these tests fast."""
    import eval.embed
    import eval.linear_probe
    import eval.suite

    calls = {"loads": 0, "evaluations": 0, "probes": []}
    load, evaluate = eval.embed.load_model, eval.suite._evaluate

    def counted_load(*args, **kwargs):
        calls["loads"] += 1
        return load(*args, **kwargs)

    def counted_evaluate(*args, **kwargs):
        calls["evaluations"] += 1
        return evaluate(*args, **kwargs)

    def probe(train_x, train_y, test_x, test_y, seed=0, **_):
        calls["probes"].append((len(train_x), len(test_x), seed))
        return eval.linear_probe.ProbeResult({"lp_acc1": 0.5, "lp_acc5": float("nan")}, 0.01, {})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(eval.embed, "load_model", counted_load)
        patch.setattr(eval.suite, "_evaluate", counted_evaluate)
        patch.setattr(eval.linear_probe, "linear_probe", probe)
        yield calls


@pytest.fixture()
def counted(calls):
    calls.update(loads=0, evaluations=0, probes=[])
    return calls


def _suite(world, out, *models, capsys=None) -> int:
    models = models or MODELS
    code = main(["eval", "suite", "--checkpoint", *[str(world / model) for model in models],
                 "--datasets", str(world / "datasets.txt"), "--out", str(out), *COMMON])
    if capsys is not None:
        capsys.readouterr()
    return code


@pytest.fixture(scope="module")
def first_run(world, tmp_path_factory):
    """The suite's output folder after one uninterrupted run (its own counters: module scope)."""
    out = tmp_path_factory.mktemp("first") / "out"
    assert _suite(world, out) == 0
    return out


def _jsons(out):
    return sorted(path.name for path in out.glob("*.json"))


def test_each_result_equals_what_mmssl_eval_prints(world, first_run, capsys):
    names = _jsons(first_run)
    assert len(names) == 6 and all(name.count("__") == 3 for name in names)
    data = world / "data"
    singles = {
        ("zeroshot", "data/labelled"): ["zeroshot", "--data", str(data / "labelled")],
        ("retrieval", "data/captioned"): ["retrieval", "--data", str(data / "captioned")],
        ("linear-probe", "probe"): ["linear-probe", "--train", str(data / "labelled"), "--test",
                                    str(data / "captioned"), "--seed", "3"],
    }
    for model in MODELS:
        for (task, name), argv in singles.items():
            [path] = [p for p in first_run.glob("*.json") if f"-{model}__{task}__" in p.name]
            ours = json.loads(path.read_text())
            assert main(["eval", *argv, "--checkpoint", str(world / model), *COMMON]) == 0
            single = json.loads(capsys.readouterr().out)
            assert ours["dataset"] == name
            if task == "linear-probe":
                assert (ours["train_dataset"], single["train_dataset"]) == ("data/labelled", str(data / "labelled"))
            for key in ("dataset", "train_dataset"):
                single.pop(key, None), ours.pop(key, None)
            assert ours == single, (model, task)


def test_each_model_is_loaded_once_and_the_table_lists_every_pair(world, tmp_path, counted, capsys):
    out = tmp_path / "out"
    assert main(["eval", "suite", "--checkpoint", str(world / "micro.pt"), str(world / "micro2.pt"),
                 "--datasets", str(world / "datasets.txt"), "--out", str(out), *COMMON]) == 0
    printed = capsys.readouterr().out
    assert (counted["loads"], counted["evaluations"]) == (2, 6)
    assert counted["probes"] == [(10, 5, 3)] * 2        # labelled (6 + 4) -> captioned (5), seed from the line
    lines = (out / "results.md").read_text().splitlines()
    assert printed.splitlines() == lines and len(lines) == 2 + 6
    assert lines[0].startswith("| model_fullname | model | pretrained | dataset | task | acc1 | acc5 |")
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("model_fullname,model,pretrained,dataset,task,acc1,acc5,")
    assert [row.split(",")[3:5] for row in rows[1:4]] == [["data/labelled", "zeroshot_classification"],
                                                          ["data/captioned", "zeroshot_retrieval"],
                                                          ["probe", "linear_probe"]]
    assert rows[4].startswith(f"micro {world / 'micro2.pt'},micro,{world / 'micro2.pt'},data/labelled,")


def test_a_rerun_skips_finished_pairs_and_writes_the_same_table(world, first_run, counted, capsys):
    table = (first_run / "results.csv").read_bytes()
    stamps = {path.name: path.stat().st_mtime_ns for path in first_run.glob("*.json")}
    assert _suite(world, first_run, capsys=capsys) == 0
    assert (counted["loads"], counted["evaluations"]) == (0, 0)
    assert (first_run / "results.csv").read_bytes() == table
    assert {path.name: path.stat().st_mtime_ns for path in first_run.glob("*.json")} == stamps


def test_a_killed_suite_resumes_to_the_same_table(world, first_run, tmp_path, monkeypatch, counted, capsys):
    import eval.suite

    out = tmp_path / "out"
    evaluate = eval.suite._evaluate

    def killed_at_the_fourth(*args, **kwargs):
        if counted["evaluations"] == 3:              # three pairs done: stop inside the fourth
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(eval.suite, "_evaluate", killed_at_the_fourth)
    assert _suite(world, out, capsys=capsys) == 130
    assert len(_jsons(out)) == 3 and not (out / "results.csv").exists()
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    monkeypatch.setattr(eval.suite, "_evaluate", evaluate)
    counted["loads"] = 0
    assert _suite(world, out, capsys=capsys) == 0
    assert counted["loads"] == 1                        # the first model's pairs were all done
    assert _jsons(out) == _jsons(first_run)
    for name in ("results.csv", "results.md"):
        assert (out / name).read_bytes() == (first_run / name).read_bytes()


def test_a_broken_or_foreign_result_is_evaluated_again(world, tmp_path, counted, capsys):
    out = tmp_path / "out"
    assert _suite(world, out, "micro.pt", capsys=capsys) == 0
    zeroshot, retrieval, probe = (next(out.glob(f"*__{task}__*.json")) for task in ("zeroshot", "retrieval",
                                                                                     "linear-probe"))
    zeroshot.write_text(zeroshot.read_text()[:50])                                  # cut short
    retrieval.write_text(probe.read_text())                                         # another task's result
    counted["evaluations"] = 0
    assert _suite(world, out, "micro.pt", capsys=capsys) == 0
    assert counted["evaluations"] == 2
    assert json.loads(retrieval.read_text())["task"] == "zeroshot_retrieval"


def test_a_rewritten_checkpoint_is_evaluated_again(world, tmp_path, counted, capsys):
    out = tmp_path / "out"
    checkpoint = write_micro_checkpoint(tmp_path / "m" / "micro.pt")
    argv = ["eval", "suite", "--checkpoint", str(checkpoint), "--datasets", str(world / "datasets.txt"),
            "--out", str(out), *COMMON]
    assert main(argv) == 0
    before = _jsons(out)
    os.utime(checkpoint, ns=(1, 1))
    counted["evaluations"] = 0
    assert main(argv) == 0
    capsys.readouterr()
    assert counted["evaluations"] == 3 and len(set(_jsons(out)) - set(before)) == 3
    assert len((out / "results.csv").read_text().splitlines()) == 4   # the table holds this run's pairs only


# --- the datasets file ---------------------------------------------------------------------------


def test_lines_resolve_relative_to_the_file_with_their_options(world):
    from eval.suite import parse_datasets_file

    path = world / "more.txt"
    path.write_text('zeroshot "data/labelled" split=x classnames=imagenet templates=t.txt name=set\n'
                    "zeroshot_retrieval data/captioned\n"
                    "retrieval https://example.invalid/wds_flickr  # remote: kept as written\n")
    first, second, third = parse_datasets_file(path)
    assert (first.task, first.data, first.name) == ("zeroshot", (str(world / "data" / "labelled"),), "set")
    assert first.options == {"split": "x", "classnames": "imagenet", "templates": str(world / "t.txt"), "name": "set"}
    assert (second.task, second.name, second.number) == ("retrieval", "data/captioned", 2)
    assert third.data == ("https://example.invalid/wds_flickr",)


@pytest.mark.parametrize("text, message", [
    ("zeroshoot data/labelled\n", ":1: unknown task 'zeroshoot'"),
    ("\n# c\nzeroshot\n", ":3: zeroshot takes DATA, got 0"),
    ("linear-probe data/labelled\n", ":1: linear-probe takes TRAIN TEST, got 1"),
    ("retrieval data/captioned classnames=x\n", ":1: retrieval takes no option 'classnames'"),
    ("zeroshot name=a data/labelled\n", ":1: options (key=value) go after the data"),
    ("zeroshot data/labelled split=a split=b\n", ":1: option 'split' given twice"),
    ("zeroshot data/missing\n", ":1: data not found"),
    ("linear-probe data/labelled data/labelled seed=x\n", ":1: seed must be a whole number"),
    ("zeroshot 'data/labelled\n", ":1: No closing quotation"),
    ("zeroshot data/labelled\nzeroshot data/labelled\n", ":2: zeroshot on 'data/labelled' is already line 1"),
    ("# nothing\n", "no evaluations listed"),
])
def test_a_bad_line_is_a_one_line_error_naming_it(world, tmp_path, capsys, text, message):
    from eval.suite import parse_datasets_file

    path = world / "bad.txt"
    path.write_text(text)
    with pytest.raises(UserError, match=None) as raised:
        parse_datasets_file(path)
    assert message in str(raised.value) and str(path) in str(raised.value)
    assert main(["eval", "suite", "--checkpoint", "openclip:tiny-vit-64", "--datasets", str(path),
                 "--out", str(tmp_path / "out"), *COMMON]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
