"""Model types refused by name, with the reason (rather than a generic "not supported")."""

from __future__ import annotations

from .base import refuse_model_type

_RELATIVE = (
    "it encodes positions as relative attention biases, which hf_pelrp does not explain yet (its positional "
    "maps would be silently empty)."
)

_DISENTANGLED = (
    "its disentangled attention (content-to-position and position-to-content terms of shared relative "
    "embeddings) is computed inline; the position-factor leaves it needs are not implemented yet, so its "
    "positional maps would be silently empty."
)

_STATE_SPACE = (
    "it is a state-space / linear-recurrent model (a selective scan or recurrence over the sequence, no "
    "attention): PE-LRP's rules and positional leaves are defined for attention models, so it is outside the "
    "method."
)

_HYBRID = (
    "it is a hybrid whose {layers} layers are recurrent (state-space, linear-attention or convolutional "
    "recurrences) beside its attention layers; hf_pelrp has no rules for those layers, and explaining only the "
    "attention layers would silently drop the relevance that flows through the others."
)

REFUSED: dict[str, str] = {
    "longt5": _RELATIVE,
    "deberta": _DISENTANGLED,
    "transfo-xl": _RELATIVE,
    "xlnet": _RELATIVE,
    "funnel": _RELATIVE,
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"), _STATE_SPACE),
    **{
        model_type: _HYBRID.format(layers=layers)
        for model_type, layers in (
            ("jamba", "Mamba"),
            ("zamba", "Mamba"),
            ("zamba2", "Mamba-2"),
            ("bamba", "Mamba-2"),
            ("falcon_h1", "Mamba-2"),
            ("granitemoehybrid", "Mamba-2"),
            ("nemotron_h", "Mamba-2"),
            ("lfm2", "short-convolution"),
            ("lfm2_moe", "short-convolution"),
            ("recurrent_gemma", "RG-LRU"),
            ("qwen3_next", "Gated DeltaNet (linear attention)"),
            ("qwen3_5", "Gated DeltaNet (linear attention)"),
            ("kimi_linear", "Kimi Delta Attention (linear attention)"),
            ("minimax", "lightning (linear) attention"),
        )
    },
    "fnet": "it mixes tokens with a Fourier transform instead of attention (no softmax attention): outside the method.",
    "nystromformer": "its attention is a Nystrom approximation (landmark softmaxes joined by an iterative pseudo-inverse), not softmax attention: outside the method.",
    "yoso": "its attention is LSH-based Bernoulli sampling (no softmax over scores): outside the method.",
    "mra": "its attention is a multi-resolution block approximation (no softmax attention over the full scores): outside the method.",
    "squeezebert": "its attention and feed-forward projections are grouped 1-D convolutions computed inline, with no declaration of which channels mix; not covered.",
    "convbert": "half of its heads are span-based dynamic convolutions whose kernels are generated from the input (a softmax over kernel weights, not over positions): no rule for them.",
    "canine": "it embeds characters through hash-bucket tables and mixes them with a strided downsampling convolution and local attention before the deep encoder; not covered.",
    "perceiver": "learned latents cross-attend to preprocessed inputs (Fourier or trainable position encodings inside modality preprocessors), so relevance meets the latents, which are no input leaf; not covered.",
    "reformer": "its LSH / local chunked attention, reversible residual layers and axial position embeddings are computed inline; not covered.",
    "big_bird": "its block-sparse attention (window, global and random blocks) and its full attention are computed inline, not through transformers' attention interface; not covered.",
    "longformer": "its sliding-window and global attention are computed inline in overlapping chunks, not through transformers' attention interface; not covered.",
    "ibert": "its quantisation-aware modules (QuantEmbedding, QuantAct, QuantLinear, IntGELU, IntSoftmax, IntLayerNorm) compute integer approximations with quant_mode=True; their float fallbacks (quant_mode=False) are not declared either; not covered.",
}

for _model_type, _reason in REFUSED.items():
    refuse_model_type(_model_type, _reason)
