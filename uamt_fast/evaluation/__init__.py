"""Scoring a model: ``metrics`` (Dice, Jaccard, 95HD, ASD exactly as medpy defines them), ``inference`` (the
paper's sliding-window prediction and the evaluation of test cases) and ``selection`` (which cases a report
covers)."""
from uamt_fast.evaluation.inference import evaluate, sliding_window_predict
from uamt_fast.evaluation.metrics import labelmap_metrics, summarize

__all__ = ["evaluate", "labelmap_metrics", "sliding_window_predict", "summarize"]
