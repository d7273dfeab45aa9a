import subprocess
import sys

from mmssl.cli import main


def test_unknown_command_is_one_line_exit_2(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as exit_:
        assert exit_.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "mmssl", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "COMMAND" in out.stdout
