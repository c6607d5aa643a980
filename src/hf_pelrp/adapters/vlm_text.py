"""Vision-language models whose language model is a declared decoder, explained on text-only inputs
(``gemma3``: ``Gemma3ForConditionalGeneration``, ``Gemma3ForSequenceClassification``).

The language model of Gemma 3's multimodal checkpoints (4B, 12B, 27B) is the ``gemma3_text`` decoder
(:mod:`hf_pelrp.adapters.gemma`): ``(1 + w)`` RMSNorms, per-head q / k norms, GeGLU MLPs, sliding-window and
global layers with their own rotary tables. (The multimodal head does not soft-cap its logits, even where
the text config sets ``final_logit_softcapping``: only ``Gemma3ForCausalLM`` does.) Wrapped in ``Gemma3Model`` it
reads its input embeddings from ``language_model.embed_tokens`` and runs exactly the text decoder when no image
is given, so the rules and leaves are the text decoder's, one level down.

Images are refused (:class:`~hf_pelrp.adapters.qwen2_vl.TextOnlyInputs`): the SigLIP vision tower and the
multimodal projector have no declared rules, and image placeholder tokens (``config.image_token_id``) in the
text are refused too. The vision classes are accepted by the declaration only because the inputs check makes
sure that they never run. ``token_type_ids`` (which mark image tokens for the bidirectional image mask) are
refused as well: on text they carry nothing, and a nonzero one would change the mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import AttributionInputError, UnsupportedModelError
from ..heads import CAUSAL_LM, SEQUENCE_CLASSIFICATION, register_head_class
from ..inputs import Prepared, scaled_rotary_limit
from ..positions import Rotary
from .base import _REGISTRY, Adapter, register_adapter
from .gemma import _TINY_ALTERNATING
from .llama import TINY_DECODER, llama_like
from .moe import DENSE_MLP, MixtureOfExperts, _moe_tiny
from .norms import rms_norm_one_plus
from .qwen2_vl import TextOnlyInputs

#: SigLIP's vision tower and Gemma 3's projector: never run (images are refused)
_SIGLIP_CLASSES = (
    "SiglipVisionModel",
    "SiglipVisionEmbeddings",
    "SiglipEncoder",
    "SiglipEncoderLayer",
    "SiglipAttention",
    "SiglipMLP",
    "SiglipMultiheadAttentionPoolingHead",
)
_SIGLIP = (
    *_SIGLIP_CLASSES,
    "Gemma3MultiModalProjector",
    "GELUTanh",
    "LayerNorm",
    "Conv2d",
    "AvgPool2d",
    "MultiheadAttention",
    "NonDynamicallyQuantizableLinear",
)


@dataclasses.dataclass(frozen=True)
class Gemma3TextOnlyInputs(TextOnlyInputs):
    """Text-only inputs of Gemma 3's multimodal models: also refuses ``token_type_ids`` marking image tokens."""

    placeholders: tuple[str, ...] = ("image_token_id",)

    def validate(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Prepared:
        types = inputs.get("token_type_ids")
        if types is not None and bool((torch.as_tensor(types) != 0).any()):
            raise AttributionInputError(
                f"token_type_ids mark image tokens, but {type(model).__name__} is explained on text-only inputs "
                "(hf_pelrp has no rules for its vision tower). Leave token_type_ids out for text."
            )
        inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
        return super().validate(model, inputs)


def _text_limit(config: Any) -> int | None:
    return scaled_rotary_limit(config.get_text_config())


#: the tiny vision tower of check_adapter's instances (it never runs: images are refused)
TINY_TEXT_ONLY_TOWER = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
}

register_head_class("gemma3", "Gemma3ForConditionalGeneration", CAUSAL_LM)
_TEXT = {k: v for k, v in TINY_DECODER.items() if k != "num_labels"}

GEMMA3 = register_adapter(
    dataclasses.replace(
        llama_like(
            ("gemma3",),
            "Gemma3",
            norms={"Gemma3RMSNorm": rms_norm_one_plus},
            modules=(
                "Gemma3ForConditionalGeneration",
                "Gemma3TextModel",
                "Gemma3TextScaledWordEmbedding",
                *_SIGLIP,
            ),
            heads=(CAUSAL_LM, SEQUENCE_CLASSIFICATION),
            inputs=Gemma3TextOnlyInputs(position_ids="count", max_positions=_text_limit),
            name="gemma3",
        ),
        layers="language_model.layers",
        embeddings={"language_model.embed_tokens": ("token",)},
        # the vision tower's position table: never runs (images are refused)
        constants=("vision_tower.embeddings.position_embedding",),
        tiny={
            # final_logit_softcapping set on purpose: Gemma3ForConditionalGeneration does not apply it
            # (transformers 5.25 soft-caps only in Gemma3ForCausalLM), so no rule must be attached for it
            "text_config": {**_TEXT, **_TINY_ALTERNATING, "final_logit_softcapping": 3.0},
            "vision_config": dict(TINY_TEXT_ONLY_TOWER),
            "mm_tokens_per_image": 4,
            "num_labels": 3,
            # placeholder ids outside the tiny vocabulary, so that random text never holds one
            "image_token_index": 1000,
            "boi_token_index": 1001,
            "eoi_token_index": 1002,
        },
    )
)


# ---- vision-language wrappers of a declared decoder ------------------------------------------------------------

#: placeholder-token attributes of vision-language configs, set outside the tiny vocabulary so that random text
#: never holds one
_PLACEHOLDERS = {
    "image_token_id": 1000,
    "image_token_index": 1000,
    "video_token_id": 1001,
    "video_token_index": 1001,
}


def _on_text_config(limit: Any) -> Any:
    if limit is None:
        return None
    return lambda config: limit(config.get_text_config())


def text_only_vlm(
    model_type: str,
    prefix: str,
    text: Adapter,
    vision: tuple[str, ...],
    *,
    language_model: str = "language_model",
    constants: tuple[str, ...] = (),
    sub_configs: tuple[str, ...] = ("vision_config",),
    placeholders: tuple[str, ...] = ("image_token_id",),
    tiny: dict[str, Any] | None = None,
    head_class: str | None = None,
    text_type: str | None = None,
) -> Adapter:
    """The declaration of a vision-language ``{prefix}ForConditionalGeneration`` whose language model (at
    ``{base}.{language_model}``) is the decoder ``text`` declares, explained on text-only inputs.

    The rules, norms, gated products and positions are the text decoder's, one level down; the wrapper's own
    classes and ``vision`` (its vision tower and projector, which never run: images are refused) are accepted
    by name, ``constants`` names the vision tower's embedding tables. check_adapter proves it on a tiny
    instance (the text decoder's tiny config, a one-layer vision tower).
    """
    head_class = head_class or f"{prefix}ForConditionalGeneration"
    register_head_class(model_type, head_class, CAUSAL_LM)
    if not isinstance(text.positions, Rotary):
        raise ValueError(f"{text.name}: text_only_vlm re-roots rotary decoders only")
    lm = language_model
    inputs = TextOnlyInputs(
        position_ids=text.inputs.position_ids,
        max_positions=_on_text_config(text.inputs.max_positions),
        placeholders=placeholders,
    )
    tiny_text = {k: v for k, v in text.tiny.items() if k != "num_labels"}
    if text_type is not None:  # configs that build their text config from the dict's model_type
        tiny_text["model_type"] = text_type
    # a wrapper hands its experts implementation down to its text config (grouped_mm has no float64 kernel)
    experts = {"experts_implementation": "eager"} if "experts_implementation" in tiny_text else {}
    return dataclasses.replace(
        text,
        model_types=(model_type,),
        name=model_type,
        layers=f"{lm}.{text.layers}",
        embeddings={f"{lm}.{path}": leaves for path, leaves in text.embeddings.items()},
        constants=(*(f"{lm}.{path}" for path in text.constants), *constants),
        modules=(
            *text.modules,
            head_class,
            f"{prefix}Model",
            f"{prefix}MultiModalProjector",
            *vision,
        ),
        inputs=inputs,
        heads=(CAUSAL_LM,),
        tiny={
            "text_config": tiny_text,
            **{name: dict(TINY_TEXT_ONLY_TOWER) for name in sub_configs},
            **{name: _PLACEHOLDERS[name] for name in placeholders},
            **experts,
            **(tiny or {}),
        },
    )


_CLIP = (
    "CLIPVisionModel",
    "CLIPVisionEmbeddings",
    "CLIPEncoder",
    "CLIPEncoderLayer",
    "CLIPAttention",
    "CLIPMLP",
    "QuickGELUActivation",
    "LayerNorm",
    "Conv2d",
)
_SIGLIP_TOWER = (
    *_SIGLIP_CLASSES,
    "MultiheadAttention",
    "NonDynamicallyQuantizableLinear",
    "GELUTanh",
    "LayerNorm",
    "Conv2d",
)
_PIXTRAL = (
    "PixtralVisionModel",
    "PixtralTransformer",
    "PixtralAttentionLayer",
    "PixtralAttention",
    "PixtralMLP",
    "PixtralRMSNorm",
    "PixtralVisionRotaryEmbedding",
    "Conv2d",
)
_TOWER_TABLE = ("vision_tower.embeddings.position_embedding",)

for _type, _prefix, _text, _vision, _extra in (
    ("llava", "Llava", "llama", _CLIP, {}),
    ("llava_next", "LlavaNext", "llama", _CLIP, {}),
    ("vipllava", "VipLlava", "llama", _CLIP, {}),
    (
        "llava_next_video",
        "LlavaNextVideo",
        "llama",
        (*_CLIP, "LlavaNextVideoPooler", "AvgPool2d"),
        {"placeholders": ("image_token_id", "video_token_id")},
    ),
    (
        "llava_onevision",
        "LlavaOnevision",
        "qwen2",
        _SIGLIP_TOWER,
        {"placeholders": ("image_token_id", "video_token_id")},
    ),
    (
        "mistral3",
        "Mistral3",
        "mistral",
        (*_PIXTRAL, "Mistral3PatchMerger", "Mistral3RMSNorm"),
        {"constants": ()},
    ),
    ("aya_vision", "AyaVision", "cohere2", _SIGLIP_TOWER, {}),
    (
        "internvl",
        "InternVL",
        "qwen2",
        (
            "InternVLVisionModel",
            "InternVLVisionEmbeddings",
            "InternVLVisionPatchEmbeddings",
            "InternVLVisionEncoder",
            "InternVLVisionLayer",
            "InternVLVisionAttention",
            "InternVLVisionMLP",
            "LayerNorm",
            "Conv2d",
            "Identity",
            "Dropout",
        ),
        {"constants": ()},
    ),
):
    register_adapter(
        text_only_vlm(
            _type,
            _prefix,
            _REGISTRY[_text],
            _vision,
            **{"constants": _TOWER_TABLE, **_extra},
        )
    )

_IDEFICS3_TOWER = (
    "{p}VisionTransformer",
    "{p}VisionEmbeddings",
    "{p}Encoder",
    "{p}EncoderLayer",
    "{p}VisionAttention",
    "{p}VisionMLP",
    "{p}Connector",
    "{p}SimpleMLP",
    "GELUTanh",
    "LayerNorm",
    "Conv2d",
)
for _type, _prefix, _text, _vision, _extra in (
    (
        "video_llava",
        "VideoLlava",
        "llama",
        _CLIP,
        {
            "constants": (
                "image_tower.embeddings.position_embedding",
                "video_tower.embeddings.position_embedding",
            ),
            "sub_configs": ("vision_config",),
            "placeholders": ("image_token_id", "video_token_id"),
        },
    ),
    ("cohere2_vision", "Cohere2Vision", "cohere2", (*_SIGLIP_TOWER, "SiLU"), {}),
    (
        "lighton_ocr",
        "LightOnOcr",
        "qwen3",
        (*_PIXTRAL, "LightOnOcrPatchMerger", "LightOnOcrRMSNorm", "GELU"),
        {"constants": ()},
    ),
    (
        "smolvlm",
        "SmolVLM",
        "llama",
        tuple(c.format(p="SmolVLM") for c in _IDEFICS3_TOWER),
        {
            "language_model": "text_model",
            "constants": ("vision_model.embeddings.position_embedding",),
            "tiny": {"pad_token_id": 0},
        },
    ),
    (
        "idefics3",
        "Idefics3",
        "llama",
        tuple(c.format(p="Idefics3") for c in _IDEFICS3_TOWER),
        {
            "language_model": "text_model",
            "constants": ("vision_model.embeddings.position_embedding",),
            "tiny": {"pad_token_id": 0},
        },
    ),
):
    register_adapter(
        text_only_vlm(
            _type,
            _prefix,
            _REGISTRY[_text],
            _vision,
            **{"constants": _TOWER_TABLE, **_extra},
        )
    )

_SIGLIP_PLAIN = tuple(c for c in _SIGLIP_TOWER if c != "SiglipMultiheadAttentionPoolingHead")
_GOT_OCR2_TOWER = (  # GOT-OCR 2's SAM-style vision encoder (also under pp_chart2table)
    "GotOcr2VisionEncoder",
    "GotOcr2PatchEmbeddings",
    "GotOcr2VisionLayer",
    "GotOcr2VisionAttention",
    "GotOcr2MLPBlock",
    "GotOcr2VisionNeck",
    "GotOcr2LayerNorm",
    "GELUActivation",
    "LayerNorm",
    "Conv2d",
)
for _type, _prefix, _text, _vision, _extra in (
    (
        "got_ocr2",
        "GotOcr2",
        "qwen2",
        _GOT_OCR2_TOWER,
        {"constants": ()},
    ),
    (
        "idefics2",
        "Idefics2",
        "mistral",
        (
            "Idefics2VisionTransformer",
            "Idefics2VisionEmbeddings",
            "Idefics2Encoder",
            "Idefics2EncoderLayer",
            "Idefics2VisionAttention",
            "Idefics2VisionMLP",
            "Idefics2Connector",
            "Idefics2MLP",
            "Idefics2PerceiverResampler",
            "Idefics2PerceiverLayer",
            "Idefics2PerceiverAttention",
            "Idefics2RMSNorm",
            "GELUTanh",
            "LayerNorm",
            "Conv2d",
        ),
        {
            "language_model": "text_model",
            "constants": ("vision_model.embeddings.position_embedding",),
            "tiny": {"pad_token_id": 0},
        },
    ),
    (
        "deepseek_vl",
        "DeepseekVL",
        "llama",
        (*_SIGLIP_TOWER, "DeepseekVLAligner", "GELU"),
        {"constants": ("vision_model.embeddings.position_embedding",)},
    ),
    (
        "fuyu",
        "Fuyu",
        "persimmon",
        ("Dropout",),
        {"constants": (), "head_class": "FuyuForCausalLM", "sub_configs": ()},
    ),
):
    register_adapter(
        text_only_vlm(
            _type,
            _prefix,
            _REGISTRY[_text],
            _vision,
            **{"constants": _TOWER_TABLE, **_extra},
        )
    )

for _type, _prefix, _text, _vision, _extra in (
    (
        "kimi_k25",
        "Kimi_K25",
        "deepseek_v3",
        (
            "Kimi_K25VisionModel",
            "Kimi_K25VisionPatchEmbed",
            "Kimi_K25VisionPositionEmbeddings",
            "Kimi_K25VisionRotaryEmbedding",
            "Kimi_K25VisionEncoderLayer",
            "Kimi_K25VisionAttention",
            "Kimi_K25VisionMLP",
            "Kimi_K25MultimodalProjection",
            "GELU",
            "GELUTanh",
            "LayerNorm",
            "Conv2d",
        ),
        {"constants": ()},
    ),
    (
        "exaone4_5",
        "Exaone4_5_",
        "exaone4",
        (
            "Exaone4_5_VisionModel",
            "Exaone4_5_PatchEmbed",
            "Exaone4_5_PatchMerger",
            "Exaone4_5_VisionBlock",
            "Exaone4_5_VisionAttention",
            "Exaone4_5_VisionRotaryEmbedding",
            "Exaone4_5_MLP",
            "Exaone4_5_RMSNorm",
            "Sequential",
            "GELU",
            "Conv3d",
        ),
        {"constants": (), "text_type": "exaone4"},
    ),
    (
        "hyperclovax_vision_v2",
        "HyperCLOVAXVisionV2",
        "hyperclovax",
        (
            "Qwen2_5_VisionTransformerPretrainedModel",
            "Qwen2_5_VisionPatchEmbed",
            "Qwen2_5_VLPatchMerger",
            "Qwen2_5_VLVisionBlock",
            "Qwen2_5_VLVisionAttention",
            "Qwen2_5_VLVisionRotaryEmbedding",
            "Qwen2_5_VLMLP",
            "Qwen2_5_VLRMSNorm",
            "Sequential",
            "GELU",
            "Conv3d",
        ),
        {"constants": ()},
    ),
    (
        "video_llama_3",
        "VideoLlama3",
        "qwen2",
        (
            "VideoLlama3VisionModel",
            "VideoLlama3VisionEmbeddings",
            "VideoLlama3VisionEncoder",
            "VideoLlama3VisionEncoderLayer",
            "VideoLlama3VisionAttention",
            "VideoLlama3VisionMLP",
            "VideoLlama3VisionRotaryEmbedding",
            "VideoLlama3Projector",
            "Sequential",
            "GELU",
            "GELUTanh",
            "LayerNorm",
            "Conv2d",
        ),
        {"constants": (), "placeholders": ("image_token_id", "video_token_id")},
    ),
    (
        "qianfan_ocr",
        "QianfanOCR",
        "qwen3",
        (
            "QianfanOCRVisionModel",
            "QianfanOCRVisionEmbeddings",
            "QianfanOCRVisionPatchEmbeddings",
            "QianfanOCRVisionLayer",
            "QianfanOCRVisionAttention",
            "QianfanOCRVisionMLP",
            "GELUActivation",
            "LayerNorm",
            "Conv2d",
            "Identity",
            "Dropout",
        ),
        {"constants": ()},
    ),
    (
        "pp_chart2table",  # GOT-OCR 2 classes under another model type
        "GotOcr2",
        "qwen2",
        _GOT_OCR2_TOWER,
        {"constants": ()},
    ),
    (
        "aria",
        "Aria",
        "aria_text",
        (
            "Idefics3VisionTransformer",
            "Idefics3VisionEmbeddings",
            "Idefics3Encoder",
            "Idefics3EncoderLayer",
            "Idefics3VisionAttention",
            "Idefics3VisionMLP",
            "AriaProjector",
            "AriaProjectorMLP",
            "AriaCrossAttention",
            "MultiheadAttention",
            "NonDynamicallyQuantizableLinear",
            "NewGELUActivation",
            "GELUTanh",
            "LayerNorm",
            "Conv2d",
            "Dropout",
        ),
        {},
    ),
    (
        "ovis2_5",
        "Ovis2_5",
        "qwen3",
        (
            "Ovis2_5VisionModel",
            "Ovis2_5VisionEmbeddings",
            "Ovis2_5VisionEncoderLayer",
            "Ovis2_5VisionAttention",
            "Ovis2_5VisionMLP",
            "Ovis2_5VisionRotaryEmbedding",
            "Ovis2_5VisualEmbeddingProjection",
            "Ovis2_5VisualTokenProjector",
            "GELUTanh",
            "LayerNorm",
            "Conv2d",
        ),
        {},
    ),
):
    register_adapter(
        text_only_vlm(
            _type,
            _prefix,
            _REGISTRY[_text],
            _vision,
            **{"constants": _TOWER_TABLE, **_extra},
        )
    )

# ---- Qwen3-VL: its own text decoder, interleaved M-RoPE merged into one (cos, sin) pair -------------------------

#: Qwen3-VL's text decoder (the Qwen3 layout under Qwen3VLText* names: q / k RMSNorms). Its rotary embedding
#: interleaves the temporal, height and width frequencies into one [B, T, head_dim] (cos, sin) pair, so the
#: per-layer leaves are LLaMA's; on text the three axes carry the same position ids. Not registered on its own:
#: transformers has no head class for ``qwen3_vl_text``.
QWEN3_VL_TEXT = llama_like(
    ("qwen3_vl_text",),
    "Qwen3VLText",
    name="qwen3_vl_text",
    tiny={
        "head_dim": 8,
        # the interleaved sections of the 4 frequencies of a head of 8 channels
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    },
)
_QWEN3_VL_TOWER = (
    "Qwen3VLVisionModel",
    "Qwen3VLVisionPatchEmbed",
    "Qwen3VLVisionRotaryEmbedding",
    "Qwen3VLVisionPatchMerger",
    "Qwen3VLVisionBlock",
    "Qwen3VLVisionAttention",
    "Qwen3VLVisionMLP",
    "GELU",
    "GELUTanh",
    "LayerNorm",
    "Conv3d",
)
_QWEN3_VL_TINY_TOWER = {
    "depth": 1,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_heads": 2,
    "out_hidden_size": 32,
    "deepstack_visual_indexes": [0],
}
register_adapter(
    text_only_vlm(
        "qwen3_vl",
        "Qwen3VL",
        QWEN3_VL_TEXT,
        _QWEN3_VL_TOWER,
        constants=("visual.pos_embed",),
        placeholders=("image_token_id", "video_token_id"),
        tiny={"vision_config": _QWEN3_VL_TINY_TOWER},
    )
)

# ---- Llama 4: the multimodal wrapper of llama4_text ---------------------------------------------------------------


def _no_text_temperature_tuning(model: torch.nn.Module) -> None:
    """Llama 4's refusal of ``attn_temperature_tuning``, read where the wrapper keeps it (its text config)."""
    from .more_moe import no_temperature_tuning

    no_temperature_tuning(type("TextView", (), {"config": model.config.get_text_config()})())


def _text_only_forward_runs(model: torch.nn.Module) -> None:
    """transformers 5.24's Llama4ForConditionalGeneration fails on text-only inputs: refuse it there by name."""
    import importlib.metadata

    from packaging.version import Version

    installed = importlib.metadata.version("transformers")
    if Version(installed) < Version("5.25"):
        raise UnsupportedModelError(
            f"Llama4ForConditionalGeneration does not run on text-only inputs in transformers {installed} (its "
            "forward reads `image_outputs` from an output that has none; fixed in 5.25): upgrade transformers to "
            ">= 5.25, or explain the text decoder alone (Llama4ForCausalLM, model type llama4_text)."
        )


register_adapter(
    dataclasses.replace(
        text_only_vlm(
            "llama4",
            "Llama4",
            _REGISTRY["llama4_text"],
            (
                "Llama4ForCausalLM",
                "Llama4VisionModel",
                "Llama4UnfoldConvolution",
                "Llama4VisionRotaryEmbedding",
                "Llama4VisionEncoder",
                "Llama4VisionEncoderLayer",
                "Llama4VisionAttention",
                "Llama4VisionMLP",
                "Llama4VisionMLP2",
                "Llama4VisionPixelShuffleMLP",
                "GELU",
                "LayerNorm",
                "Unfold",
            ),
            # Llama4ForConditionalGeneration has no `model`: its base is itself, the decoder sits in
            # language_model (a Llama4ForCausalLM) .model
            language_model="language_model",
            constants=(),
            tiny={
                "vision_config": {
                    **TINY_TEXT_ONLY_TOWER,
                    "vision_output_dim": 16,
                    "projector_input_dim": 16,
                    "projector_output_dim": 16,
                }
            },
        ),
        checks=(_text_only_forward_runs, _no_text_temperature_tuning),
    )
)

#: Cosmos 3 Omni: Qwen3-VL's text decoder and vision tower under its own wrapper
register_adapter(
    text_only_vlm(
        "cosmos3_omni",
        "Cosmos3Omni",
        QWEN3_VL_TEXT,
        _QWEN3_VL_TOWER,
        constants=("visual.pos_embed",),
        placeholders=("image_token_id", "video_token_id"),
        text_type="qwen3_vl_text",
        tiny={"vision_config": {"model_type": "qwen3_vl_vision", **_QWEN3_VL_TINY_TOWER}},
    )
)

#: Qwen3-VL-MoE's text decoder: Qwen3-VL's, with Qwen3-MoE's experts and softmax top-k router (re-computed and
#: checked against the modules at every call by MixtureOfExperts)
QWEN3_VL_MOE_EXPERTS = MixtureOfExperts(experts="Qwen3VLMoeTextExperts", router="Qwen3VLMoeTextTopKRouter")
QWEN3_VL_MOE_TEXT = llama_like(
    ("qwen3_vl_moe_text",),
    "Qwen3VLMoeText",
    name="qwen3_vl_moe_text",
    modules=("Qwen3VLMoeTextSparseMoeBlock", "Qwen3VLMoeTextExperts", "Qwen3VLMoeTextTopKRouter"),
    gated=(DENSE_MLP,),
    experts=QWEN3_VL_MOE_EXPERTS,
    tiny=_moe_tiny(
        num_experts=4,
        moe_intermediate_size=16,
        head_dim=8,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    ),
)
register_adapter(
    text_only_vlm(
        "qwen3_vl_moe",
        "Qwen3VLMoe",
        QWEN3_VL_MOE_TEXT,
        (
            "Qwen3VLMoeVisionModel",
            "Qwen3VLMoeVisionPatchEmbed",
            "Qwen3VLMoeVisionRotaryEmbedding",
            "Qwen3VLMoeVisionPatchMerger",
            "Qwen3VLMoeVisionBlock",
            "Qwen3VLMoeVisionAttention",
            "Qwen3VLMoeVisionMLP",
            "GELU",
            "GELUTanh",
            "LayerNorm",
            "Conv3d",
        ),
        constants=("visual.pos_embed",),
        placeholders=("image_token_id", "video_token_id"),
        tiny={
            "vision_config": dict(_QWEN3_VL_TINY_TOWER),
        },
    )
)
