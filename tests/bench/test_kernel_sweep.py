"""``python -m benchmarks.kernel_sweep --cpu``: the sweep's wiring (launchers' config override, rows,
best config per key, the printed launcher table) at tiny shapes in the Triton interpreter."""
from __future__ import annotations

import ast
import json

import pytest
from uamt_fast.kernels import launch_config

from uamt_fast.ops import consistency

pytestmark = pytest.mark.skipif(not consistency.TRITON_ON_CPU, reason="the --cpu sweep runs in the Triton interpreter")


def test_cpu_sweep_times_every_kernel_and_mix_and_prints_the_table(tmp_path, capsys):
    from benchmarks import kernel_sweep

    out = tmp_path / "sweep.json"
    result = kernel_sweep.main(["--cpu", "--json", str(out), "--budget-s", "600"])
    assert json.loads(out.read_text())["complete"] is True
    assert {(r["kernel"], r["mix"]) for r in result["rows"]} == {
        *((k, m) for k in ("loss_fwd", "entropy") for m in ("fp32", "bf16", "fp16", "trainer")),
        *(("loss_bwd", m) for m in ("fp32", "bf16", "fp16")), ("loss_fwd", "amp"), ("finalize", "fp32"),
    }
    assert {r["key"][2] for r in result["rows"] if r["mix"] == "trainer"} == {"classes_last"}
    assert all(r["median_ms"] > 0 for r in result["rows"])
    # the printed block is the launch_config.TABLE form: literal keys -> LaunchConfig(block=..., num_warps=...)
    (assign,) = ast.parse(result["table_py"]).body
    table = {ast.literal_eval(k): launch_config.LaunchConfig(**{kw.arg: ast.literal_eval(kw.value) for kw in v.keywords})
             for k, v in zip(assign.value.keys, assign.value.values) if v.func.id == "LaunchConfig"}
    assert assign.targets[0].id == "TABLE" and len(table) == len(assign.value.keys) == 11
    for key in table:
        assert key[0] in launch_config.KERNELS and key[2] in launch_config.LAYOUTS and key[5] == "small"
    assert result["table_py"] in capsys.readouterr().out
