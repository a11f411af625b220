"""train.py under torchrun: 2 CPU processes (gloo) started by ``python -m torch.distributed.run``.

Four launches in all, tiny sizes (V-Net n_filters 2, 16^3 crops, one thread a process), so the file stays
near a minute on a shared 2-core machine:

- the rank checks (this file run as a torchrun script, ``_rank_main``): after 2 steps both ranks hold
  bit-identical students and teachers; the 2-rank step equals one single-process step over the union of
  both ranks' crops (ghost batch norm with one group per rank, the mean of the per-rank losses) to float
  rounding; --sync-bn normalises by the statistics of both ranks' crops; a non-finite loss on one rank
  stops every rank at its iteration; a teacher that differs is caught naming the iteration; before the
  evaluation every rank takes rank 0's batch-norm statistics (the saved ones);
- a 2-rank run stopped at iteration 2 and resumed equals the uninterrupted run bit for bit (one run folder,
  one metrics.jsonl without duplicated lines, one eval.json of all test cases, equal to an --eval of the saved
  student.pt); a resume by another world size is one line, exit 2;
- killing one rank ends the run, non-zero, within 60 s (that run trains with --sync-bn, --lr-scale linear);
- ``benchmarks.reproduce --devices`` with fake devices: each child's CUDA_VISIBLE_DEVICES, K per device.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

ENV = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WORLD_SIZE", "RANK", "LOCAL_RANK")} \
    | {"OMP_NUM_THREADS": "1"}
TINY = ["--n-filters", "2", "--patch", "16", "16", "16", "--labeled", "2", "--no-compile", "--device", "cpu",
        "--eval-stride-xy", "16", "--eval-stride-z", "16", "--threads", "1", "--dist-timeout", "60"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, n: int = 2, timeout: float = 120, **kw):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(free_port()), *map(str, args)]
    return subprocess.run(command, cwd=kw.pop("cwd", ROOT), capture_output=True, text=True, timeout=timeout, env=ENV,
                          check=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from uamt_fast import data

    root = tmp_path_factory.mktemp("ddp_la")
    data.write_synthetic_la(root, n_train=5, n_test=3, shape=(24, 24, 16), seed=3)
    return root


# ----------------------------------------------------------------------------- checks inside the ranks
def test_ranks_agree_and_a_2_rank_step_is_the_single_process_step_over_both_ranks_crops(root, tmp_path):
    out = tmp_path / "rank_checks.json"
    p = torchrun(__file__, root, out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["identical_across_ranks"] and result["still_flat"] and result["crops_differ"]
    assert result["bn_stats_differed"] and result["bn_stats_shared"]
    # float rounding: the weights moved by ~1e-2 in 2 steps; the two agree to ~1e-5 of that (fp32 sums in
    # another order: one conv backward over 8 crops vs two over 4, averaged by the all-reduce)
    assert result["student_moved"] > 1e-3, result
    # fp32 rounding: the 2-rank step is the single-process step over both ranks' crops (ghost batch norm, one
    # group a rank) as closely as the same single-process maths in another order (one forward per rank's
    # crops) is: ~4e-6 on weights that moved ~9e-3 in 2 steps (batch norm's gradients cancel a lot)
    assert result["student_moved"] > 1e-3, result
    for k in ("student", "teacher"):
        assert result[f"{k}_max_diff"] <= 2 * result[f"{k}_rounding"] + 1e-7, result
        assert result[f"{k}_max_diff"] < 1e-3 * result["student_moved"], result
    # --sync-bn: as one batch norm over both ranks' crops to fp32 rounding (~2e-5 after 16 conv + BN layers on
    # logits of ~1), where per-rank statistics are off by ~1
    assert result["sync_bn_max_diff"] < 1e-4 * result["logits_max"] and result["local_bn_differs"] > 0.1, result
    assert result["sync_bn_2d_max_diff"] < 1e-4 and result["local_bn_2d_differs"] > 1e-2, result
    assert result["nonfinite"] == [[5, 2, 1], [5, 2, 1]]  # (iteration, term, rank) on both ranks
    assert result["mismatch"][0] == result["mismatch"][1] and "teacher weights of rank 1" in result["mismatch"][0]
    assert "iteration 7" in result["mismatch"][0]


def _rank_main(data_root: str, out: str) -> int:
    torch.set_num_threads(1)
    from torch import distributed as dist

    from uamt_fast import train
    import uamt_fast.ops.ema
    from uamt_fast.training import distributed
    from uamt_fast import reference
    from uamt_fast.nets.unet import UNet2D
    from uamt_fast.nets.vnet import VNet

    world = distributed.setup("cpu", 60)
    cfg = train.Config(data=[data_root], n_filters=2, patch=(16, 16, 16), labeled=2, dropout=False, compile=False,
                       device="cpu", eval_stride_xy=16, eval_stride_z=16)
    train.resolve_classes(cfg)
    parts = train.build(cfg, rank=world.rank)
    init = {k: v.clone() for k, v in parts.student.state_dict().items()}
    parts.ddp = distributed.wrap(world, parts)
    batches, teacher_out = [], []  # what this rank saw, for the reference
    next_, teacher_forward = parts.sampler.next, parts.teacher_forward
    parts.sampler.next = lambda: batches.append(next_()) or batches[-1]
    parts.teacher_forward = lambda x: teacher_out.append(teacher_forward(x)) or teacher_out[-1]
    steps = 2
    for i in range(steps):
        train.train_step(parts, i)

    def gather(obj):
        every = [None] * world.size
        dist.all_gather_object(every, obj)
        return every

    params = gather({"student": [p.detach().clone() for p in parts.student.parameters()],
                     "teacher": [p.detach().clone() for p in parts.teacher.parameters()]})
    seen = gather({"batches": batches, "teacher": teacher_out})
    result = {}
    result["identical_across_ranks"] = all(torch.equal(a, b) for k in ("student", "teacher")
                                           for a, b in zip(params[0][k], params[1][k]))
    result["still_flat"] = uamt_fast.ops.ema.flat_parameters(parts.student) is not None
    result["crops_differ"] = not torch.equal(seen[0]["batches"][0][0], seen[1]["batches"][0][0])

    # the reference: one process, both ranks' crops in one batch, ghost batch norm with one group per rank
    # ("ghost"); and, to measure fp32 rounding, the same maths in another order: one forward per rank's crops
    # ("split", what the ranks compute, without the all-reduce)
    def reference_run(order):
        ref, ref_teacher = VNet(num_classes=2, n_filters=2, dropout=False), VNet(num_classes=2, n_filters=2, dropout=False)
        ref.load_state_dict(init)
        ref_teacher.load_state_dict(init)
        opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        for i in range(steps):
            lr, weight, threshold = train.schedule(cfg, i)
            for g in opt.param_groups:
                g["lr"] = lr
            if order == "ghost":
                ref.bn_groups = 2
                logits = ref(torch.cat([seen[r]["batches"][i][0] for r in range(2)])).split(4)
            else:
                logits = [ref(seen[r]["batches"][i][0]) for r in range(2)]
            losses = []
            for r in range(2):
                im, lab = seen[r]["batches"][i]
                passes = seen[r]["teacher"][i].unflatten(0, (cfg.mc_passes + 1, cfg.batch_unlabeled))
                loss, _, _ = train.student_losses(lambda _, rows=logits[r]: rows, im, lab, passes[0], passes[1:],
                                                  torch.tensor(weight), torch.tensor(threshold), n_labeled=2,
                                                  method="uamt", consistency_on="unlabeled", fused_loss=False)
                losses.append(loss)
            opt.zero_grad()
            ((losses[0] + losses[1]) / 2).backward()  # DDP's gradient mean
            opt.step()
            reference.ema_update_(ref_teacher, ref, cfg.ema_decay, step=i)
        return {"student": list(ref.parameters()), "teacher": list(ref_teacher.parameters())}

    def max_diff(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b))

    ghost, split = reference_run("ghost"), reference_run("split")
    mine = params[world.rank]
    for k in ("student", "teacher"):
        result[f"{k}_max_diff"] = max_diff(mine[k], ghost[k])
        result[f"{k}_rounding"] = max_diff(split[k], ghost[k])
    result["student_moved"] = max(float((a - init[k]).abs().max()) for (k, _), a in
                                  zip(parts.student.named_parameters(), mine["student"]))
    # --sync-bn: each rank's forward normalised by the statistics of both ranks' crops
    synced = VNet(num_classes=2, n_filters=2, dropout=False)
    synced.load_state_dict(init)
    distributed.sync_batch_norm_(synced)
    y = gather(synced(seen[world.rank]["batches"][0][0]).detach())
    both = torch.cat([seen[r]["batches"][0][0] for r in range(2)])
    whole = VNet(num_classes=2, n_filters=2, dropout=False)
    whole.load_state_dict(init)
    y_whole = whole(both).detach()
    result["sync_bn_max_diff"] = float((torch.cat(y) - y_whole).abs().max())
    result["logits_max"] = float(y_whole.abs().max())
    distributed.local_batch_norm_(synced)
    result["local_bn_differs"] = float((synced(seen[world.rank]["batches"][0][0]).detach()
                                        - y_whole[4 * world.rank: 4 * world.rank + 4]).abs().max())
    # --sync-bn of the 2D U-Net (--dims 2): the same, on slices
    torch.manual_seed(5)
    unet, slices = UNet2D(num_classes=4, n_filters=2, dropout=False), torch.rand(2, 3, 1, 32, 32)
    slices[1] = 3 * slices[1] + 1  # (the ranks' slices differ in their statistics)
    synced_2d = distributed.sync_batch_norm_(copy.deepcopy(unet))
    y = torch.cat(gather(synced_2d(slices[world.rank]).detach()))
    result["sync_bn_2d_max_diff"] = float((y - unet(slices.flatten(0, 1)).detach()).abs().max())
    result["local_bn_2d_differs"] = float((distributed.local_batch_norm_(synced_2d)(slices[world.rank]).detach()
                                           - y[3 * world.rank: 3 * world.rank + 3]).abs().max())

    # the evaluation's shares: every rank takes rank 0's weights and BN statistics (each rank's last forward
    # moved its own running statistics)
    def buffers():
        return [b.clone() for b in parts.student.buffers() if b.is_floating_point()]

    before = gather(buffers())
    distributed.from_rank0_(world, parts.student)
    after = gather(buffers())
    result["bn_stats_differed"] = not all(torch.equal(a, b) for a, b in zip(*before))
    result["bn_stats_shared"] = all(torch.equal(a, b) for a, b in zip(*after)) and \
        all(torch.equal(a, b) for a, b in zip(before[0], after[0]))

    # a non-finite loss on rank 1 only: every rank learns (iteration, term, rank)
    bad_at = torch.tensor(5 if world.rank == 1 else -1)
    result["nonfinite"] = gather(list(distributed.first_nonfinite(world, bad_at, torch.tensor(2))))
    # a teacher that differs on rank 1: every rank stops, naming the iteration
    if world.rank == 1:
        with torch.no_grad():
            next(parts.teacher.parameters()).view(-1)[0] += 1e-3
    try:
        distributed.check_same_weights(world, {"student": parts.student, "teacher": parts.teacher}, 7)
        message = "no mismatch found"
    except distributed.RankMismatch as e:
        message = str(e)
    result["mismatch"] = gather(message)
    if world.main:
        Path(out).write_text(json.dumps(result))
    # DDP first, as the trainer does: freed after the group is closed, its reducer holds the last reference to
    # the group and destroys it with the GIL held, joining a gloo worker that waits for the GIL (a hang at exit)
    parts.ddp = None
    distributed.close(world)
    return 0


# ----------------------------------------------------------------------------- train.py under torchrun
def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("it_per_s", "train_seconds")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_2_rank_run_resumed_equals_the_uninterrupted_run_with_one_writer(root, tmp_path, capsys):
    flags = ["--data", root, *TINY, "--iterations", "4", "--log-every", "1", "--save-every", "2"]
    t = time.perf_counter()
    whole = torchrun(ROOT / "train.py", *flags, "--out", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "global batch 2 x 4 = 8 crops" in whole.stdout
    part = torchrun(ROOT / "train.py", *flags, "--out", "part", "--stop-at", "2", cwd=tmp_path)
    assert part.returncode == 0, part.stderr[-3000:]
    import train  # a start without torchrun (in this process: no launch) is refused in one line

    assert train.main(["--resume", str(tmp_path / "part"), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained by 2 processes and this start has 1" in err, err
    resumed = torchrun(ROOT / "train.py", "--resume", "part", "--threads", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    print(f"3 launches in {time.perf_counter() - t:.1f} s")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["part", "whole"]  # rank 0 alone made a folder
    for name in ("student.pt", "teacher.pt"):
        a, b = (torch.load(tmp_path / run / name, weights_only=True)["model"] for run in ("whole", "part"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 5  # 4 log lines + the speed line, none twice
    assert metrics(tmp_path / "part") == metrics(tmp_path / "whole")
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["environment"]["distributed"] | {"backend": "gloo"} == {
        "world_size": 2, "backend": "gloo", "global_batch": 8, "batch_per_rank": 4, "lr_scale": "none", "lr": 0.01,
        "lr_effective": 0.01, "sync_bn": False}
    state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["sampler"]["generator"], state["ranks"][1]["sampler"]["generator"])
    evaluation = json.loads((tmp_path / "whole" / "eval.json").read_text())
    assert [c["case"] for c in evaluation["cases"]] == (root / "test.list").read_text().split()  # both ranks' shares
    # each rank's share scored the saved student (rank 0's batch-norm statistics): as an --eval of student.pt does
    assert train.main(["--eval", str(tmp_path / "whole" / "student.pt"), "--threads", "1"]) == 0
    again = json.loads((tmp_path / "whole" / "eval_student.json").read_text())
    assert again["cases"] == evaluation["cases"] and again["mean"] == evaluation["mean"]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _local_rank(pid: int) -> str:
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    return env.get("LOCAL_RANK", "?")


def test_killing_one_rank_ends_the_run_within_60_s(root, tmp_path):
    """(The run trains with --sync-bn and --lr-scale linear until the kill.)"""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(ROOT / "train.py"), "--data", str(root), *TINY, "--iterations", "100000",
               "--log-every", "1", "--out", "run", "--sync-bn", "--lr-scale", "linear"]
    p = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 90
        while not (tmp_path / "run" / "metrics.jsonl").is_file():  # training on both ranks
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.2)
        workers = {_local_rank(w): w for w in _children(p.pid)}
        assert sorted(workers) == ["0", "1"], workers
        rank1 = workers["1"]
        os.kill(rank1, signal.SIGKILL)
        t = time.perf_counter()
        _, err = p.communicate(timeout=60)
        elapsed = time.perf_counter() - t
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 and elapsed < 60
    config = json.loads((tmp_path / "run" / "config.json").read_text())["environment"]["distributed"]
    assert config["sync_bn"] and config["lr_scale"] == "linear" and config["lr_effective"] == 0.02  # 0.01 x 2
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["lr"] == 0.02
    assert "exitcode  : -9" in err and "rank      : 1" in err  # torchrun names the rank that died
    print(f"run ended {elapsed:.1f} s after rank 1 was killed")


# ----------------------------------------------------------------------------- one run per GPU
def test_reproduce_spreads_the_runs_over_the_devices_each_child_seeing_one(tmp_path, monkeypatch, capsys):
    """Fake devices on the CPU: what is checked is each child's environment and how many share a device."""
    import threading

    from benchmarks import reproduce

    seen, lock, running, peak = [], threading.Condition(), {}, {}

    def fake_child(command, stdout, stderr, env, cwd):  # a train.py child: records its env, one of them fails
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            running[gpu] = running.get(gpu, 0) + 1
            peak[gpu] = max(peak.get(gpu, 0), running[gpu])
            seen.append((gpu, command[command.index("--seed") + 1]))
            lock.notify_all()
            # The first 4 children (2 devices x --parallel 2) stay until all 4 run, so the peak does not depend
            # on how fast a loaded machine starts threads (a fixed sleep did); a runner that let fewer run at once
            # leaves them waiting the 10 s out, and the peaks below fail.
            lock.wait_for(lambda: len(seen) > 4 or sum(running.values()) == 4, timeout=10)
        with lock:
            running[gpu] -= 1
        return 1 if command[command.index("--seed") + 1] == str(reproduce.SEED0 + 2) and "bayes-8" in str(command) \
            else 0

    monkeypatch.setattr(reproduce.subprocess, "call", fake_child)
    out = tmp_path / "rep"
    rc = reproduce.main(["--data", str(tmp_path), "--rows", "bayes-8,uamt", "--seeds", "3", "--devices", "3,5",
                         "--parallel", "2", "--out", str(out), "--no-figures"])
    assert rc == 1  # the failed child
    assert len(seen) == 6 and {g for g, _ in seen} == {"3", "5"}
    assert peak == {"3": 2, "5": 2}  # K = --parallel runs on each device at once, never more
    table = (out / "results.md").read_text()
    assert "bayes-8 seed 2 FAILED (exit 1, GPU" in table
    assert "bayes-8 seed 2 (exit 1)" in capsys.readouterr().err
    assert reproduce.main(["--data", str(tmp_path), "--devices", "1,1", "--out", str(out)]) == 2  # one line


if __name__ == "__main__":  # a rank of the first test, started by torch.distributed.run
    sys.exit(_rank_main(*sys.argv[1:]))


def test_closing_the_process_group_ends_its_gloo_threads(tmp_path):
    """After ``distributed.close`` no gloo worker thread is left to outlive the interpreter: DDP imports
    torch.distributed.nn, whose functions keep the WORLD group in their default arguments when imported after
    ``init_process_group``; a worker freeing a collective's tensors during finalization then aborted a rank
    ("terminate called without an active exception")."""
    script = """
import os, torch
from uamt_fast.training import distributed
world = distributed.setup("cpu", 60)
net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
net(torch.ones(1, 2)).sum().backward()
del net  # as the trainer does: DDP first (its reducer, freed with the GIL held, must not free the group)
distributed.close(world)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print("threads", sorted(n for n in names if "gloo" in n))
"""
    env = ENV | {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "threads []" in proc.stdout, proc.stdout
