"""What pip installs: kernels/ ships as `uamt_fast.kernels` (no top-level `kernels`: Hugging Face owns that name), every module and the console scripts ship, and the trainer runs from outside the clone."""
import os
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
    modules = {f"uamt_fast/{p.relative_to(ROOT / 'uamt_fast').as_posix()}" for p in (ROOT / "uamt_fast").rglob("*.py")}
    modules |= {f"uamt_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))  # every module ships (train.py, data/, launch_config.py...)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "uamt_fast_train = uamt_fast.train:main" in scripts and "uamt_fast_predict = uamt_fast.predict:main" in scripts
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def readme_install_args() -> list[str]:
    """The arguments after ``pip install`` of the README's install line (its first command block)."""
    import re
    import shlex

    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    command = next(c for line in block.splitlines() for c in re.split(r"&&|;|\|\|", line) if "pip install -e" in c)
    return shlex.split(command)[2:]  # after "pip install"


@pytest.mark.slow
def test_the_readme_install_imports_the_package_from_the_folder_holding_the_clone(tmp_path):
    """A clone named uamt_fast/ in the working directory is a namespace package to Python (it has no
    __init__.py); setuptools' default editable install (a meta-path finder, asked only after the working
    directory) then lost to it: `import uamt_fast` gave an empty module. The README's install puts the source
    on sys.path, where a real package wins over a namespace one."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "uamt_fast"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            (clone / name).write_bytes((ROOT / name).read_bytes())
    # A fresh environment that sees this one's packages (torch, setuptools, pip) as plain paths: this
    # environment's own install of uamt_fast (a .pth) is not processed there.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    inner = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                           text=True, check=True).stdout.strip()
    import site

    Path(inner, "_outer_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    args = readme_install_args()
    assert args[:2] == ["-e", ".[test]"] and "editable_mode=compat" in args, args
    out = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *args],
                         cwd=clone, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    check = "import uamt_fast, uamt_fast.kernels; uamt_fast.ghost_batch_norm_; print(uamt_fast.__file__)"
    out = subprocess.run([python, "-c", check], cwd=tmp_path, capture_output=True, text=True)  # beside the clone
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.strip()) == clone / "uamt_fast" / "__init__.py"
    # the trainer ships in the package: it runs outside the clone, as a module and as the console script
    demo = ["--demo", "--iterations", "2", "--log-every", "1", "--save-every", "2"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it: the reference math

    for command, out_dir in (([python, "-m", "uamt_fast.train"], "run_module"),
                             ([venv / "bin" / "uamt_fast_train"], "run_script")):
        out = subprocess.run([*command, *demo, "--out", str(tmp_path / out_dir)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert (tmp_path / out_dir / "eval.json").is_file()
