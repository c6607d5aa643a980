"""More rotary decoders whose parts hf_pelrp already covers: declared explicitly (no inference at run time),
each proven by check_adapter like every registered type.

- ``ministral``, ``seed_oss``, ``olmo3``: the LLaMA layout under their own class names (OLMo 3: OLMo 2's
  post-norms and whole-projection q / k RMSNorms, one rotary embedding per layer type).
- ``glm``, ``glm4``: partial rotary (``partial_rotary_factor`` 0.5) on interleaved pairs with a ``cos`` repeated
  in place (the LLaMA layout's width, as for Cohere), a fused ``gate_up_proj`` (its second half is the up
  projection: uniform rule on ``act(gate) * up``); GLM-4 adds post-attention and post-MLP RMSNorms.
- ``persimmon``: partial rotary, LayerNorm (also on q and k per head), squared-ReLU MLP without a gate.
- ``nemotron``: partial rotary, ``LayerNorm1P`` = ``(x - mean) / std * (1 + w) + b``
  (:func:`~hf_pelrp.adapters.infer.layer_norm_one_plus`, identity rule, checked against the module's output at
  every call), squared-ReLU MLP without a gate.
- ``exaone4``, ``cohere2``: sliding-window layers rotate, the global layers do not (NoPE): ``Rotary(applies=)``
  gives the global layers no leaf, so their position relevance is exactly 0 and their q, k keep the full
  AttnLRP factor (method.md 2, "Rotary variants"). The tiny instances hold one layer of each kind.
- ``apertus``: the LLaMA layout with an ungated MLP whose activation is xIELU (``XIELUActivation``: element-wise,
  with two learned scalars): the identity rule ``R_x = R_y`` (AttnLRP Prop. 3.4) holds for any element-wise
  activation, its scalars are constants of the backward pass (:func:`xielu_rules`, float64 reference in
  ``tests/test_rotary_decoders.py``). At exactly ``x = 0`` xIELU gives ``-1e-6 * alpha_n`` rather than 0: that
  output carries no relevance (the rule's ``f(x) / x`` is 0 there).
- ``codegen``: GPT-J's layout (interleaved partial rotary of width ``rotary_dim / 2``, passed as
  ``(sin, cos)``, parallel blocks, one LayerNorm); token types are embedded with the token table (``segment``).
"""

from __future__ import annotations

from torch import nn

from ..config import LRPConfig
from ..hooks import Activation, HookRule, LeafStore
from ..inputs import TextInputs
from ..positions import Rotary
from .base import Adapter, GatedProduct, register_adapter
from .infer import layer_norm_one_plus
from .llama import llama_like
from .norms import layer_norm

#: explicit head_dim (several of these configs default to 128 or None) and a sliding window of 3 on 6 tokens
_SMALL_HEADS = {"head_dim": 8, "bos_token_id": 1, "eos_token_id": 2}
_SLIDING_AND_GLOBAL = {
    **_SMALL_HEADS,
    "sliding_window": 3,
    "layer_types": ["sliding_attention", "full_attention"],
}


def exaone4_rotates(attention: nn.Module) -> bool:
    """``Exaone4Attention`` rotates q and k without a sliding window or in its sliding-window layers."""
    return attention.sliding_window is None or bool(attention.is_sliding)


def cohere2_rotates(attention: nn.Module) -> bool:
    """``Cohere2Attention`` rotates q and k in its sliding-window layers only."""
    return attention.sliding_window is not None


def xielu_rules(model: nn.Module, config: LRPConfig, store: LeafStore) -> list[tuple[nn.Module, HookRule]]:
    """The identity rule on every ``XIELUActivation`` (an element-wise activation outside the built-in table)."""
    return [(m, Activation()) for m in model.modules() if type(m).__name__ == "XIELUActivation"]


MINISTRAL = register_adapter(
    llama_like(("ministral",), "Ministral", name="ministral", tiny=_SLIDING_AND_GLOBAL)
)
SEED_OSS = register_adapter(llama_like(("seed_oss",), "SeedOss", name="seed_oss", tiny=_SMALL_HEADS))
OLMO3 = register_adapter(llama_like(("olmo3",), "Olmo3", name="olmo3", tiny=_SLIDING_AND_GLOBAL))

_FUSED = (GatedProduct(act="mlp.activation_fn", up="mlp.gate_up_proj", up_channels="second_half"),)
GLM = register_adapter(llama_like(("glm",), "Glm", name="glm", gated=_FUSED, tiny=_SMALL_HEADS))
GLM4 = register_adapter(llama_like(("glm4",), "Glm4", name="glm4", gated=_FUSED, tiny=_SMALL_HEADS))

PERSIMMON = register_adapter(
    llama_like(
        ("persimmon",),
        "Persimmon",
        name="persimmon",
        norms={"LayerNorm": layer_norm},
        gated=(),
        tiny={"qk_layernorm": True},
    )
)
NEMOTRON = register_adapter(
    llama_like(
        ("nemotron",),
        "Nemotron",
        name="nemotron",
        norms={"NemotronLayerNorm1P": layer_norm_one_plus},
        gated=(),
        tiny=_SMALL_HEADS,
    )
)

EXAONE4 = register_adapter(
    llama_like(
        ("exaone4",),
        "Exaone4",
        name="exaone4",
        positions=Rotary(applies=exaone4_rotates),
        tiny=_SLIDING_AND_GLOBAL,
    )
)
COHERE2 = register_adapter(
    llama_like(
        ("cohere2",),
        "Cohere2",
        name="cohere2",
        norms={"Cohere2LayerNorm": layer_norm},
        positions=Rotary(applies=cohere2_rotates),
        heads=("causal_lm",),
        tiny={**_SLIDING_AND_GLOBAL, "logit_scale": 0.25},
    )
)

APERTUS = register_adapter(
    llama_like(
        ("apertus",),
        "Apertus",
        name="apertus",
        modules=("XIELUActivation",),
        gated=(),
        extra_rules=xielu_rules,
        heads=("causal_lm",),
        tiny={**_SMALL_HEADS, "hidden_act": "xielu", "max_position_embeddings": 16384},
    )
)

CODEGEN = register_adapter(
    Adapter(
        model_types=("codegen",),
        name="codegen",
        layers="h",
        attention="attn",
        embeddings={"wte": ("token", "segment")},
        positions=Rotary(names=("sin", "cos"), layout="interleaved"),
        norms={"LayerNorm": layer_norm},
        modules=(
            "CodeGenForCausalLM",
            "CodeGenModel",
            "CodeGenBlock",
            "CodeGenAttention",
            "CodeGenMLP",
            "CodeGenRotaryEmbedding",
        ),
        inputs=TextInputs(
            position_ids="count", max_positions=lambda c: c.n_positions, token_types="vocab_size"
        ),
        heads=("causal_lm",),
        tiny={
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "rotary_dim": 4,
            "vocab_size": 97,
            "n_positions": 64,
            "n_ctx": 64,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
        },
    )
)
