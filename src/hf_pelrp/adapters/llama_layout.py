"""Model types with the LLaMA layout that the inference (:mod:`hf_pelrp.adapters.infer`) explains, declared
explicitly (no inference at run time, listed in the README), each proven by check_adapter.

- ``cwm``, ``ernie4_5``, ``hunyuan_v1_dense``, ``hyperclovax``, ``ministral3``: the LLaMA layout
  under their own class names (RMSNorm, SiLU-gated MLP, rotary; HunYuan: q / k RMSNorms; HyperCLOVA X:
  constant multipliers, as Granite). The inference's probe, which keeps one layer of every kind of the default
  configuration, finds that every layer rotates.
- ``exaone``, ``internlm3``, ``iquestcoder``: transformers builds them with the LLaMA classes themselves.
- ``arcee``: an ungated MLP (``down(relu2(up(x)))``).
- ``jais2``: LayerNorm blocks and an ungated MLP.
- ``vaultgemma``: Gemma's ``(1 + w)`` RMSNorm and GeGLU, final-logit soft-capping by the identity rule
  (:func:`~hf_pelrp.adapters.gemma.final_logit_softcap`).
"""

from __future__ import annotations

from .base import register_adapter
from .gemma import final_logit_softcap
from .llama import llama_like
from .norms import layer_norm, rms_norm_one_plus

_HEADS = {"head_dim": 8, "bos_token_id": 1, "eos_token_id": 2}

for _type, _prefix, _tiny in (
    ("cwm", "Cwm", {"max_position_embeddings": 16384}),
    ("ernie4_5", "Ernie4_5", {}),
    ("hunyuan_v1_dense", "HunYuanDenseV1", {}),
    ("hyperclovax", "HyperCLOVAX", {}),
    ("ministral3", "Ministral3", {"max_position_embeddings": 262144}),
):
    register_adapter(llama_like((_type,), _prefix, name=_type, tiny={**_HEADS, **_tiny}))

LLAMA_CLASSES = register_adapter(
    llama_like(("exaone", "internlm3", "iquestcoder"), "Llama", name="llama classes", tiny=_HEADS)
)
ARCEE = register_adapter(llama_like(("arcee",), "Arcee", name="arcee", gated=(), tiny=_HEADS))
JAIS2 = register_adapter(
    llama_like(("jais2",), "Jais2", name="jais2", norms={"LayerNorm": layer_norm}, gated=(), tiny=_HEADS)
)
VAULTGEMMA = register_adapter(
    llama_like(
        ("vaultgemma",),
        "VaultGemma",
        name="vaultgemma",
        norms={"VaultGemmaRMSNorm": rms_norm_one_plus},
        extra_rules=final_logit_softcap,
        tiny={
            **_HEADS,
            "query_pre_attn_scalar": 8,
            "final_logit_softcapping": 3.0,
            "initializer_range": 0.05,
        },
    )
)
