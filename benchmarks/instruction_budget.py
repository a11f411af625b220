"""The loss and entropy kernels' instruction budget, from their sm_90 SASS: no GPU needed.

    python -m benchmarks.instruction_budget                     # this checkout
    python -m benchmarks.instruction_budget --before 2c608e7    # and an earlier commit, side by side

Compiles every loss-forward and entropy variant of ``tests/kernels/test_kernel_structure.py`` (the launch
table's configs, specialised like a runtime launch) with the installed Triton for sm_90, counts the
warp-instructions each voxel costs and prints, per variant, the issue time over the memory time on an
H100 and an H200 with the constants and functions written in that test (``issue_over_memory``):
warp-instructions / (132 SMs x 4 schedulers x 1.98 GHz) against bytes / copy bandwidth (3.0 TB/s,
4.3 TB/s). ``--before REV`` compiles REV's kernels with REV's own variant list (``git archive`` into a
temporary folder) and counts them the same way. ``test_instruction_budget`` holds the same numbers
to <= 0.5 on an H200 at T = 8, C = 2 and <= 0.75 elsewhere, among them T = 8, C = 4 (the 2D ACDC step, bf16
channels_last and fp32 contiguous).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRUCTURE_TESTS = ("tests/kernels/test_kernel_structure.py", "tests/test_kernel_structure.py")  # now, and before
STRUCTURE_TEST = ROOT / STRUCTURE_TESTS[0]


def _budget_module():
    """tests/kernels/test_kernel_structure.py as a module: its constants and counting functions."""
    spec = importlib.util.spec_from_file_location("_kernel_structure", STRUCTURE_TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_tree(tree: Path, test: str = STRUCTURE_TESTS[0]) -> list[dict]:
    """Run ``tree``'s structure-test compile (its own kernels, configs and variants) in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, str(tree / test)], cwd=tree, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"compile of {tree} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report is None:
        raise SystemExit("this Triton install has no bundled ptxas: nothing to count")
    return report


def compile_revision(rev: str) -> list[dict]:
    """``rev``'s kernels (kernels/, uamt_fast/, its structure test) compiled from a ``git archive``."""
    test = next((t for t in STRUCTURE_TESTS if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{rev}:{t}"],
                                                              capture_output=True).returncode == 0), STRUCTURE_TESTS[0])
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "kernels", "uamt_fast", test],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode().strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        (Path(tmp) / "uamt_fast" / "kernels").symlink_to(Path(tmp) / "kernels", target_is_directory=True)
        return compile_tree(Path(tmp), test)


def rows(report: list[dict], budget) -> dict[str, dict]:
    out = {}
    for k in report:
        if k["kernel"] not in ("loss_fwd", "entropy"):
            continue
        out[k["name"]] = {
            "per_warp": budget.dynamic_instructions(k["sass"], k["T"]),
            "per_voxel": budget.warp_instructions_per_voxel(k),
            "bytes": budget.bytes_per_voxel(k),
            "H100": budget.issue_over_memory(k, "H100"),
            "H200": budget.issue_over_memory(k, "H200"),
            "budget": budget.budget(k),
            "config": k["config"],
        }
    return out


def table(after: dict[str, dict], before: dict[str, dict] | None = None) -> str:
    def cell(key, fmt, name):
        a = format(after[name][key], fmt)
        if before is None or name not in before:
            return a
        return f"{format(before[name][key], fmt)} → {a}"

    head = ("| kernel (block, warps) | SASS warp-instructions per warp | per voxel | bytes per voxel | "
            "issue / memory time, H100 | H200 | H200 budget |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name in after:
        config = "{}, {}".format(*after[name]["config"])
        if before is not None and name in before and before[name]["config"] != after[name]["config"]:
            config = "{}, {} → ".format(*before[name]["config"]) + config
        lines.append(f"| {name} ({config}) | {cell('per_warp', ',', name)} | {cell('per_voxel', '.2f', name)} | "
                     f"{after[name]['bytes']} | {cell('H100', '.2f', name)} | {cell('H200', '.2f', name)} | "
                     f"<= {after[name]['budget']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", metavar="REV", help="also count this git revision's kernels (before -> after)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    budget = _budget_module()
    import triton

    after = rows(compile_tree(ROOT), budget)
    before = rows(compile_revision(args.before), budget) if args.before else None
    print(f"sm_90 SASS, Triton {triton.__version__}; issue rate {budget.SMS} SMs x {budget.SCHEDULERS_PER_SM} "
          f"schedulers x {budget.CLOCK_HZ / 1e9:.2f} GHz; copy bandwidth H100 {budget.COPY_BANDWIDTH['H100'] / 1e12} "
          f"TB/s, H200 {budget.COPY_BANDWIDTH['H200'] / 1e12} TB/s" + (f"; before = {args.before}" if before else ""))
    print(table(after, before))
    result = {"after": after, "before": before, "before_rev": args.before, "triton": triton.__version__}
    if args.json:
        from uamt_fast import files

        files.atomic_write_text(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
