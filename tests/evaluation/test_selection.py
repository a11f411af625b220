"""uamt_fast.evaluation.selection: the test cases an evaluation and its panels cover."""
import types

import pytest

from uamt_fast.evaluation import selection

IDS = ["a", "b", "c", "d"]


def test_test_ids_by_name_in_the_order_given_then_the_first_n():
    assert selection.test_ids(IDS) == IDS
    assert selection.test_ids(IDS, ["c", "a"]) == ["c", "a"]
    assert selection.test_ids(IDS, first=2) == ["a", "b"]
    assert selection.test_ids(IDS, ["d", "b", "a"], first=2) == ["d", "b"]


@pytest.mark.parametrize("cases, message", [(["x"], "--cases x: not in test.list (4 ids: a, b, c, ...)"),
                                            (["a", "a"], "--cases a: named twice")])
def test_test_ids_refuses_unknown_or_repeated_ids(cases, message):
    with pytest.raises(ValueError) as e:
        selection.test_ids(IDS, cases)
    assert str(e.value) == message


def test_panel_cases_by_id_and_by_dice():
    cases = [types.SimpleNamespace(id=i) for i in IDS]
    rows = [{"case": i, "dice": d} for i, d in zip(IDS, (0.5, 0.9, 0.1, 0.7))]

    def ids(picks):
        return [c.id for c in selection.panel_cases(cases, rows, picks)]

    assert ids([]) == IDS
    assert ids(["best", "median", "worst"]) == ["b", "a", "c"]  # median of 4: the lower middle (0.5)
    assert ids(["d", "best", "b"]) == ["d", "b"]  # each case once, in the order picked
    assert [c.id for c in selection.panel_cases(cases, None, ["c"])] == ["c"]  # ids need no Dice
    with pytest.raises(ValueError, match="--figures-cases e: neither best / median / worst nor one of the 4"):
        selection.panel_cases(cases, rows, ["e"])
