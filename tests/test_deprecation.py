"""The flat module paths of the release before the package was laid out by concern still import, for one
release: each warns once with its new place and is the very module there (attributes and monkeypatches shared)."""
import importlib
import subprocess
import sys

from uamt_fast import deprecation


def test_every_old_path_warns_and_is_the_module_at_its_new_place():
    """In a fresh interpreter (an old path imported earlier in this one would not warn again)."""
    code = ("import importlib, warnings\n"
            "from uamt_fast import deprecation\n"
            "for old, new in deprecation.MOVED.items():\n"
            "    with warnings.catch_warnings(record=True) as seen:\n"
            "        warnings.simplefilter('always')\n"
            "        module = importlib.import_module(old)\n"
            "    assert module is importlib.import_module(new), (old, new)\n"
            "    assert [str(w.message) for w in seen if w.category is DeprecationWarning] == [\n"
            "        f'{old} moved to {new}; the old path is kept for one release'], (old, seen)\n"
            "print(len(deprecation.MOVED))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(deprecation.MOVED)) == "15"


def test_the_documented_paths_import_without_a_warning(recwarn):
    for name in ("uamt_fast.reference", "uamt_fast.evaluation.metrics", "uamt_fast.evaluation.inference",
                 "uamt_fast.training.checkpoints", "uamt_fast.kernels", "uamt_fast.data", "uamt_fast.predict",
                 "uamt_fast.figures", "uamt_fast.train"):
        importlib.import_module(name)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "uamt_fast" in str(w.message)]
