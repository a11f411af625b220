"""The public ops: input checks, then the fused Triton kernels or the reference math (``uamt_fast.reference``).

- ``consistency``: ``uncertainty_consistency_loss`` (UA-MT's masked consistency loss and its statistics) and
  ``predictive_entropy``, for 2D and 3D tensors of any class count;
- ``ema``: ``ema_update_`` (the teacher as the EMA of the student, one fused update over a flat buffer) and
  ``flatten_parameters_`` / ``flat_parameters``;
- ``scalars``: the scalar arguments of the ops (any real number type; bools refused).
"""
from uamt_fast.ops.consistency import ConsistencyStats, predictive_entropy, uncertainty_consistency_loss
from uamt_fast.ops.ema import ema_update_, flat_parameters, flatten_parameters_

__all__ = ["ConsistencyStats", "ema_update_", "flat_parameters", "flatten_parameters_", "predictive_entropy",
           "uncertainty_consistency_loss"]
