"""``predictions.json``: the record of every output ``python -m uamt_fast.predict`` wrote into a folder.

``{"format": RECORD_FORMAT, "runs": [run, ...], "cases": [case, ...]}``: a run per predict (the model file,
its config, the settings, the uamt_fast version and its times), a case entry per case (its input files and
their sha256, its outputs, preprocessing record and ``"run"``, the index of the run that wrote them). A later
predict into the same folder merges its cases in (``merged_record``, written by ``write_record`` after every
case); ``read_record`` reads the record there to merge into, upgrading the one-run format
``uamt_fast.predictions/1``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from uamt_fast import files

RECORD_FORMAT = "uamt_fast.predictions/2"
RECORD_NAME = "predictions.json"


def read_record(out: Path, overwrite: bool, error: type[ValueError] = ValueError) -> dict:
    """``--out``'s predictions.json, to be merged into: ``{"format", "runs": [...], "cases": [...]}`` (each case
    entry names its run by index), an empty one when there is none. A file there that is not such a record
    (or a link) is refused (``error``, one line), unless ``overwrite``: then a new record replaces it."""
    path = out / RECORD_NAME
    empty = {"format": RECORD_FORMAT, "runs": [], "cases": []}
    if not os.path.lexists(path):
        return empty
    try:
        old = files.read_json(path, "predictions record") if not path.is_symlink() else None
    except ValueError:
        old = None
    if isinstance(old, dict) and old.get("format") == "uamt_fast.predictions/1":  # one run a file, before merging
        run = {k: v for k, v in old.items() if k not in ("format", "cases")}
        old = {"format": RECORD_FORMAT, "runs": [run], "cases": [c | {"run": 0} for c in old.get("cases") or []
                                                                   if isinstance(c, dict)]}
    good = isinstance(old, dict) and old.get("format") == RECORD_FORMAT and isinstance(old.get("runs"), list) \
        and isinstance(old.get("cases"), list) and all(
            isinstance(c, dict) and isinstance(c.get("case"), str) and type(c.get("run")) is int
            and 0 <= c["run"] < len(old["runs"]) for c in old["cases"])
    if good:
        return old
    if overwrite:
        return empty
    raise error(f"--out {out}: {RECORD_NAME} there is not a predictions record this version can add to; "
                "pass --overwrite to replace it, or choose another --out")


def merged_record(old: dict, run: dict, cases: list[dict]) -> dict:
    """``old`` with this run's cases added: an old entry of a case predicted again is dropped (its files were
    replaced), runs no entry names any more are dropped, the indices renumbered."""
    again = {c["case"] for c in cases}
    kept = [c for c in old["cases"] if c["case"] not in again]
    used = sorted({c["run"] for c in kept})
    index = {old_index: new_index for new_index, old_index in enumerate(used)}
    return {"format": RECORD_FORMAT, "runs": [old["runs"][i] for i in used] + [run],
            "cases": [c | {"run": index[c["run"]]} for c in kept] + [c | {"run": len(used)} for c in cases]}


def write_record(out: Path, old: dict, run: dict, cases: list[dict]) -> Path:
    """``merged_record(old, run, cases)`` written to ``out/predictions.json`` through ``files.atomic_write_text``
    (strict JSON: ``files.json_safe``); returns the path."""
    path = out / RECORD_NAME
    files.atomic_write_text(path, json.dumps(files.json_safe(merged_record(old, run, cases)), indent=1) + "\n")
    return path


__all__ = ["RECORD_FORMAT", "RECORD_NAME", "merged_record", "read_record", "write_record"]
