"""Vision-language models whose language model is a declared decoder, explained on text-only inputs (Gemma 3,
LLaVA and its variants, Mistral 3, SmolVLM / Idefics 3, ...).

On text the wrapper runs exactly its language model, so its maps must equal those of the text decoder's own
``*ForCausalLM`` with the same weights (a declared, check_adapter-proven family): token, position and
per-layer position maps, both modes. Images, image placeholder tokens and image token types are refused.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import hf_pelrp
from hf_pelrp import AttributionInputError
from hf_pelrp.adapters.vlm_text import TINY_TEXT_ONLY_TOWER
from hf_pelrp.check import tiny_config
from hf_pelrp.heads import head_kind

pytestmark = pytest.mark.usefixtures("single_thread")

#: vision-language type -> (its class, where its language model sits under ``model.``)
CASES = {
    "gemma3": ("Gemma3ForConditionalGeneration", "language_model"),
    "llava": ("LlavaForConditionalGeneration", "language_model"),
    "mistral3": ("Mistral3ForConditionalGeneration", "language_model"),
    "aya_vision": ("AyaVisionForConditionalGeneration", "language_model"),
    "smolvlm": ("SmolVLMForConditionalGeneration", "text_model"),
    "idefics2": ("Idefics2ForConditionalGeneration", "text_model"),
    "fuyu": ("FuyuForCausalLM", "language_model"),
    "kimi_k25": ("Kimi_K25ForConditionalGeneration", "language_model"),  # DeepSeek-V3: latent attention, MoE
    "aria": ("AriaForConditionalGeneration", "language_model"),  # a mixture of experts
    "exaone4_5": ("Exaone4_5_ForConditionalGeneration", "language_model"),  # sliding-window layers
    # interleaved M-RoPE, compared to a Qwen3
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "language_model"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "language_model"),  # compared to a Qwen3-MoE
    # complex rotary and NoPE layers, experts; the whole Llama4ForCausalLM sits in language_model
    "llama4": ("Llama4ForConditionalGeneration", None),
}


def _text_decoder(text_config):
    """The text decoder's own ``*ForCausalLM``; Qwen3-VL's (and Qwen3-VL-MoE's) text model has none: on text its
    interleaved M-RoPE is Qwen3's rotary (every axis has the same position), so a Qwen3 (Qwen3-MoE) with the same
    sizes is the reference."""
    if text_config.model_type not in ("qwen3_vl_text", "qwen3_vl_moe_text"):
        return AutoModelForCausalLM.from_config(text_config)
    moe = text_config.model_type == "qwen3_vl_moe_text"
    moe_fields = (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "decoder_sparse_step",
        "mlp_only_layers",
    )
    fields = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "pad_token_id",
    )
    cls, config_cls = (
        (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig)
        if moe
        else (transformers.Qwen3ForCausalLM, transformers.Qwen3Config)
    )
    return cls(
        config_cls(
            **{f: getattr(text_config, f) for f in fields + (moe_fields if moe else ())},
            # (Qwen3-VL-MoE's router always renormalises its top-k weights)
            **({"experts_implementation": "eager", "norm_topk_prob": True} if moe else {}),
            rope_parameters={"rope_type": "default", "rope_theta": text_config.rope_parameters["rope_theta"]},
            tie_word_embeddings=False,
        )
    )


def _pair(model_type: str):
    """A tiny vision-language model and its text decoder's ``*ForCausalLM`` with the same weights (float64)."""
    class_name, lm = CASES[model_type]
    config = tiny_config(model_type)
    config.get_text_config().initializer_range = 0.15
    # Gemma3ForCausalLM soft-caps its logits, the multimodal head does not: compare without the cap
    config.get_text_config().final_logit_softcapping = None
    torch.manual_seed(0)
    vl = getattr(transformers, class_name)(config).double().eval()
    with torch.no_grad():  # random-init norms are constant: perturb them so the norm rules are exercised
        for name, p in vl.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
    plain = _text_decoder(config.get_text_config()).double().eval()
    if lm is None:
        state = {
            k.removeprefix("language_model."): v
            for k, v in vl.state_dict().items()
            if k.startswith("language_model.")
        }
    else:
        state = {
            ("model." + k.removeprefix(f"model.{lm}.") if k.startswith(f"model.{lm}.") else k): v
            for k, v in vl.state_dict().items()
            if k.startswith(f"model.{lm}.") or k == "lm_head.weight"
        }
    loaded = plain.load_state_dict(state, strict=False)
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if k != "lm_head.weight"]  # (tied where the text config ties)
    return vl, plain


@pytest.mark.parametrize("model_type", sorted(CASES))
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_text_only_maps_equal_the_text_decoder_with_the_same_weights(model_type, mode):
    vl, plain = _pair(model_type)
    assert head_kind(vl) == "causal_lm"
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (2, 7), generator=gen)
    for name in ("image_token_id", "image_token_index"):  # declared with images: a placeholder is not text
        placeholder = getattr(vl.config, name, None)
        if placeholder is not None:
            ids[ids == placeholder] = 3
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ids = ids * mask
    with torch.no_grad():
        torch.testing.assert_close(
            vl(input_ids=ids, attention_mask=mask).logits,
            plain(input_ids=ids, attention_mask=mask).logits,
            rtol=0,
            atol=1e-10,
        )
    got = hf_pelrp.attribute(vl, ids, attention_mask=mask, mode=mode)
    want = hf_pelrp.attribute(plain, ids, attention_mask=mask, mode=mode, target=got.target)
    scale = float(want.token.abs().max())
    assert scale > 0
    for name in ("token", "position", "position_by_layer"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-9 * scale)
    if mode == "attnlrp":
        assert float(got.position.abs().max()) > 1e-6 * scale  # the positions carry relevance


def test_images_and_placeholders_are_refused():
    """A wrapper explained on text only (Video-LLaVA) refuses images by name; LLaVA (explained with images)
    refuses placeholders without an image, and images that do not fit."""
    config = tiny_config("video_llava")
    config.image_token_id = 5
    torch.manual_seed(0)
    model = transformers.VideoLlavaForConditionalGeneration(config).double().eval()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with pytest.raises(AttributionInputError, match="text-only.*pixel_values"):
        hf_pelrp.attribute(model, ids, pixel_values=torch.zeros(1, 3, 28, 28, dtype=torch.float64))
    with pytest.raises(AttributionInputError, match="text-only.*image_sizes"):
        hf_pelrp.attribute(model, ids, image_sizes=torch.tensor([[28, 28]]))
    with pytest.raises(AttributionInputError, match="image placeholder token 5"):
        hf_pelrp.attribute(model, torch.tensor([[4, 5, 15, 16]]))
    config = tiny_config("llava")
    config.image_token_id = 5
    llava = transformers.LlavaForConditionalGeneration(config).double().eval()
    with pytest.raises(AttributionInputError, match="takes 16x16"):
        hf_pelrp.attribute(llava, ids, pixel_values=torch.zeros(1, 3, 28, 28, dtype=torch.float64))
    with pytest.raises(AttributionInputError, match="0 image placeholder"):
        hf_pelrp.attribute(llava, ids, pixel_values=torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(AttributionInputError, match="image_sizes"):
        hf_pelrp.attribute(llava, ids, image_sizes=torch.tensor([[28, 28]]))
    with pytest.raises(AttributionInputError, match="no pixel_values were given"):
        hf_pelrp.attribute(llava, torch.tensor([[4, 5, 15, 16]]))


def test_llama4_refuses_temperature_tuning_set_in_its_text_config():
    from hf_pelrp import UnsupportedModelError

    config = tiny_config("llama4")
    config.text_config.attn_temperature_tuning = True
    model = transformers.Llama4ForConditionalGeneration(config).double().eval()
    with pytest.raises(UnsupportedModelError, match="attn_temperature_tuning"):
        hf_pelrp.attribute(model, torch.tensor([[4, 8, 15, 16]]))


def test_gemma3_refuses_image_token_types_and_accepts_zero_ones():
    config = tiny_config("gemma3")
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).double().eval()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    types = torch.zeros_like(ids)
    plain = hf_pelrp.attribute(model, ids)
    zeros = hf_pelrp.attribute(model, ids, token_type_ids=types)
    torch.testing.assert_close(zeros.token, plain.token, rtol=0, atol=0)
    types[0, 2] = 1
    with pytest.raises(AttributionInputError, match="token_type_ids mark image tokens"):
        hf_pelrp.attribute(model, ids, token_type_ids=types)


@pytest.mark.slow
def test_real_weights_llava_around_smollm2_explains_paris_as_smollm2():
    """Real-weight smoke test: a LLaVA whose language model is the real SmolLM2-135M-Instruct (the offline
    checkpoint; a tiny random CLIP tower that never runs) explains "The capital of France is" -> " Paris" with
    SmolLM2's own maps."""
    from hf_pelrp.assets import load_smollm2

    smol, tok = load_smollm2(dtype=torch.float32)
    config = transformers.LlavaConfig(
        text_config=smol.config.to_dict(),
        vision_config={"model_type": "clip_vision_model", **TINY_TEXT_ONLY_TOWER},
        image_token_id=smol.config.vocab_size + 1,  # no placeholder in the tokenizer's range
    )
    torch.manual_seed(0)
    llava = transformers.LlavaForConditionalGeneration(config).eval()
    loaded = llava.model.language_model.load_state_dict(smol.model.state_dict())
    assert not loaded.missing_keys and not loaded.unexpected_keys
    llava.lm_head.load_state_dict(smol.lm_head.state_dict())
    encoded = tok("The capital of France is", return_tensors="pt")
    got = hf_pelrp.attribute(llava, **encoded)
    want = hf_pelrp.attribute(smol, **encoded)
    assert tok.decode([int(got.target[0])]) == " Paris"
    scale = float(want.token.abs().max())
    for name in ("token", "position", "position_by_layer"):
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), rtol=0, atol=1e-6 * scale
        )  # measured: identical
    assert float(got.position.abs().sum()) > 0
