"""train.py's log: ``metrics.jsonl`` (the record), and with ``--tensorboard`` the same scalars as TensorBoard events.

Each log line is one JSON object appended to ``<run>/metrics.jsonl``. With TensorBoard on, every number
of that line except ``iteration`` also becomes a scalar of the same name at step ``iteration``, in
``<run>/tensorboard`` (``tensorboard --logdir runs`` shows every run). TensorBoard is optional
(``pip install 'uamt_fast[tensorboard]'``); ``require_tensorboard`` says so in one line before any work.
A resumed run purges the events past its checkpoint, as ``run_folder.drop_metrics_after`` drops the lines.
"""
from __future__ import annotations

import json
from pathlib import Path

from uamt_fast import files

TENSORBOARD_DIR = "tensorboard"  # inside the run folder


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, or an ImportError (one line) naming the optional extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("--tensorboard needs the tensorboard package: pip install 'uamt_fast[tensorboard]' "
                          "(or: pip install tensorboard)") from None
    return SummaryWriter


class MetricsLog:
    """Appends log lines to ``run/metrics.jsonl`` and, if ``tensorboard``, writes their scalars as events.
    ``start``: the iteration a resumed run continues from (events past it are purged: they are logged again)."""

    def __init__(self, run, tensorboard: bool = False, start: int = 0):
        self.path = Path(run) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            purge = start + 1 if start else None  # events after the checkpoint: written again by this run
            events = files.subfolder(run, TENSORBOARD_DIR)  # a real folder of the run's, not a link elsewhere
            self.writer = require_tensorboard()(str(events), purge_step=purge)

    def write(self, line: dict) -> None:
        files.append_line(self.path, json.dumps(line) + "\n")  # never through a link planted there
        if self.writer is not None:
            for key, value in line.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, line["iteration"])
            self.writer.flush()  # a few lines a minute: visible at once, nothing lost to a kill

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["MetricsLog", "require_tensorboard", "TENSORBOARD_DIR"]
