"""Every test that reads the real LA data (the ``la_root`` fixture) carries the ``real_data`` marker, so
``pytest -m "not real_data"`` leaves them all out."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_real_data_test_is_marked():
    unmarked = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and \
                    "la_root" in [a.arg for a in node.args.args]:
                marks = [ast.unparse(d) for d in node.decorator_list]
                if "pytest.mark.real_data" not in marks:
                    unmarked.append(f"{path.relative_to(TESTS)}::{node.name}")
    assert not unmarked, unmarked
