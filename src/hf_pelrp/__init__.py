"""hf_pelrp: positional-encoding-aware Layer-wise Relevance Propagation for Hugging Face Transformers.

>>> attr = hf_pelrp.attribute(model, input_ids=ids, attention_mask=mask)   # doctest: +SKIP
>>> attr.token, attr.position, attr.relevance, attr.conservation_gap       # doctest: +SKIP
"""

from . import card, viz  # hf_pelrp.card.attribution_section(...), hf_pelrp.viz.to_html(...)
from .adapters import Adapter, adapter_for, describe_adapter, register_adapter, supported_model_types
from .attention import LRP_ATTENTION
from .card import add_attribution_section, attribution_section
from .check import AdapterCheckError, check_adapter
from .config import LRPConfig
from .dataset import attribute_dataset, load_dataset_attributions
from .engine import LRPContext, attribute, explain_continuation, lrp
from .errors import (
    AttributionFileError,
    AttributionInputError,
    AttributionStateError,
    HfPelrpError,
    UnsupportedModelError,
)
from .io import save_attribution
from .ledger import ConservationLedger, conservation_ledger
from .loading import default_config, enable_attribution, from_pretrained
from .pipeline import LRPAttributionPipeline  # importing registers the "lrp-attribution" pipeline
from .result import Attribution, GenerationAttribution, Seq2SeqAttribution, load_attribution
from .version import package_version

__version__ = package_version()

__all__ = [
    "LRP_ATTENTION",
    "Adapter",
    "AdapterCheckError",
    "Attribution",
    "AttributionFileError",
    "AttributionInputError",
    "AttributionStateError",
    "ConservationLedger",
    "GenerationAttribution",
    "HfPelrpError",
    "LRPAttributionPipeline",
    "LRPConfig",
    "LRPContext",
    "Seq2SeqAttribution",
    "UnsupportedModelError",
    "adapter_for",
    "add_attribution_section",
    "attribute",
    "attribute_dataset",
    "attribution_section",
    "check_adapter",
    "conservation_ledger",
    "card",
    "default_config",
    "describe_adapter",
    "enable_attribution",
    "explain_continuation",
    "from_pretrained",
    "load_attribution",
    "load_dataset_attributions",
    "lrp",
    "register_adapter",
    "save_attribution",
    "supported_model_types",
    "viz",
]
