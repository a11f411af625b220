"""The micro-benchmarks' summary table comes after pytest-benchmark's tables, and is written to a file; the
fused 2D entropy row of benchmarks/gpu_check.sh's CPU dry run (the Triton interpreter) runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_benchmarks(args, interpret: bool = False) -> subprocess.CompletedProcess:
    """``pytest`` of benchmark rows at tiny sizes in a fresh process on the CPU (``interpret``: the fused rows in
    Triton's interpreter, as gpu_check.sh --cpu runs them)."""
    # (pytest-benchmark times nothing in a process that inherits an xdist worker's PYTEST_XDIST_* variables)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST")} \
        | {"UAMT_BENCH_DEVICE": "cpu"} | ({"TRITON_INTERPRET": "1"} if interpret else {})
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-q", "--benchmark-min-rounds=1", "-p",
                           "no:cacheprovider", "--bench-tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_the_summary_is_printed_after_pytest_benchmarks_tables_and_written_to_a_file(tmp_path):
    pytest.importorskip("pytest_benchmark")
    summary = tmp_path / "summary.txt"
    out = run_benchmarks(["benchmarks/bench_ema.py", "-k", "foreach_lerp", "--benchmark-max-time=0.01",
                          "--bench-summary", str(summary)])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert text.index("uamt_fast micro-benchmarks: summary") > text.rindex("---- benchmark '")
    assert f"this table is also in {summary}" in text
    assert "foreach_lerp" in summary.read_text() and "copy bandwidth" in summary.read_text()


@pytest.mark.slow
def test_the_fused_2d_entropy_row_runs_in_the_dry_run():
    """A rank-5 (T, B, C, H, W) input is ambiguous to ``predictive_entropy`` without ``spatial_dims``: the
    benchmark row must say it (it did not, and gpu_check.sh's micro step stopped there)."""
    pytest.importorskip("pytest_benchmark")
    out = run_benchmarks(["benchmarks/bench_uncertainty_loss.py", "-k", "predictive_entropy and fused and 2d",
                          "--benchmark-max-time=0.05"], interpret=True)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
