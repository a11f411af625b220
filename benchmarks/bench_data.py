"""Training-batch pipeline: crops/s of 2 labeled + 2 unlabeled augmented crops (rot90, flip, crop).

- ``released 1 process`` (baseline): the release's DataLoader (``benchmarks/reference_trainer.py``)
  with ``num_workers=0``: every crop opens its case's h5 file, decompresses the whole volume and
  rotates / flips it in numpy before cropping. Its time is the CPU work per batch; with W workers
  on W free cores the release gets at most W times its crops/s.
- ``released 4 workers`` (baseline): the same with the release's 4 worker processes, epochs
  restarted as released, measured as steady throughput over 3 epochs (needs >= 8 CPU cores, so
  not on a small CI machine).
- ``ours cpu`` / ``ours cuda``: ``uamt_fast.data.TwoStreamSampler`` with the volumes resident in
  memory / on the GPU; the crop is tensor slicing of the source box only.

Data: the first 16 ids of train.list (labeled, as in the paper) + the next 4 (unlabeled), real LA
volumes from ``UAMT_LA_ROOT`` (default ../shared/data/LA; a packed copy works too). Crop 112x112x80
(--bench-tiny: 2 + 2 cases, 32x32x32).
"""
from __future__ import annotations

import itertools
import os
import tempfile
import time

import pytest

from benchmarks import measure
from benchmarks.reference_trainer import endless, release_h5_folder, released_loader

PAPER_PATCH = (112, 112, 80)
TINY_PATCH = (32, 32, 32)
BATCH, LABELED_BS = 4, 2


@pytest.fixture(scope="module")
def la_cases(la_root, bench):
    from uamt_fast import data

    n_labeled, n_unlabeled = (2, 2) if bench.tiny else (16, 4)
    ids = data.read_list(la_root, "train")
    if len(ids) < n_labeled + n_unlabeled:
        pytest.skip(f"{la_root}/train.list has {len(ids)} ids; the data rows need {n_labeled + n_unlabeled}")
    cases = data.load_cases(la_root, ids[: n_labeled + n_unlabeled])
    with tempfile.TemporaryDirectory(prefix="uamt_bench_data_") as work:
        h5_dir = release_h5_folder(la_root, cases, work)
        yield {"cases": cases, "n_labeled": n_labeled, "h5_dir": h5_dir}


def _group(bench, la_cases) -> str:
    patch = TINY_PATCH if bench.tiny else PAPER_PATCH
    return f"data batch 2+2 crops {'x'.join(map(str, patch))}, {len(la_cases['cases'])} LA volumes"


def _note(row: dict) -> None:
    if row.get("median_ms"):
        row["crops_per_s"] = BATCH / (row["median_ms"] * 1e-3)
        row["note"] = f"{row['crops_per_s']:.1f} crops/s"


@pytest.mark.parametrize("workers", [0, 4])
def test_released_loader(benchmark, bench, la_cases, workers):
    if workers and (os.cpu_count() or 1) < 8:
        pytest.skip(f"4 loader workers need >= 8 CPU cores to be measured fairly; this machine has {os.cpu_count()}")
    patch = TINY_PATCH if bench.tiny else PAPER_PATCH
    lab = [c.id for c in la_cases["cases"][: la_cases["n_labeled"]]]
    unl = [c.id for c in la_cases["cases"][la_cases["n_labeled"]:]]
    loader = released_loader(la_cases["h5_dir"], lab, unl, patch, BATCH, LABELED_BS, num_workers=workers,
                             pin_memory=bench.cuda)
    provider = f"released {workers} workers" if workers else "released 1 process"
    group = _group(bench, la_cases)
    if not workers:
        batches = endless(loader)
        row = bench.run(benchmark, group=group, provider=provider, fn=lambda: next(batches), arg_sets=[()],
                        bytes_moved=None, baseline=True, host=True, op="data", workers=0)
    else:
        # Steady throughput of the worker pool (prefetching makes single calls meaningless): the
        # first epoch warms up, then 3 epochs (worker restarts included) are timed in one round.
        epochs = 3
        per_epoch = len(loader)
        next(iter(loader))

        def three_epochs():
            for _ in itertools.islice(endless(loader), epochs * per_epoch):
                pass

        t = time.perf_counter()
        benchmark.pedantic(three_epochs, rounds=1, iterations=1)
        per_batch_ms = (time.perf_counter() - t) * 1e3 / (epochs * per_epoch)
        benchmark.group = group
        row = {"group": group, "provider": provider, "baseline": True, "bytes": None, "median_ms": per_batch_ms,
               "p20_ms": None, "p80_ms": None, "calls": epochs * per_epoch, "timer": "perf_counter, 3 epochs",
               "op": "data", "workers": workers}
        bench.add_row(row)
    _note(row)
    benchmark.extra_info.update(crops_per_s=row.get("crops_per_s"))


@pytest.mark.parametrize("where", ["cpu", "cuda"])
def test_sampler(benchmark, bench, la_cases, where):
    from uamt_fast import data

    if where == "cuda" and not bench.cuda:
        pytest.skip("the GPU sampler row needs CUDA")
    patch = TINY_PATCH if bench.tiny else PAPER_PATCH
    n = la_cases["n_labeled"]
    sampler = data.TwoStreamSampler(la_cases["cases"][:n], la_cases["cases"][n:], patch_size=patch,
                                    batch_labeled=LABELED_BS, batch_unlabeled=BATCH - LABELED_BS, seed=0, device=where)
    row = bench.run(benchmark, group=_group(bench, la_cases), provider=f"ours {where}", fn=sampler.next, arg_sets=[()],
                    bytes_moved=None, baseline=False, host=where == "cpu", op="data", device=where)
    _note(row)
    benchmark.extra_info.update(crops_per_s=row.get("crops_per_s"))
    measure.synchronize(bench.device)
