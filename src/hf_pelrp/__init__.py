"""hf_pelrp: positional-encoding-aware Layer-wise Relevance Propagation for Hugging Face Transformers.

>>> attr = hf_pelrp.attribute(model, input_ids=ids, attention_mask=mask)   # doctest: +SKIP
>>> attr.token, attr.position, attr.relevance, attr.conservation_gap       # doctest: +SKIP
"""

from .adapters import Adapter, adapter_for, register_adapter, supported_model_types
from .attention import LRP_ATTENTION
from .config import LRPConfig
from .engine import LRPContext, attribute, lrp
from .errors import AttributionInputError, AttributionStateError, HfPelrpError, UnsupportedModelError
from .result import Attribution

__version__ = "0.1.0"

__all__ = [
    "LRP_ATTENTION",
    "Adapter",
    "Attribution",
    "AttributionInputError",
    "AttributionStateError",
    "HfPelrpError",
    "LRPConfig",
    "LRPContext",
    "UnsupportedModelError",
    "adapter_for",
    "attribute",
    "lrp",
    "register_adapter",
    "supported_model_types",
]
