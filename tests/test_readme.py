"""The README's code runs as printed."""
import os
import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].endswith("python train.py --demo")
    assert first_block[1].endswith("python -m pytest -n auto --dist loadfile")  # a test file per core (pytest-xdist)
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert first_block[1] in ci.splitlines()  # CI runs the README's test command verbatim


def test_readme_2d_example_runs():
    """As a user on a CPU runs it: a fresh process without the Triton interpreter (the kernels have their own tests)."""
    (code,) = re.findall(r"## Use the fused loss.*?```python\n(.*?)```", README, re.S)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert re.search(r"consistency \d+\.\d{4}, voxels kept \d+%", out.stdout), out.stdout
