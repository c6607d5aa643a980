"""Model types refused by name, with the reason (rather than a generic "not supported")."""

from __future__ import annotations

from .base import refuse_model_type
from .more_decoders import (
    DYNAMIC_MASK,
    MIXTURE_OF_ATTENTION,
    SINKS,
)

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

_ROTARY_SEQ2SEQ = (
    "it is an encoder-decoder whose encoder and decoder both rotate q and k (rotary positions on both sides, "
    "Gemma-style blocks); hf_pelrp's encoder-decoder declarations cover additive (BART) and relative-bias (T5) "
    "positions, and rotary leaves split into source and target positions are not implemented yet."
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
            ("qwen3_5_text", "Gated DeltaNet (linear attention)"),
            ("qwen3_5_moe", "Gated DeltaNet (linear attention)"),
            ("qwen3_5_moe_text", "Gated DeltaNet (linear attention)"),
            ("kimi_linear", "Kimi Delta Attention (linear attention)"),
            ("minimax", "lightning (linear) attention"),
        )
    },
    "bit": "it is a convolutional network (BiT: ResNet-v2 stages of weight-standardised convolutions, GroupNorm and max pooling) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "convnext": "it is a convolutional network (depthwise 7x7 convolutions, LayerNorm and pointwise MLPs) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "convnextv2": "it is a convolutional network (ConvNeXt blocks with Global Response Normalization) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "efficientnet": "it is a convolutional network (MBConv blocks: depthwise convolutions, BatchNorm, squeeze-and-excitation) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "hgnet_v2": "it is a convolutional network (HGNet-v2 convolution stages with BatchNorm and learnable affine blocks) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "mobilenet_v1": "it is a convolutional network (depthwise-separable convolutions with BatchNorm) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "mobilenet_v2": "it is a convolutional network (inverted residual blocks of depthwise convolutions with BatchNorm) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "regnet": "it is a convolutional network (RegNet convolution stages with BatchNorm and squeeze-and-excitation) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "resnet": "it is a convolutional network (residual convolution blocks with BatchNorm) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "pp_lcnet": "it is a convolutional network (depthwise-separable convolutions with BatchNorm, hard-swish and squeeze-and-excitation) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "textnet": "it is a convolutional network (re-parameterisable convolution stages with BatchNorm) with no attention and no positional encoding: PE-LRP explains attention models and their positional encodings, so it is outside the method.",
    "poolformer": "its token mixer is average pooling (pool(x) - x) between convolutional patch embeddings and GroupNorm: no attention and no positional encoding, so it is outside the method.",
    "swiftformer": "it is convolutional stages plus 'efficient additive attention' (a softmax-weighted global query multiplied element-wise with the keys: no q k^T attention matrix) and has no positional encoding, so it is outside the method.",
    "timm_wrapper": "it wraps an arbitrary timm model (any architecture timm builds, from modules outside transformers): hf_pelrp cannot know which rules its layers need or where positions enter, so it refuses rather than guess.",
    "cvt": "it has no position embedding (position enters implicitly through overlapping convolutional token embeddings and the depthwise-convolution + BatchNorm projections of q, k and v) and its attention is written inline: no positional leaf to explain and no rules for those projections.",
    "dinat": "its dilated neighbourhood attention, with a relative position bias (rpb), runs in the external NATTEN kernels (natten2dqkrpb, natten2dav), outside transformers' attention interface: neither the LRP attention rules nor a bias leaf can be attached to it.",
    "focalnet": "focal modulation replaces attention (depthwise-convolution context aggregation gated element-wise with a query projection) and it has no positional encoding, so it is outside the method.",
    "hiera": "its mask-unit attention max-pools the queries inside each unit (query stride) and is written inline; rules for that pooled-query attention are not implemented, so its learned absolute positions cannot be explained yet.",
    "levit": "its attention is written inline with a learned attention bias per patch offset (positions inside attention), subsampling attention blocks and BatchNorm after every linear map; the inline rules and the bias leaf for it are not implemented yet.",
    "mobilevit": "it is a convolutional network (BatchNorm convolutions) with inline-attention transformer blocks over unfolded patches and no positional encoding (position enters only through the convolutions): no positional leaf to explain.",
    "mobilevitv2": "its separable linear self-attention (a softmax over one context score per token, then element-wise products: no q k^T matrix) sits among BatchNorm convolutions, with no positional encoding: outside the method.",
    "pvt": "its spatial-reduction attention (keys and values from a strided convolution and LayerNorm of the tokens) is written inline; rules for it are not implemented, so its additive per-stage position embeddings cannot be explained yet.",
    "pvt_v2": "it has no position embedding (position enters through overlapping patch embeddings and the zero-padded depthwise convolution in each MLP) and its spatial-reduction / pooled linear attention is written inline: no positional leaf to explain.",
    "segformer": "its Mix Transformer has no position embedding (position enters through overlapping patch embeddings and the zero-padded depthwise convolution of each Mix-FFN) and its keys / values come from a strided spatial-reduction convolution: no positional leaf to explain.",
    "imagegpt": "its attention is written inline (not through transformers' attention interface) and ImageGPTLayerNorm is an RMS-style norm without mean subtraction; a GPT-2-like declaration with inline attention factors and that norm's surrogate is not written yet.",
    "siglip2": "its inputs are pre-patchified sequences (pixel_values [B, patches, C*p*p] with spatial_shapes and a pixel_attention_mask, padded per image) and its positions the learned grid resized per image (antialiased bilinear) to each aspect ratio; the split e = t + p is covered by the method, but hf_pelrp's image inputs, check_adapter's image instances and patch_map / pixel_map assume [B, C, H, W] images on one grid, so it is refused until they are written.",
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
    "gpt_oss": SINKS,
    "granite_swa": SINKS,
    "granitemoe_swa": SINKS,
    "doge": DYNAMIC_MASK,
    "jetmoe": MIXTURE_OF_ATTENTION,
    "mvp": "it has BART's layout, but its MvpAttention (with the optional per-layer prompts prepended to the keys and values) is computed inline, not through transformers' attention interface: the LRP attention rules cannot be attached to it.",
    "fsmt": "its encoder-decoder attention (the fairseq-style Attention module) is computed inline, not through transformers' attention interface: the LRP attention rules cannot be attached to it, so its sinusoidal positions cannot be explained yet.",
    "led": "its encoder uses Longformer's sliding-window and global attention, computed inline in overlapping chunks (LEDEncoderSelfAttention), not through transformers' attention interface; not covered.",
    "bigbird_pegasus": "its encoder's block-sparse attention (window, global and random blocks; the default attention_type) is computed inline, not through transformers' attention interface; not covered.",
    "pegasus_x": "its encoder's PegasusXGlobalLocalAttention (block-local attention plus global tokens, written inline with einsums) does not go through transformers' attention interface; not covered.",
    "prophetnet": "its decoder's n-gram self-attention (main and predict streams with relative position buckets, ProphetNetNgramSelfAttention) is computed inline; neither the attention rules nor a bias leaf for its buckets exist; not covered.",
    "xglm": "its attention (XGLMAttention) is computed inline, not through transformers' attention interface, and transformers 5.25's XGLM does not run in float64 (the attention mask fill raises 'value cannot be converted to type float without overflow'), which check_adapter's float64 references need; not covered.",
    "gemma3n": "its text decoder is not a LLaMA-like stack: AltUp (Gemma3nTextAltUp: several predicted copies of the hidden state mixed by learned, input-dependent tanh coefficients), LAuReL low-rank residual blocks (Gemma3nTextLaurelBlock), per-layer input embeddings gated into every layer, key/value sharing across layers and a statistical top-k activation sparsity (_gaussian_topk) in the MLPs of the first layers; hf_pelrp has no declaration or rules for these parts, and treating them as constants would silently drop the relevance they carry.",
    "gemma3n_text": "its text decoder is not a LLaMA-like stack: AltUp (Gemma3nTextAltUp: several predicted copies of the hidden state mixed by learned, input-dependent tanh coefficients), LAuReL low-rank residual blocks (Gemma3nTextLaurelBlock), per-layer input embeddings gated into every layer, key/value sharing across layers and a statistical top-k activation sparsity (_gaussian_topk) in the MLPs of the first layers; hf_pelrp has no declaration or rules for these parts, and treating them as constants would silently drop the relevance they carry.",
    "deepseek_v32": "its DeepSeek Sparse Attention masks the keys each query attends to by a top-k selection from a separate 'lightning indexer' (DeepseekV32Indexer: its own projections, rotary positions and ReLU-weighted scores), a content- and position-dependent mask beside the multi-head latent attention; hf_pelrp has no declaration of the indexer, and the relevance of the positions it uses is not defined by the method yet.",
    "longcat_flash": "each of its blocks has two latent-attention sublayers and two dense MLPs beside a shortcut-connected mixture of experts with zero-computation (identity) experts (LongcatFlashDecoderLayer); hf_pelrp's declarations have one attention module per block, so it is not covered.",
    "flint": SINKS,
    "mimo_v2_flash": SINKS,
    "axk2": "its DeepSeek Sparse Attention masks the keys each query attends to by a top-k selection from a separate 'lightning indexer' (AXK2Indexer: its own projections, rotary positions and ReLU-weighted scores), a content- and position-dependent mask beside the multi-head latent attention; hf_pelrp has no declaration of the indexer, and the relevance of the positions it uses is not defined by the method yet.",
    "hy_v4": "its DeepSeek Sparse Attention masks the keys each query attends to by a top-k selection from a separate 'lightning indexer' (HYV4Indexer: its own projections, rotary positions and ReLU-weighted scores), a content- and position-dependent mask beside the multi-head latent attention; hf_pelrp has no declaration of the indexer, and the relevance of the positions it uses is not defined by the method yet; it also mixes several residual streams with hyper-connections (HYV4HyperConnection), which are not declared either.",
    "lfm3": _HYBRID.format(layers="short-convolution (Lfm3ShortConv)"),
    "paligemma": "its language model attends bidirectionally over the image and prompt prefix (token_type_ids == 0) and causally over the suffix, and counts positions from 1; in transformers 5.25 its text config sets use_bidirectional_attention=True, and a padded row's logits then depend on its padding tokens (a row alone and the same row right-padded in a batch differ), so neither the text-only nor the image path can be proven by check_adapter's batch invariance; not covered (issue 19 tried it).",
    "t5gemma": _ROTARY_SEQ2SEQ,
    "t5gemma2": _ROTARY_SEQ2SEQ,
    "whisper": "its encoder reads log-mel input_features through two 1-D convolutions (no token ids) and adds fixed sinusoidal positions; hf_pelrp's inputs are token ids or images [B, C, H, W], and an input-feature leaf (relevance per audio frame beside its position) is not implemented yet, so neither WhisperForConditionalGeneration nor WhisperForCausalLM (whose cross-attention reads the encoder's states) is covered.",
    "olmo_hybrid": _HYBRID.format(layers="Gated DeltaNet (OlmoHybridGatedDeltaNet, linear attention)"),
    "glm_moe_dsa": "its DeepSeek Sparse Attention masks the keys each query attends to by a top-k selection from a separate 'lightning indexer' (GlmMoeDsaIndexer: its own projections, rotary positions and ReLU-weighted scores), a content- and position-dependent mask beside the multi-head latent attention; hf_pelrp has no declaration of the indexer, and the relevance of the positions it uses is not defined by the method yet.",
    "deepseek_v4": "its attention reads keys and values compressed over blocks of the sequence (DeepseekV4CSACompressor, DeepseekV4HCACompressor) and selected by a top-k indexer (DeepseekV4Indexer), and its blocks mix several residual streams with hyper-connections (DeepseekV4HyperConnection, DeepseekV4HyperHead); hf_pelrp has no rules for the compression, the indexer's position-dependent selection or the hyper-connections, so it is not covered.",
    "qwen4_exp": _HYBRID.format(layers="Gated DeltaNet (linear attention)"),
    "qwen4_exp_text": _HYBRID.format(layers="Gated DeltaNet (linear attention)"),
    "zaya": "its Compressed Convolutional Attention (ZayaCCAProjection) builds q and k through causal depthwise and grouped convolutions over the sequence and v from a delayed recurrent state, and its router is an MLP (ZayaRouterMLP); position enters through those convolutions and the recurrence, where hf_pelrp has no positional leaf or rule, so it is not covered.",
}

for _model_type, _reason in REFUSED.items():
    refuse_model_type(_model_type, _reason)
