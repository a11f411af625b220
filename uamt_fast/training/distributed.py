"""train.py under ``torchrun``: the process group, one writer, per-rank data, cross-rank checks, sync batch norm.

    torchrun --nproc_per_node 4 train.py --data /path/to/LA          # one node, 4 GPUs (NCCL)
    torchrun --nproc_per_node 2 train.py --demo --device cpu         # wiring check on a CPU (gloo)

Without torchrun (no ``WORLD_SIZE`` in the environment) ``setup`` returns ``SINGLE`` and every helper here
is a no-op that returns its input: a single-process run is exactly what it was before this module.

Under torchrun every rank holds the same student (DistributedDataParallel averages the gradients) and
updates its own teacher from it, so all teachers stay bit-identical (``check_same_weights`` compares a
float64 checksum across ranks at every log line). Each rank draws its own crops, noise and dropout masks
from streams seeded by (seed, rank); rank 0's streams are the single-process ones. Batch norm is per rank
(each rank normalises its own crops, as ghost batch norm normalises each group of one batch) unless
``--sync-bn`` (``sync_batch_norm_``: every ghost group's statistics taken over all ranks). The global batch
is world size x (batch_labeled + batch_unlabeled); ``--lr-scale linear`` multiplies the lr by the world size.

Rank 0 alone owns the run folder (lock, config.json, metrics.jsonl, checkpoints, figures, eval.json); the
other ranks' stdout goes to /dev/null. A checkpoint carries every rank's sampler and RNG states, so
``--resume`` restores every rank, and refuses another world size. Faults end the run: collectives time
out after ``--dist-timeout`` seconds, a lost rank is one line naming the rank that saw it, and torchrun
stops the other workers when one exits.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

if dist.is_available():  # (a torch built without distributed has no torch.distributed.nn)
    # imported before any init_process_group: its functions take ``group=group.WORLD`` as a default argument, evaluated
    # at import. Imported later, as DDP does lazily, those defaults hold the process group for the interpreter's life:
    # destroy_process_group cannot free it, its gloo worker threads outlive ``close``, and a worker dropping a finished
    # collective's tensors once Python is finalizing aborts the process ("terminate called without an active exception")
    import torch.distributed.nn

from uamt_fast.training import checkpoints
from uamt_fast.nets.ghost_norm import GhostBatchNorm2d, GhostBatchNorm3d
from uamt_fast.evaluation.metrics import summarize
from uamt_fast.training.state import Parts


class OtherRankFailed(ValueError):
    """Another rank failed while setting the run up; the message names it and carries its error."""


class RankMismatch(RuntimeError):
    """Ranks disagree on something that must be identical (the teachers' weights)."""


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""  # "" without torchrun
    settled: bool = True  # the set-up agreement (``settle``) is done (or not needed)

    @property
    def enabled(self) -> bool:  # launched by torchrun: collectives exist (also with one process)
        return bool(self.backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def on(self, rank: int) -> str:
        """' on rank r' under torchrun, '' otherwise (for messages)."""
        return f" on rank {rank}" if self.enabled else ""

    def settle(self, value=None, error: str | None = None):
        """The one set-up collective: every rank calls it once, with rank 0's ``value`` (the run folder) or an
        error. Returns rank 0's value (a str under torchrun); raises ``OtherRankFailed`` (naming the rank) if another rank failed."""
        if not self.enabled or self.settled:
            return value
        self.settled = True
        shared = [None] * self.size
        dist.all_gather_object(shared, (error, None if value is None else str(value)))
        failed = [(r, e) for r, (e, _) in enumerate(shared) if e is not None]
        if failed and error is None:
            raise OtherRankFailed(f"rank {failed[0][0]}: {failed[0][1]}")
        return shared[0][1]  # (as a str)


SINGLE = World()


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank from the environment (0 without torchrun), usable before ``setup``."""
    return int(os.environ.get("RANK", "0") or 0)


def setup(device: str, timeout_s: float) -> World:
    """The process group from torchrun's environment: NCCL when this run trains on CUDA, gloo otherwise, every
    collective bounded by ``timeout_s``. Each rank's CUDA device is its LOCAL_RANK; the stdout of ranks > 0 is
    discarded (rank 0 speaks for the run; errors still go to each rank's stderr)."""
    if not launched():
        return SINGLE
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"torchrun: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are "
                             "visible (give --nproc_per_node <= the GPUs of the node)")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=torch.device("cuda", local) if cuda else None)
    if rank:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the process's stdout for its whole life)
    return World(rank, size, local, backend, settled=False)


def close(world: World) -> None:
    """Destroy the process group, so that its gloo worker threads end while Python is alive (see the imports)."""
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """Rank r's seed for its sampler and its noise / dropout streams: ``seed`` itself on rank 0 (the
    single-process streams), a hash of (seed, rank) on the others (independent streams, not seed + r)."""
    if rank == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"uamt_fast:{seed}:{rank}".encode()).digest()[:8], "little") >> 1


def describe(world: World, cfg) -> dict:
    """The global batch and the lr rule (for the log and config.json)."""
    per_rank = cfg.batch_labeled + (cfg.batch_unlabeled if cfg.method != "supervised" else 0)
    factor = lr_factor(world, cfg)
    return {"world_size": world.size, "backend": world.backend, "global_batch": world.size * per_rank,
            "batch_per_rank": per_rank, "lr_scale": cfg.lr_scale, "lr": cfg.lr, "lr_effective": cfg.lr * factor,
            "sync_bn": cfg.sync_bn}


def lr_factor(world: World, cfg) -> float:
    return float(world.size) if cfg.lr_scale == "linear" else 1.0


def summary_line(world: World, cfg) -> str:
    d = describe(world, cfg)
    return (f"torchrun: {d['world_size']} processes ({d['backend']}), global batch {d['world_size']} x "
            f"{d['batch_per_rank']} = {d['global_batch']} crops, lr {cfg.lr:g} "
            + (f"x {d['world_size']} (--lr-scale linear) = {d['lr_effective']:g}" if cfg.lr_scale == "linear"
               else "(--lr-scale none)")
            + (", batch norm synchronised (--sync-bn)" if cfg.sync_bn else ", batch norm per rank"))


# ----------------------------------------------------------------------------- the student in DDP
def wrap(world: World, parts: Parts, sync_bn: bool = False):
    """``parts.student`` in DistributedDataParallel (its parameters stay views of the fused EMA's flat buffer:
    DDP keeps its own gradient buckets and never re-binds a parameter); with ``sync_bn`` the student's and the
    teacher's ghost batch norms take their statistics over all ranks. Returns the DDP module (None without
    torchrun)."""
    if not world.enabled:
        return None
    if sync_bn:
        for model in (parts.student, parts.teacher):
            if model is not None:
                sync_batch_norm_(model)
    ids = [torch.cuda.current_device()] if parts.device.type == "cuda" else None
    # (DDP's default buffer sync: every forward starts from rank 0's running statistics, the ones checkpoints
    # save, so a resumed run continues as an uninterrupted one on every rank)
    return nn.parallel.DistributedDataParallel(parts.student, device_ids=ids)


class SyncGhostBatchNorm:
    """Ghost batch norm whose per-group statistics (training mode) are combined over all ranks: each of the G
    groups is normalised by the mean and variance of that group's crops on every rank. The all-reduce is
    differentiable, so the student's gradients are those of one batch norm over the global batch. Eval mode
    (running statistics) is plain batch norm and needs no other rank. Any spatial rank: mixed into
    ``SyncGhostBatchNorm2d`` (the 2D U-Net) and ``SyncGhostBatchNorm3d`` (the V-Net)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        g = self.groups
        xg = x.unflatten(0, (g, x.shape[0] // g)).float()  # (G, b, C, *spatial)
        dims = (1, *range(3, xg.dim()))
        var, mean = torch.var_mean(xg, dim=dims, correction=0)  # (G, C) each: this rank's statistics
        n = torch.full_like(mean, xg[0].numel() // xg.shape[2])
        # Chan et al.'s pairwise combination, one all-gather (differentiable when the student needs grads):
        # mean = sum n_r m_r / N, var = sum n_r (v_r + (m_r - mean)^2) / N; exact, unlike E[x^2] - mean^2
        local = torch.stack([n, mean, var])  # (3, G, C)
        every = torch.stack(dist.nn.functional.all_gather(local) if torch.is_grad_enabled() else _all_gather(local))
        n_r, m_r, v_r = every.unbind(1)  # (W, G, C) each
        total = n_r.sum(0)
        mean = (n_r * m_r).sum(0) / total
        var = (n_r * (v_r + (m_r - mean) ** 2)).sum(0) / total
        shape = (g, 1, -1) + (1,) * (xg.dim() - 3)
        mean, var = mean.view(shape), var.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n=int(total[0, 0]))
        y = (xg - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view((1, 1, -1) + (1,) * (xg.dim() - 3)) + self.bias.view((1, 1, -1) + (1,) * (xg.dim() - 3))
        return y.flatten(0, 1).to(x.dtype)


class SyncGhostBatchNorm2d(SyncGhostBatchNorm, GhostBatchNorm2d):
    """``SyncGhostBatchNorm`` of ``GhostBatchNorm2d``."""


class SyncGhostBatchNorm3d(SyncGhostBatchNorm, GhostBatchNorm3d):
    """``SyncGhostBatchNorm`` of ``GhostBatchNorm3d``."""


SYNC_OF = {GhostBatchNorm2d: SyncGhostBatchNorm2d, GhostBatchNorm3d: SyncGhostBatchNorm3d}  # (class swaps)


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    every = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(every, t.contiguous())
    return every


def sync_batch_norm_(model: nn.Module) -> nn.Module:
    """Every ghost batch norm of ``model`` takes its statistics over all ranks (class swap: same parameters,
    buffers and state-dict keys)."""
    for m in model.modules():
        if type(m) in SYNC_OF:
            m.__class__ = SYNC_OF[type(m)]
    return model


def local_batch_norm_(model: nn.Module) -> nn.Module:
    """Undo ``sync_batch_norm_`` (before an evaluation or figures that run on one rank only)."""
    local = {sync: ghost for ghost, sync in SYNC_OF.items()}
    for m in model.modules():
        if type(m) in local:
            m.__class__ = local[type(m)]
    return model


# ----------------------------------------------------------------------------- cross-rank checks and averages
def first_nonfinite(world: World, bad_at: torch.Tensor, bad_term: torch.Tensor) -> tuple[int, int, int]:
    """(iteration, term, rank) of the earliest non-finite loss on any rank (iteration -1: none). A host sync;
    under torchrun a collective, so every rank stops at the same iteration with the same message."""
    if not world.enabled:
        return int(bad_at), int(bad_term), 0
    mine = torch.stack([bad_at.double(), bad_term.double()])
    every = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    bad = [(int(t[0]), int(t[1]), r) for r, t in enumerate(every) if int(t[0]) >= 0]
    return min(bad) if bad else (-1, 0, 0)


def mean_over_ranks(world: World, values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the ranks (the log line's metrics); ``values`` itself without torchrun."""
    if not world.enabled:
        return values
    total = values.detach().double().clone()
    dist.all_reduce(total)
    return (total / world.size).to(values.dtype)


def checksum(model: nn.Module) -> torch.Tensor:
    """A cheap fingerprint of the weights: float64 sums of the parameters and of their squares, and a
    position-weighted sum (catches values that moved between tensors). Bit-identical weights give
    bit-identical checksums."""
    p = torch.cat([q.detach().reshape(-1) for q in model.parameters()]).double()
    w = torch.arange(p.numel(), device=p.device, dtype=torch.float64).remainder_(1021).add_(1)
    return torch.stack([p.sum(), (p * p).sum(), (p * w).sum()])


def check_same_weights(world: World, models: dict, iteration: int) -> None:
    """Raise ``RankMismatch`` naming the iteration and the ranks if the ``models`` (name -> module) differ
    between ranks. One all-gather of a few float64 numbers."""
    if not world.enabled:
        return
    names = [k for k, m in models.items() if m is not None]
    mine = torch.cat([checksum(models[k]) for k in names])
    every = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    for r, theirs in enumerate(every[1:], 1):
        if not torch.equal(theirs, every[0]):
            k = next(i for i in range(len(names)) if not torch.equal(theirs[3 * i: 3 * i + 3], every[0][3 * i: 3 * i + 3]))
            raise RankMismatch(f"the {names[k]} weights of rank {r} differ from rank 0's at iteration {iteration} "
                               "(every rank must hold the same student and teacher); stopping")


# ----------------------------------------------------------------------------- checkpoints of every rank
def rank_state(parts: Parts) -> dict:
    """What differs between ranks and decides their futures: the sampler and the RNG streams."""
    state = {"sampler": parts.sampler.state_dict(), "rng_cpu": torch.get_rng_state()}
    if parts.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(parts.device)
    return state


def gather_rank_states(world: World, parts: Parts) -> dict:
    """Every rank's ``rank_state`` (a collective), as the checkpoint keys ``world_size`` and ``ranks``; {}
    without torchrun (a single-process checkpoint is unchanged)."""
    if not world.enabled:
        return {}
    every = [None] * world.size
    dist.all_gather_object(every, rank_state(parts))
    return {"world_size": world.size, "ranks": every}


def check_world_size(world: World, state: dict, path) -> None:
    """--resume refuses another world size (its samplers and streams are per rank): one line."""
    saved = state.get("world_size", 1)
    if saved != world.size:
        how = f"torchrun --nproc_per_node {saved} train.py ..." if saved > 1 else "python train.py ... (no torchrun)"
        raise ValueError(f"--resume {path}: the run was trained by {saved} process{'es' if saved > 1 else ''} and "
                         f"this start has {world.size}; resume it with {how}")


def restore_rank(world: World, parts: Parts, state: dict, path) -> None:
    """This rank's sampler and RNG states from a checkpoint of ``gather_rank_states`` (rank 0's are the
    top-level ones ``checkpoints.restore_training`` already loaded)."""
    if not world.enabled or world.size == 1:
        return
    ranks = state.get("ranks")
    if not isinstance(ranks, list) or len(ranks) <= world.rank or not isinstance(ranks[world.rank], dict):
        raise ValueError(f"--resume {path}: no sampler and RNG state of rank {world.rank} in the checkpoint")
    checkpoints.restore_streams(parts, ranks[world.rank], path, f"rank {world.rank}'s ")


# ----------------------------------------------------------------------------- evaluation split over the ranks
def from_rank0_(world: World, model: nn.Module) -> nn.Module:
    """Every rank takes rank 0's weights and buffers (its batch-norm running statistics: the ones it saves;
    DDP syncs them at the start of each forward, but each rank's last forward moved its own), so every share
    of an evaluation scores the saved model."""
    if world.enabled:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, 0)
    return model


def shard(world: World, cases: list) -> list:
    """This rank's share of the test cases (every size-th, from its rank on)."""
    return cases if not world.enabled else cases[world.rank:: world.size]


def gather_evaluation(world: World, result: dict | None, cases: list) -> dict:
    """One evaluation from the ranks' shares (``result`` None: this rank had no case): the per-case rows in
    the order of ``cases``, the means recomputed over all of them."""
    if not world.enabled:
        return result
    every = [None] * world.size
    dist.all_gather_object(every, [] if result is None else result["cases"])
    rows = {row["case"]: row for part in every for row in part}
    return summarize([rows[str(c.id)] for c in cases])


class NoLog:
    """The metrics log of ranks > 0: rank 0 writes the one metrics.jsonl."""

    def write(self, line: dict) -> None:
        pass

    def close(self) -> None:
        pass


def is_comm_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died, raised or timed out (gloo / NCCL errors)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in ("Gloo", "gloo", "NCCL", "Connection closed",
                                                                    "Connection reset", "timed out"))


def comm_failure_line(world: World, e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return (f"rank {world.rank}: lost the other ranks (one died, raised or stopped answering within "
            f"--dist-timeout; torchrun names the one that failed): {first}")


__all__ = ["World", "SINGLE", "OtherRankFailed", "RankMismatch", "launched", "env_rank", "setup", "close", "rank_seed",
           "describe", "lr_factor", "summary_line", "wrap", "SYNC_OF", "SyncGhostBatchNorm", "SyncGhostBatchNorm2d",
           "SyncGhostBatchNorm3d", "sync_batch_norm_", "local_batch_norm_", "first_nonfinite", "mean_over_ranks",
           "checksum", "check_same_weights", "rank_state", "gather_rank_states", "check_world_size", "restore_rank",
           "from_rank0_", "shard", "gather_evaluation", "NoLog", "is_comm_failure", "comm_failure_line"]
