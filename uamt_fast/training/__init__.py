"""What a training run is made of besides its loop: ``checkpoints`` (safe loading, training state),
``run_folder`` (one process a folder), ``provenance`` (what a run records about itself), ``metrics_log``
(metrics.jsonl and TensorBoard) and ``distributed`` (torchrun). Import the submodule you need: ``distributed``
loads torch.distributed, which a prediction does not need."""
from uamt_fast.training.checkpoints import CheckpointError, load_vnet

__all__ = ["CheckpointError", "load_vnet"]
