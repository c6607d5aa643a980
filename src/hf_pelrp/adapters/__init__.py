"""Per-architecture adapter declarations; importing this package registers the built-in ones."""

from . import (  # noqa: F401
    albert,
    alibi,
    bart_like,
    beit,
    bert,
    bert_variants,
    biogpt,
    clip,
    cohere,
    deberta,
    deepseek,
    dinov2,
    electra,
    gemma,
    gpt2,
    gpt_bigcode,
    gpt_neox,
    gptj,
    granite,
    granitemoe,
    inline_decoders,
    llama,
    llama_layout,
    modernbert,
    moe,
    more_decoders,
    more_decoders2,
    more_encoders,
    more_moe,
    more_seq2seq,
    more_vision,
    olmo,
    olmo2,
    olmoe,
    opt,
    phi,
    phi3,
    qwen2_vl,
    qwen2_vl_images,  # replaces the text-only Qwen2-VL and Qwen2.5-VL declarations of qwen2_vl
    qwen3,
    rotary_decoders,
    seq2seq,
    smollm3,
    stablelm,
    starcoder2,
    swin,
    vit,
    vlm_aya_vision,  # imports vlm_images, vlm_text; replaces the text-only Aya Vision, Cohere 2 Vision
    vlm_idefics3,  # imports vlm_text first, then replaces its text-only Idefics3 and SmolVLM declarations
    vlm_images,  # imports vlm_text first, then replaces its text-only LLaVA and Gemma 3 declarations
    vlm_llava_next,  # imports vlm_images and vlm_text, then replaces the text-only LLaVA-NeXT declaration
    vlm_text,
    vlm_vipllava,  # imports vlm_images and vlm_text, then replaces the text-only VipLLaVA declaration
    xlm_roberta,
)
from .base import (
    Adapter,
    FunctionalActivationSite,
    GatedProduct,
    adapter_for,
    adapter_for_type,
    refuse_model_type,
    refused_model_types,
    register_adapter,
    supported_model_types,
)
from .infer import describe_adapter  # installs the inference of declarations for types with none
from .refusals import REFUSED  # noqa: F401  (registers the model types refused by name)


def positional_site(model):
    """Where ``model``'s positional tensors enter (:class:`hf_pelrp.positions.PositionalSite`), from its adapter."""
    return adapter_for(model).positional_site(model)


__all__ = [
    "Adapter",
    "FunctionalActivationSite",
    "GatedProduct",
    "adapter_for",
    "adapter_for_type",
    "describe_adapter",
    "positional_site",
    "refuse_model_type",
    "refused_model_types",
    "register_adapter",
    "supported_model_types",
]
