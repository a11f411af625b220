"""Shared test set-up.

On a machine without CUDA the Triton kernels run on CPU tensors through the Triton interpreter.
TRITON_INTERPRET must be set before triton is first imported (``@triton.jit`` reads it), so it is
set here, at collection time, before any test module imports ``uamt_fast.kernels``.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", (
        "triton was imported before tests/conftest.py could set TRITON_INTERPRET=1"
    )
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's test command: a worker per core) each worker takes its share of the cores: torch's
# default of a thread per core in every worker would oversubscribe them (OpenMP spin-waits, several times slower).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# The real LA data set (the authors' release layout). CI has it; a fresh clone may not.
LA_ROOT = Path(os.environ.get("UAMT_LA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"))


@pytest.fixture
def la_root() -> Path:
    if not (LA_ROOT / "train.list").is_file():
        pytest.skip(f"real LA data not found at {LA_ROOT} (set UAMT_LA_ROOT to the folder holding train.list)")
    return LA_ROOT


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _on_cpu(mp: pytest.MonkeyPatch):
    """The trainer as a CPU user runs it: the public fused ops take their CPU path (the reference math), not
    the Triton interpreter switched on above (~15 s per loss call at trainer sizes; the kernel tests cover
    the kernels), and one torch thread (on a shared 2-core machine two OpenMP threads measured 5x slower)."""
    import uamt_fast.ops.consistency
    import uamt_fast.ops.ema

    mp.setattr(uamt_fast.ops.consistency, "TRITON_ON_CPU", False)
    mp.setattr(uamt_fast.ops.ema, "TRITON_ON_CPU", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trainer_on_cpu(monkeypatch):
    yield from _on_cpu(monkeypatch)


@pytest.fixture(scope="module")
def trainer_on_cpu_module():
    """``trainer_on_cpu`` for module-scoped fixtures (a trained model shared by a module's tests)."""
    with pytest.MonkeyPatch.context() as mp:
        yield from _on_cpu(mp)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny synthetic LA data set in the release layout: 5 training and 2 test cases of 32x24x16."""
    from uamt_fast import data

    root = tmp_path_factory.mktemp("tiny_la")
    data.write_synthetic_la(root, n_train=5, n_test=2, shape=(32, 24, 16), seed=3)
    return root


# The longest test files (seconds on 2 cores, `--durations=0` summed per file, 2026-12-03), handed out first: with
# `--dist loadfile` a worker takes whole files in collection order, so a long file collected last (training/ sorts
# last) runs alone at the end while the other worker idles. Longest first balances the workers (a file missing
# here only runs in its usual place).
LONGEST_FILES = ("training/test_end_to_end.py",  # 63 s
                 "data/test_own_data.py",  # 54 s
                 "training/test_distributed.py",  # 48 s
                 "training/test_run_safety.py",  # 39 s
                 "training/test_hardening.py",  # 28 s
                 "training/test_acdc_learns.py",  # 25 s
                 "ops/test_uncertainty_loss.py",  # 24 s
                 "bench/test_reproduce.py",  # 21 s
                 "data/test_prepare.py")  # 20 s


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FILES.index(path) if path in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # (stable: each file's tests keep their order)
