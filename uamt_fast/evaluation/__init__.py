"""Scoring a model: ``metrics`` (Dice, Jaccard, 95HD, ASD exactly as medpy defines them), ``inference`` (the
paper's sliding-window prediction, the one entry point train.py --eval, predict and the figures share, and the
evaluation of test cases) and ``selection`` (which cases a report covers). For ``python -m uamt_fast.predict``:
``uncertainty`` (MC-dropout predictive entropy over the windows), ``geometry`` (a prediction mapped back to the
input's grid) and ``predictions_record`` (the ``predictions.json`` of its output folder)."""
from uamt_fast.evaluation.inference import evaluate, sliding_window_predict
from uamt_fast.evaluation.metrics import labelmap_metrics, summarize

__all__ = ["evaluate", "labelmap_metrics", "sliding_window_predict", "summarize"]
