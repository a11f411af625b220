"""Old module paths, kept for one release: ``import uamt_fast.metrics`` still works, warns, and gives the module
at its new place (the same object, so attributes and monkeypatches are shared).

The package moved from flat modules to one subpackage per concern (ops, nets, data, training, evaluation).
Instead of a stub file per old name, one meta-path finder answers the old names listed in ``MOVED``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {f"uamt_fast.{old}": f"uamt_fast.{new}" for old, new in {
    "consistency": "ops.consistency", "ema": "ops.ema", "scalars": "ops.scalars",
    "vnet": "nets.vnet", "ghost_norm": "nets.ghost_norm",
    "formats": "data.formats", "prepare": "data.prepare",
    "checkpoints": "training.checkpoints", "run_folder": "training.run_folder",
    "distributed": "training.distributed", "provenance": "training.provenance",
    "metrics_log": "training.metrics_log",
    "metrics": "evaluation.metrics", "inference": "evaluation.inference", "selection": "evaluation.selection",
}.items()}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of ``MOVED``; loading one warns and returns the module at its new place."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path is kept for one release", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the module at its new place is already executed


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())


__all__ = ["MOVED", "MovedModules", "install"]
