"""The micro-benchmarks' summary table comes after pytest-benchmark's tables, and is written to a file."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_summary_is_printed_after_pytest_benchmarks_tables_and_written_to_a_file(tmp_path):
    pytest.importorskip("pytest_benchmark")
    summary = tmp_path / "summary.txt"
    # (pytest-benchmark times nothing in a process that inherits an xdist worker's PYTEST_XDIST_* variables)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST")} \
        | {"UAMT_BENCH_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_ema.py", "-k", "foreach_lerp", "-q",
                          "--benchmark-min-rounds=1", "--benchmark-max-time=0.01", "-p", "no:cacheprovider",
                          "--bench-tiny",
                          "--bench-summary", str(summary)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert text.index("uamt_fast micro-benchmarks: summary") > text.rindex("---- benchmark '")
    assert f"this table is also in {summary}" in text
    assert "foreach_lerp" in summary.read_text() and "copy bandwidth" in summary.read_text()
