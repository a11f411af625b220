"""kernels/ ships as `uamt_fast.kernels`; no top-level `kernels` may reach site-packages (Hugging Face owns that name)."""
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_import_as_a_subpackage():
    import uamt_fast.kernels

    assert uamt_fast.kernels.__name__ == "uamt_fast.kernels"
    assert Path(uamt_fast.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_top_level_kernels_import_is_refused():
    out = subprocess.run([sys.executable, "-c", "import kernels"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "uamt_fast.kernels" in out.stderr


def test_pyproject_maps_kernels_under_the_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["uamt_fast.kernels"] == "kernels"
    assert "kernels" not in cfg["packages"]


@pytest.mark.slow
def test_wheel_has_no_top_level_kernels(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True)
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"cannot build a wheel here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("uamt_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"uamt_fast"}, top
    modules = {f"uamt_fast/{p.name}" for p in (ROOT / "uamt_fast").glob("*.py")}
    modules |= {f"uamt_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))  # every module ships (figures.py, launch_config.py...)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
