"""Faithfulness evaluation of attribution methods (method.md section 4): token flipping, patch perturbation
and segmentation-style tests, position flipping (per slot and per rotary layer), token + position deletion,
positional ground-truth tasks and the PE-LRP paper's generate / pruning protocol (docs/positions.md); methods
side by side, data-parallel and resumable.

>>> from hf_pelrp.evaluation import run   # doctest: +SKIP
>>> run("configs/smoke.yaml")            # doctest: +SKIP
"""

from .methods import Explanation, MethodSettings, available_methods, explain, register_method
from .runner import load_config, read_records, run

__all__ = [
    "Explanation",
    "MethodSettings",
    "available_methods",
    "explain",
    "load_config",
    "read_records",
    "register_method",
    "run",
]
