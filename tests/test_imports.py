"""How the tests share code: fixtures in conftest.py, plain helpers in modules such as helpers.py,
never one test module imported by another (an imported fixture shadows conftest's by name, and a
test module's helpers change with its tests)."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_module_under_tests_imports_a_test_module():
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {name}" for name in names
                      if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest"]
    assert found == []
