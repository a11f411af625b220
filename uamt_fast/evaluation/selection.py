"""Which test cases an evaluation and its panels cover: ids, the first N, or best / median / worst by Dice.

    python train.py --eval runs/a --data /path/to/LA --cases ID1 ID2        # evaluate two cases only
    python train.py --eval runs/a --data /path/to/LA --first 4 --figures figs --figures-cases best worst

``test_ids`` narrows a test.list before anything is read or evaluated; ``check_picks`` refuses a panel pick
that can never match (before any work); ``panel_cases`` turns the picks into cases once the Dice of each is
known. Every refusal is a one-line ValueError naming the flag.
"""
from __future__ import annotations

PICKS = ("best", "median", "worst")  # by the evaluation's Dice; median: the lower middle of an even count


def test_ids(ids, cases=(), first: int = 0, flags=("--cases", "--first")) -> list[str]:
    """The ids of ``ids`` (a test.list) named in ``cases`` (in the order given; all when empty), then the first
    ``first`` of them (0: all). An id that ``ids`` lacks, or one named twice, is refused."""
    ids, cases = [str(i) for i in ids], [str(c) for c in cases]
    if cases:
        known = set(ids)
        unknown = [c for c in cases if c not in known]
        if unknown:
            raise ValueError(f"{flags[0]} {unknown[0]}: not in test.list ({len(ids)} ids: {_some(ids)})")
        twice = next((c for i, c in enumerate(cases) if c in cases[:i]), None)
        if twice is not None:
            raise ValueError(f"{flags[0]} {twice}: named twice")
        ids = cases
    return ids[:first] if first else ids


def check_picks(picks, ids, flag: str = "--figures-cases") -> None:
    """ValueError unless each pick is one of ``ids`` (the cases to be evaluated) or best / median / worst."""
    known = set(map(str, ids))
    for pick in picks:
        if pick not in PICKS and pick not in known:
            raise ValueError(f"{flag} {pick}: neither {' / '.join(PICKS)} nor one of the {len(known)} evaluated "
                             f"test cases ({_some(list(map(str, ids)))}); to draw the first N, give --first N")


def panel_cases(cases, rows, picks) -> list:
    """The cases (``.id``) to draw: ``picks`` (ids, or best / median / worst by the Dice of ``rows``, an
    evaluation's ``[{"case", "dice"}, ...]``), duplicates dropped, in the order picked; every case when
    ``picks`` is empty. ``rows`` may be None when no pick needs the Dice."""
    by_id = {str(c.id): c for c in cases}
    check_picks(picks, by_id)
    if not picks:
        return list(cases)
    ranked = []  # ids by Dice, lowest first (ties by id, so the choice is reproducible)
    if any(p in PICKS for p in picks):
        rows = [r for r in rows if r["case"] in by_id]
        ranked = [r["case"] for r in sorted(rows, key=lambda r: (r["dice"], r["case"]))]
    chosen = {"worst": ranked[:1], "median": ranked[(len(ranked) - 1) // 2:][:1], "best": ranked[-1:]}
    ids = [i for p in picks for i in (chosen[p] if p in PICKS else [p])]
    return [by_id[i] for i in dict.fromkeys(ids)]


def _some(ids: list[str], n: int = 3) -> str:
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "") if ids else "none"


__all__ = ["PICKS", "test_ids", "check_picks", "panel_cases"]
