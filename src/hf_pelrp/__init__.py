"""hf_pelrp: positional-encoding-aware Layer-wise Relevance Propagation for Hugging Face Transformers.

>>> attr = hf_pelrp.attribute(model, input_ids=ids, attention_mask=mask)   # doctest: +SKIP
>>> attr.token, attr.position, attr.relevance, attr.conservation_gap       # doctest: +SKIP
"""

from .adapters import Adapter, adapter_for, register_adapter, supported_model_types
from .attention import LRP_ATTENTION
from .config import LRPConfig
from .engine import LRPContext, attribute, lrp
from .errors import AttributionInputError, AttributionStateError, HfPelrpError, UnsupportedModelError
from .generation import GenerationAttribution, explain_continuation
from .loading import default_config, enable_attribution, from_pretrained
from .pipeline import LRPAttributionPipeline  # importing registers the "lrp-attribution" pipeline
from .result import Attribution

__version__ = "0.1.0"

__all__ = [
    "LRP_ATTENTION",
    "Adapter",
    "Attribution",
    "AttributionInputError",
    "AttributionStateError",
    "GenerationAttribution",
    "HfPelrpError",
    "LRPAttributionPipeline",
    "LRPConfig",
    "LRPContext",
    "UnsupportedModelError",
    "adapter_for",
    "attribute",
    "default_config",
    "enable_attribution",
    "explain_continuation",
    "from_pretrained",
    "lrp",
    "register_adapter",
    "supported_model_types",
]
