import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mmssl.cli import build_parser, main


def test_unknown_command_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "mmssl", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "COMMAND" in out.stdout


# `eval` made unimportable the way a training-only install lacks it: a finder ahead of every other
# one answers "No module named 'eval'" for the package and its submodules, whatever is on sys.path
WITHOUT_EVAL = """
import sys

class NoEval:
    def find_spec(self, name, path=None, target=None):
        if name == "eval" or name.startswith("eval."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoEval())
"""


def run_without_eval(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_EVAL + code, *argv], capture_output=True, text=True,
                          timeout=120)


def mmssl_without_eval(*argv: str) -> subprocess.CompletedProcess:
    return run_without_eval("from mmssl.cli import main\nsys.exit(main())", *argv)


def test_train_parser_builds_without_the_eval_package():
    code = """
from mmssl.cli import build_parser
args = build_parser(["train"]).parse_args(["train", "--config", "tiny", "train.steps=1"])
assert callable(args.func) and args.config == "tiny"
print(sorted(m for m in sys.modules if m == "eval" or m.startswith("eval.")))
"""
    out = run_without_eval(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_train_help_exits_0_without_the_eval_package():
    out = mmssl_without_eval("train", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: mmssl train") and out.stderr == ""


def test_top_level_help_lists_eval_commands_without_the_eval_package():
    out = mmssl_without_eval("--help")
    assert out.returncode == 0, out.stderr
    for name in ("train", "eval", "index", "serve"):
        assert f"    {name} " in out.stdout


def test_eval_commands_without_the_eval_package_name_it_in_one_line_exit_2():
    for argv in (["eval", "zeroshot", "--data", "x"], ["index", "build"], ["serve", "--help"]):
        out = mmssl_without_eval(*argv)
        assert out.returncode == 2, (argv, out.stderr)
        err = out.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mmssl: error:"), (argv, out.stderr)
        assert f"`mmssl {argv[0]}`" in err[0] and "'eval' package" in err[0], err[0]


def command_modules_imported_by(*argv: str) -> list:
    """The command modules a fresh interpreter has imported after `mmssl ARGV` (a --help: exit 0)."""
    code = """
import sys
from mmssl.cli import COMMANDS, main
try:
    main(sys.argv[1:])
except SystemExit as exit_:
    assert exit_.code == 0, exit_.code
else:
    raise AssertionError("--help did not exit")
print(sorted(c.module for c in COMMANDS if c.module in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_top_level_help_imports_no_command_module():
    assert command_modules_imported_by("--help") == []


def test_a_command_imports_only_its_own_module():
    assert command_modules_imported_by("export", "--help") == ["mmssl.export"]


def test_the_command_table_matches_what_the_modules_register():
    """Same names, order and one-line help whether the modules are imported or only the table is read."""
    assert build_parser().format_help() == build_parser([]).format_help()


def test_nothing_in_mmssl_imports_eval_at_module_level():
    """`mmssl` trains without `eval` (DESIGN.md): the validation hook's in-function imports and those of
    `mmssl finetune` (whose zero-shot head and scoring are eval's) are the only ways in."""
    def imports_eval(node) -> bool:
        if isinstance(node, ast.Import):
            return any(alias.name == "eval" or alias.name.startswith("eval.") for alias in node.names)
        if isinstance(node, ast.ImportFrom):
            return node.level == 0 and (node.module == "eval" or (node.module or "").startswith("eval."))
        return False

    def walk(node, in_function=False):
        for child in ast.iter_child_nodes(node):
            if imports_eval(child):
                yield child.lineno, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                       ast.Lambda)))

    package = Path(__file__).resolve().parents[1] / "mmssl"
    allowed = package / "train" / "validation.py"
    files = sorted(package.rglob("*.py"))
    assert allowed in files
    found = []
    for path in files:
        for lineno, in_function in walk(ast.parse(path.read_text(), filename=str(path))):
            if not (in_function and (path == allowed or path.parent == package / "finetune")):
                found.append(f"{path.relative_to(package.parent)}:{lineno}")
    assert found == []
