"""Decoders whose parts hf_pelrp already covers, declared explicitly (no inference at run time, listed in the
README), each proven by check_adapter like every registered type (issue 18).

- ``helium``: the LLaMA layout under its own class names.
- ``flex_olmo``: OLMo 2's post-norms and whole-projection q / k RMSNorms with a softmax-routed mixture of experts
  in every block (:mod:`hf_pelrp.adapters.moe`: fused experts re-computed under the rules, router weights by the
  uniform rule, CP-LRP: constants).
- ``mellum``: per-head q / k RMSNorms, sliding-window and global layers (both rotate), and blocks that are either
  a softmax-routed mixture of experts (``mlp_layer_types`` "sparse") or a dense gated MLP; the tiny instance
  holds one of each.
- ``granitemoeshared``: GraniteMoE (constant multipliers, a top-k softmax router) plus a shared expert
  ``output_linear(act(x W[:I]) * x W[I:])`` with a fused ``input_linear`` whose second half is the up projection:
  the uniform rule at the product (CP-LRP: the gate is a constant).
"""

from __future__ import annotations

from .base import GatedProduct, register_adapter
from .llama import llama_like
from .moe import DENSE_MLP, MixtureOfExperts, _moe_tiny

_HEADS = {"head_dim": 8, "bos_token_id": 1, "eos_token_id": 2}

HELIUM = register_adapter(llama_like(("helium",), "Helium", name="helium", tiny=_HEADS))

FLEX_OLMO_MOE = MixtureOfExperts(experts="FlexOlmoExperts", router="FlexOlmoTopKRouter")
FLEX_OLMO = register_adapter(
    llama_like(
        ("flex_olmo",),
        "FlexOlmo",
        name="flex_olmo",
        modules=("FlexOlmoSparseMoeBlock", "FlexOlmoExperts", "FlexOlmoTopKRouter"),
        gated=(),
        extra_rules=FLEX_OLMO_MOE,
        checks=(FLEX_OLMO_MOE.check,),
        heads=("causal_lm",),
        tiny=_moe_tiny(num_experts=4, norm_topk_prob=False, **_HEADS),
    )
)

MELLUM_MOE = MixtureOfExperts(experts="MellumExperts", router="MellumTopKRouter")
MELLUM = register_adapter(
    llama_like(
        ("mellum",),
        "Mellum",
        name="mellum",
        modules=("MellumSparseMoeBlock", "MellumExperts", "MellumTopKRouter"),
        gated=(DENSE_MLP,),
        extra_rules=MELLUM_MOE,
        checks=(MELLUM_MOE.check,),
        heads=("causal_lm",),
        tiny=_moe_tiny(
            num_experts=4,
            moe_intermediate_size=16,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            mlp_layer_types=["sparse", "dense"],
            **_HEADS,
        ),
    )
)

GRANITEMOESHARED_MOE = MixtureOfExperts(
    experts="GraniteMoeSharedExperts", router="GraniteMoeSharedTopKRouter"
)
GRANITEMOESHARED = register_adapter(
    llama_like(
        ("granitemoeshared",),
        "GraniteMoeShared",
        name="granitemoeshared",
        modules=("GraniteMoeSharedMoE", "GraniteMoeSharedExperts", "GraniteMoeSharedTopKRouter"),
        gated=(
            GatedProduct(
                act="shared_mlp.activation",
                up="shared_mlp.input_linear",
                up_channels="second_half",
                optional=True,
            ),
        ),
        extra_rules=GRANITEMOESHARED_MOE,
        checks=(GRANITEMOESHARED_MOE.check,),
        heads=("causal_lm",),
        tiny=_moe_tiny(
            num_local_experts=4,
            shared_intermediate_size=24,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.125,
            logits_scaling=8.0,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
    )
)
