"""`mmssl quickstart --smoke` end to end (the suite's one end-to-end run), and its plan and report.

The smoke run happens once per module, in this process through `mmssl.cli.main`, on one torch
thread (a shared 2-core machine runs one thread far better than two competing ones).
"""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from mmssl.cli import build_parser, main
from mmssl.quickstart import FULL, SMOKE, plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["quickstart", "--out", str(out), "--smoke"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _image_sources(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_smoke_writes_every_report_artefact(smoke):
    html = (smoke / "report.html").read_text()
    for heading in ("1. Results", "2. Training", "3. Example text queries", "4. Confusion matrix",
                    "5. Reproduce each step"):
        assert heading in html
    sources = _image_sources(html)
    assert {"figures/loss.png", "figures/accuracy.png", "figures/confusion_val.png"} <= set(sources)
    # 2 queries x top-5 thumbnails, copied into the folder so the report survives moving it
    thumbnails = [s for s in sources if s.startswith("figures/queries/")]
    assert len(thumbnails) == 2 * 5
    for source in sources:
        assert not Path(source).is_absolute()
        data = (smoke / source).read_bytes()
        assert data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC), source
    assert html.count('<div class="hit">') == 10
    assert "Query: “a red circle”" in html and "Query: “a blue circle”" in html
    assert html.count("<figcaption>") == 3


def test_smoke_metrics_parse_and_agree(smoke):
    summary = json.loads((smoke / "summary.json").read_text())
    val = json.loads((smoke / "eval" / "zeroshot_val.json").read_text())
    heldout = json.loads((smoke / "eval" / "zeroshot_heldout.json").read_text())
    retrieval = json.loads((smoke / "eval" / "retrieval_val.json").read_text())
    assert (val["num_samples"], val["num_classes"]) == (SMOKE.num_val, 48)
    assert (heldout["num_samples"], heldout["num_classes"]) == (SMOKE.num_heldout, 48)
    assert summary["val_acc1"] == val["metrics"]["acc1"]
    assert summary["heldout_acc1"] == heldout["metrics"]["acc1"]
    assert summary["image_retrieval_recall@1"] == retrieval["metrics"]["image_retrieval_recall@1"]
    assert summary["train_steps"] == 2
    records = [json.loads(line) for line in (smoke / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 <= r["val/acc1"] <= 1 for r in records)  # the accuracy curve's points
    html = (smoke / "report.html").read_text()
    assert f"{100 * val['metrics']['acc1']:.1f}%" in html
    for search in sorted((smoke / "search").glob("*.json")):
        assert len(json.loads(search.read_text())["results"]) == 5


def test_report_lists_the_exact_commands_that_ran(smoke):
    steps = plan(smoke, SMOKE)
    script = (smoke / "commands.sh").read_text()
    html = (smoke / "report.html").read_text()
    recorded = json.loads((smoke / "quickstart.json").read_text())["steps"]
    assert [s["command"] for s in recorded] == [s.command for s in steps]
    for step in steps:
        assert step.command in script
        assert step.command.replace("&", "&amp;").replace("'", "&#x27;").replace('"', "&quot;") in html
    assert all(s["seconds"] > 0 for s in recorded)


def test_a_step_rerun_alone_reproduces_its_artefact(smoke, capsys):
    """No private code path: the listed zero-shot command, run by itself, gives the same JSON."""
    step = next(s for s in plan(smoke, SMOKE) if s.name == "zeroshot-heldout")
    before = json.loads((smoke / "eval" / "zeroshot_heldout.json").read_text())
    assert main(shlex.split(step.command)[1:]) == 0
    capsys.readouterr()
    after = json.loads((smoke / "eval" / "zeroshot_heldout.json").read_text())
    assert after["metrics"] == before["metrics"]


def test_every_planned_command_parses():
    parser = build_parser()
    for profile in (FULL, SMOKE):
        for step in plan(Path("qs"), profile):
            args = parser.parse_args(step.argv)
            assert callable(args.func)


def test_refuses_a_non_empty_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["quickstart", "--out", str(tmp_path), "--smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmssl: error:") and "not empty" in err[0]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_torch_is_not_loaded_before_quickstart_sets_the_openmp_wait_policy():
    """OMP_WAIT_POLICY is read when torch's OpenMP runtime loads: building the CLI must not load it."""
    import subprocess
    import sys

    code = "import sys, mmssl.cli; mmssl.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_report_of_a_missing_folder_is_one_line_exit_2(tmp_path, capsys):
    assert main(["report", "--dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0]
