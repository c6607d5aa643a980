"""More LLaMA-layout decoders of transformers 5.25's causal-LM map (issue 18), declared with
:func:`hf_pelrp.adapters.llama.llama_like` and the mixture-of-experts rules of :mod:`hf_pelrp.adapters.moe`.

- ``minimax_m2``: q / k RMSNorms over all heads together (``MiniMaxM2RMSNorm`` of width ``heads x head_dim``,
  identity rule), partial rotary (``rotary_dim`` / ``partial_rotary_factor``: the 1/2 split on the rotated
  slice only), every block a mixture of experts without shared experts. The router's scores are sigmoids,
  selected with a correction bias that only changes the selection and renormalised over the top-k: routing
  weights are constants in both modes (``routing="sigmoid"``, signal-take-all, as DeepSeek-V3 and GLM-4-MoE),
  so each selected expert's output carries its whole term.
- ``apertus1p5_text``: the text model of Apertus 1.5, Apertus's layout under its own class names (an ungated MLP
  whose xIELU activation, ``XIELUActivation``, gets the identity rule as in ``apertus``; q / k RMSNorms).
"""

from __future__ import annotations

from .base import register_adapter
from .llama import llama_like
from .moe import MixtureOfExperts, _moe_tiny
from .rotary_decoders import xielu_rules

_HEADS = {"head_dim": 8, "bos_token_id": 1, "eos_token_id": 2}

MINIMAX_M2_EXPERTS = MixtureOfExperts(experts="MiniMaxM2Experts", routing="sigmoid")
MINIMAX_M2 = register_adapter(
    llama_like(
        ("minimax_m2",),
        "MiniMaxM2",
        name="minimax_m2",
        modules=("MiniMaxM2SparseMoeBlock", "MiniMaxM2Experts", "MiniMaxM2TopKRouter"),
        gated=(),
        extra_rules=MINIMAX_M2_EXPERTS,
        checks=(MINIMAX_M2_EXPERTS.check,),
        heads=("causal_lm",),
        tiny=_moe_tiny(num_local_experts=4, partial_rotary_factor=0.5, **_HEADS),
    )
)

APERTUS1P5_TEXT = register_adapter(
    llama_like(
        ("apertus1p5_text",),
        "Apertus1p5Text",
        name="apertus1p5_text",
        modules=("XIELUActivation",),
        gated=(),
        extra_rules=xielu_rules,
        heads=("causal_lm",),
        tiny={**_HEADS, "hidden_act": "xielu", "max_position_embeddings": 16384},
    )
)
