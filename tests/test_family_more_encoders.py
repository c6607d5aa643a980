"""More encoders (issue 18): the rules their declarations add, against explicit float64 references.

- LayoutLM: the six 2-D box embeddings are position leaves; at the embedding sum ``e`` the split is
  ``R_x = x * g`` for every addend, so with ``g`` read at ``e`` and the tables indexed by hand the 1-D and box
  maps are reproduced exactly; ``bbox`` moves with the tokens when left padding is aligned.
- RoCBert: the glyph-shape and pronunciation embeddings are token content: at the concatenation before
  ``map_inputs_layer`` each part's relevance is its slice of ``[word; shape; pron] * g``; ``token`` is their sum.
- X-MOD: a row's language adapter (``lang_ids``) is a constant choice: a batch of two languages gives each row the
  maps of that row alone.
- GTE without token types (``type_vocab_size=0``): no segment leaf, conservation still exact.
- ESM: only the rotary ESM is declared; the erf GELU it applies as a function needs its identity rule for
  conservation (shown by removing it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import hf_pelrp
from hf_pelrp import UnsupportedModelError
from hf_pelrp.check import _randomise, _zero_biases, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def _model(model_type: str, cls, seed: int = 0, **overrides):
    config = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = cls(config).to(F64).eval()
    _randomise(model, seed)
    return model


def _ids(batch: int = 2, length: int = 7, seed: int = 1, low: int = 4) -> torch.Tensor:
    return torch.randint(low, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _grad_at_input(module: torch.nn.Module, seen: list):
    """A pre-hook recording the input of ``module`` and, in the backward pass, the (modified) gradient there."""

    def hook(_module, args):
        x = args[0]
        seen.append(x.detach().clone())
        if x.requires_grad:
            x.register_hook(lambda g: seen.append(g.detach().clone()))

    return module.register_forward_pre_hook(hook)


# ---- LayoutLM -------------------------------------------------------------------------------------------------


def _bbox(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x0, y0 = (
        torch.randint(0, 30, (batch, length), generator=gen),
        torch.randint(0, 30, (batch, length), generator=gen),
    )
    w, h = (
        torch.randint(0, 30, (batch, length), generator=gen),
        torch.randint(0, 30, (batch, length), generator=gen),
    )
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_layoutlm_box_leaves_match_the_explicit_split_at_the_embedding_sum(mode):
    from transformers import LayoutLMForSequenceClassification

    model = _model("layoutlm", LayoutLMForSequenceClassification)
    emb = model.layoutlm.embeddings
    ids, bbox = _ids(), _bbox(2, 7)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    seen: list = []
    handle = _grad_at_input(emb.LayerNorm, seen)
    try:
        attr = hf_pelrp.attribute(model, ids, bbox=bbox, token_type_ids=types, target=1, mode=mode)
    finally:
        handle.remove()
    e, g = seen[0], seen[-1]
    assert g.shape == e.shape
    pos = torch.arange(7)
    box = (
        emb.x_position_embeddings.weight[bbox[..., 0]]
        + emb.y_position_embeddings.weight[bbox[..., 1]]
        + emb.x_position_embeddings.weight[bbox[..., 2]]
        + emb.y_position_embeddings.weight[bbox[..., 3]]
        + emb.h_position_embeddings.weight[bbox[..., 3] - bbox[..., 1]]
        + emb.w_position_embeddings.weight[bbox[..., 2] - bbox[..., 0]]
    )
    with torch.no_grad():
        ref_box = (box * g).sum(-1)
        ref_1d = (emb.position_embeddings.weight[pos] * g).sum(-1)
        ref_token = (emb.word_embeddings.weight[ids] * g).sum(-1)
        ref_segment = (emb.token_type_embeddings.weight[types] * g).sum(-1)
    torch.testing.assert_close(attr.extras["position_bbox"], ref_box, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.extras["position_1d"], ref_1d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.position, ref_1d + ref_box, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.token, ref_token, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.segment, ref_segment, rtol=1e-10, atol=1e-12)
    # nothing else enters the sum: R_e = token + position + segment, position by position
    torch.testing.assert_close(attr.relevance, (e * g).sum(-1), rtol=1e-10, atol=1e-12)
    assert float(ref_box.abs().min()) > 0


def test_layoutlm_bias_free_cp_conservation_with_real_boxes():
    from transformers import LayoutLMForMaskedLM

    model = _model("layoutlm", LayoutLMForMaskedLM)
    _zero_biases(model)
    ids = _ids()
    ids[:, 3] = 3
    attr = hf_pelrp.attribute(model, ids, bbox=_bbox(2, 7), position=3, mask_token_id=3, mode="cp")
    assert float(attr.conservation_gap.abs().max()) <= 1e-9 * float(
        attr.target_value.abs().max().clamp(min=1)
    )
    assert float(attr.extras["position_bbox"].abs().sum()) > 0


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_layoutlm_bbox_moves_with_left_padding(mode):
    from transformers import LayoutLMForSequenceClassification

    model = _model("layoutlm", LayoutLMForSequenceClassification)
    ids, bbox = _ids(1, 5), _bbox(1, 5)
    alone = hf_pelrp.attribute(model, ids, bbox=bbox, target=0, mode=mode)
    padded_ids = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
    padded_box = torch.cat([torch.zeros(1, 2, 4, dtype=torch.long), bbox], 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    padded = hf_pelrp.attribute(model, padded_ids, attention_mask=mask, bbox=padded_box, target=0, mode=mode)
    assert float(padded.relevance[:, :2].abs().max()) == 0.0
    for name in ("position_bbox", "position_1d"):
        torch.testing.assert_close(padded.extras[name][:, 2:], alone.extras[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(padded.token[:, 2:], alone.token, rtol=1e-9, atol=1e-12)
    with pytest.raises(hf_pelrp.AttributionInputError, match="bbox must be a tensor of shape"):
        hf_pelrp.attribute(model, padded_ids, attention_mask=mask, bbox=bbox, target=0)


# ---- RoCBert --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_roc_bert_shape_and_pronunciation_are_token_content(mode):
    from transformers import RoCBertForSequenceClassification

    model = _model("roc_bert", RoCBertForSequenceClassification)
    emb = model.roc_bert.embeddings
    ids = _ids()
    shape_ids = torch.randint(1, 29, ids.shape, generator=torch.Generator().manual_seed(3))
    pron_ids = torch.randint(1, 23, ids.shape, generator=torch.Generator().manual_seed(4))
    seen: list = []
    handle = _grad_at_input(emb.map_inputs_layer, seen)
    try:
        attr = hf_pelrp.attribute(
            model, ids, input_shape_ids=shape_ids, input_pronunciation_ids=pron_ids, target=2, mode=mode
        )
    finally:
        handle.remove()
    g = seen[-1]
    hidden, width = emb.word_embeddings.embedding_dim, emb.shape_embed.embedding_dim
    with torch.no_grad():
        word = (emb.word_embeddings.weight[ids] * g[..., :hidden]).sum(-1)
        shape = (emb.shape_embed.weight[shape_ids] * g[..., hidden : hidden + width]).sum(-1)
        pron = (emb.pronunciation_embed.weight[pron_ids] * g[..., hidden + width :]).sum(-1)
    torch.testing.assert_close(attr.extras["token_word"], word, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.extras["token_shape"], shape, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.extras["token_pronunciation"], pron, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.token, word + shape + pron, rtol=1e-10, atol=1e-12)
    assert float(shape.abs().min()) > 0 and float(pron.abs().min()) > 0


def test_roc_bert_bias_free_cp_conservation_and_left_padding_with_shape_ids():
    from transformers import RoCBertForSequenceClassification

    model = _model("roc_bert", RoCBertForSequenceClassification)
    _zero_biases(model)
    ids = _ids(1, 5)
    shape_ids = torch.randint(1, 29, ids.shape, generator=torch.Generator().manual_seed(3))
    pron_ids = torch.randint(1, 23, ids.shape, generator=torch.Generator().manual_seed(4))
    extra = {"input_shape_ids": shape_ids, "input_pronunciation_ids": pron_ids}
    alone = hf_pelrp.attribute(model, ids, **extra, target=0, mode="cp")
    assert float(alone.conservation_gap.abs().max()) <= 1e-9 * float(
        alone.target_value.abs().clamp(min=1).max()
    )
    pad = torch.zeros(1, 2, dtype=torch.long)
    padded = hf_pelrp.attribute(
        model,
        torch.cat([pad, ids], 1),
        attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 1]]),
        **{k: torch.cat([pad, v], 1) for k, v in extra.items()},
        target=0,
        mode="cp",
    )
    for name in ("token_shape", "token_pronunciation"):
        torch.testing.assert_close(padded.extras[name][:, 2:], alone.extras[name], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(padded.relevance[:, 2:], alone.relevance, rtol=1e-9, atol=1e-12)


# ---- X-MOD ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_xmod_rows_of_two_languages_get_the_maps_of_each_row_alone(mode):
    from transformers import XmodForSequenceClassification

    model = _model("xmod", XmodForSequenceClassification)
    ids = _ids(low=3)
    both = hf_pelrp.attribute(model, ids, lang_ids=torch.tensor([0, 1]), target=1, mode=mode)
    for row in range(2):
        alone = hf_pelrp.attribute(
            model, ids[row : row + 1], lang_ids=torch.tensor([row]), target=1, mode=mode
        )
        torch.testing.assert_close(both.relevance[row : row + 1], alone.relevance, rtol=1e-9, atol=1e-12)
    other = hf_pelrp.attribute(model, ids[1:], lang_ids=torch.tensor([0]), target=1, mode=mode)
    assert not torch.allclose(other.relevance, both.relevance[1:])  # the language adapter matters


# ---- GTE without token types, ESM -----------------------------------------------------------------------------


def test_gte_without_token_types_has_no_segment_and_conserves():
    from transformers import GteForSequenceClassification

    model = _model("gte", GteForSequenceClassification, type_vocab_size=0)
    assert model.gte.embeddings.token_type_embeddings is None
    _zero_biases(model)
    attr = hf_pelrp.attribute(model, _ids(), target=0, mode="cp")
    assert attr.segment is None
    assert float(attr.conservation_gap.abs().max()) <= 1e-9 * float(
        attr.target_value.abs().clamp(min=1).max()
    )


def test_esm_with_absolute_positions_is_refused():
    from transformers import EsmForMaskedLM

    model = _model("esm", EsmForMaskedLM, position_embedding_type="absolute")
    with pytest.raises(UnsupportedModelError, match="position_embedding_type='absolute'"):
        hf_pelrp.attribute(model, _ids(), position=2)


def test_esm_functional_gelu_needs_its_identity_rule():
    """Without the identity rule at ESM's erf GELU (a function between two linear layers) bias-free CP
    conservation breaks; with it, it is exact."""
    from transformers import EsmForSequenceClassification

    from hf_pelrp.adapters import adapter_for_type
    from hf_pelrp.adapters.base import _REGISTRY

    model = _model("esm", EsmForSequenceClassification)
    _zero_biases(model)
    right = hf_pelrp.attribute(model, _ids(), target=0, mode="cp")
    scale = float(right.target_value.abs().clamp(min=1).max())
    assert float(right.conservation_gap.abs().max()) <= 1e-9 * scale
    saved = adapter_for_type("esm")
    _REGISTRY["esm"] = dataclasses.replace(saved, extra_rules=None)
    try:
        wrong = hf_pelrp.attribute(model, _ids(), target=0, mode="cp")
    finally:
        _REGISTRY["esm"] = saved
    assert float(wrong.conservation_gap.abs().max()) > 1e-6 * scale


# ---- RoFormer: inline interleaved rotary --------------------------------------------------------------------


def _roformer_causal(seed: int = 0):
    from transformers import RoFormerForCausalLM

    model = _model("roformer", RoFormerForCausalLM, seed=seed, is_decoder=True, num_hidden_layers=1)
    model.config.is_decoder = True
    return model


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_roformer_inline_rotary_matches_explicit_rules(mode):
    """One RoFormer self-attention (made causal, as the explicit reference is) against the slow float64 LRP of
    helpers/reference_attention.py with the interleaved layout: relevance of the input and of the (sin, cos)
    leaves. The output projection is outside RoFormerSelfAttention: the reference gets the identity there."""
    from helpers.reference_attention import AttentionWeights, reference_attention_lrp

    model = _roformer_causal()
    attn = model.roformer.encoder.layer[0].attention.self
    seq, hidden = 6, model.config.hidden_size
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, seq, hidden, generator=gen, dtype=F64)
    seed = torch.randn(1, seq, hidden, generator=gen, dtype=F64)
    pe = model.roformer.encoder.embed_positions((1, seq))[None, None].to(F64)
    mask = torch.full((seq, seq), torch.finfo(F64).min, dtype=F64).triu(1)[None, None]
    with hf_pelrp.lrp(model, mode=mode, positional=True) as ctx:
        leaf = x.clone().requires_grad_(True)
        out = attn(leaf, attention_mask=mask, sinusoidal_pos=pe)[0]
        (out * seed).sum().backward()
        leaves = ctx.store.layers[0]
        r_pe = {
            n: torch.zeros_like(leaves[n][0])
            if leaves[n].grad is None
            else (leaves[n].detach() * leaves[n].grad)[0]
            for n in ("sin", "cos")
        }
    r_x = (leaf.detach() * leaf.grad)[0]
    sin, cos = pe[0, 0].chunk(2, dim=-1)
    w = AttentionWeights(
        attn.query.weight,
        attn.query.bias,
        attn.key.weight,
        attn.key.bias,
        attn.value.weight,
        attn.value.bias,
        torch.eye(hidden, dtype=F64),
        None,
        heads,
        heads,
        head_dim,
        head_dim**-0.5,
        head_dim,
        "interleaved",
    )
    ref = reference_attention_lrp(w, x[0], cos, sin, out.detach()[0] * seed[0], mode=mode)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))

    assert rel(r_x, ref.x) < 1e-9
    for name in ("sin", "cos"):
        if mode == "cp":
            assert float(r_pe[name].abs().max()) == 0.0
        else:
            assert rel(r_pe[name], getattr(ref, name)) < 1e-9
            assert float(r_pe[name].abs().max()) > 0


def test_roformer_rotary_values_are_refused():
    from transformers import RoFormerForSequenceClassification

    model = _model("roformer", RoFormerForSequenceClassification, rotary_value=True)
    with pytest.raises(UnsupportedModelError, match="rotary_value=True"):
        hf_pelrp.attribute(model, _ids(), target=0)


# ---- MobileBERT: NoNorm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_mobilebert_no_norm_is_the_epsilon_rule_of_its_affine_map(mode):
    """NoNorm computes ``y = x * w + b``: explicit float64 epsilon-LRP of that diagonal map gives
    ``R_x = x w R_y / y`` (the bias absorbs its share); the fast path reproduces it at a NoNorm of the model."""
    from transformers import MobileBertForSequenceClassification

    model = _model("mobilebert", MobileBertForSequenceClassification)
    norm = model.mobilebert.encoder.layer[0].attention.output.LayerNorm
    assert type(norm).__name__ == "NoNorm"
    gen = torch.Generator().manual_seed(5)
    width = norm.weight.shape[0]
    with torch.no_grad():
        norm.bias.copy_(torch.randn(width, generator=gen, dtype=F64))
        norm.weight.copy_(torch.randn(width, generator=gen, dtype=F64))
    x = torch.randn(2, 5, width, generator=gen, dtype=F64)
    seed = torch.randn(2, 5, width, generator=gen, dtype=F64)
    with hf_pelrp.lrp(model, mode=mode):
        leaf = x.clone().requires_grad_(True)
        y = norm(leaf)
        (y * seed).sum().backward()
    r_y = (y.detach() * seed).double()
    expected = x * norm.weight.detach() * r_y / y.detach()
    torch.testing.assert_close(leaf.detach() * leaf.grad, expected, rtol=1e-10, atol=1e-12)


def test_mobilebert_no_norm_declared_as_layer_norm_is_refused():
    from transformers import MobileBertForSequenceClassification

    from hf_pelrp.adapters import adapter_for_type
    from hf_pelrp.adapters.base import _REGISTRY
    from hf_pelrp.adapters.norms import layer_norm

    model = _model("mobilebert", MobileBertForSequenceClassification)
    saved = adapter_for_type("mobilebert")
    _REGISTRY["mobilebert"] = dataclasses.replace(saved, norms={**saved.norms, "NoNorm": layer_norm})
    try:
        with pytest.raises(UnsupportedModelError, match="does not reproduce"):
            hf_pelrp.attribute(model, _ids(), target=0)
    finally:
        _REGISTRY["mobilebert"] = saved


# ---- XLM, FlauBERT ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_xlm_language_and_token_type_embeddings_are_leaves(mode):
    """``e = word(ids) + pos + lang(langs) + word(token_type_ids)``: with ``g`` read at ``e`` and the tables indexed
    by hand, ``language`` and ``segment`` (token types + language) are reproduced; nothing else enters."""
    from transformers import XLMForSequenceClassification

    model = _model("xlm", XLMForSequenceClassification)
    base = model.transformer
    ids = _ids(low=5)
    langs = torch.tensor([[0, 1, 1, 0, 1, 0, 1], [1, 1, 0, 0, 1, 1, 0]])
    types = torch.randint(3, 97, ids.shape, generator=torch.Generator().manual_seed(6))
    seen: list = []
    handle = _grad_at_input(base.layer_norm_emb, seen)
    try:
        attr = hf_pelrp.attribute(model, ids, langs=langs, token_type_ids=types, target=1, mode=mode)
    finally:
        handle.remove()
    e, g = seen[0], seen[-1]
    with torch.no_grad():
        language = (base.lang_embeddings.weight[langs] * g).sum(-1)
        types_r = (base.embeddings.weight[types] * g).sum(-1)
        token = (base.embeddings.weight[ids] * g).sum(-1)
        position = (base.position_embeddings.weight[torch.arange(7)] * g).sum(-1)
    torch.testing.assert_close(attr.extras["language"], language, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.segment, types_r + language, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.token, token, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.position, position, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(attr.relevance, (e * g).sum(-1), rtol=1e-10, atol=1e-12)
    assert float(language.abs().min()) > 0


def test_xlm_bias_free_cp_conservation_with_languages():
    from transformers import XLMForSequenceClassification

    model = _model("xlm", XLMForSequenceClassification)
    _zero_biases(model)
    langs = torch.tensor([[0, 1, 1, 0, 1, 0, 1], [1, 1, 0, 0, 1, 1, 0]])
    attr = hf_pelrp.attribute(model, _ids(low=5), langs=langs, target=0, mode="cp")
    assert float(attr.conservation_gap.abs().max()) <= 1e-9 * float(
        attr.target_value.abs().clamp(min=1).max()
    )


def test_flaubert_pre_norm_is_refused_with_the_reason():
    """transformers 5.25's pre-norm FlauBERT forward fails on its own (``cache[i]`` on an EncoderDecoderCache):
    refused by name rather than failing inside the model."""
    from transformers import FlaubertForSequenceClassification

    model = _model("flaubert", FlaubertForSequenceClassification, pre_norm=True)
    with pytest.raises(UnsupportedModelError, match="pre_norm=True"):
        hf_pelrp.attribute(model, _ids(low=5), target=0)


def test_flaubert_lm_head_passes_check_adapter():
    """FlaubertWithLMHeadModel is in no auto mapping, so check_adapter("flaubert") does not build it: proven here."""
    from transformers import FlaubertWithLMHeadModel

    report = hf_pelrp.check_adapter(tiny_config("flaubert"), classes=[FlaubertWithLMHeadModel])
    assert report.passed and report.heads == ["FlaubertWithLMHeadModel"]


# ---- MPNet: absolute positions and a relative attention bias ---------------------------------------------------


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_mpnet_bias_leaf_matches_the_explicit_biased_attention_rules(mode):
    """One MPNet self-attention (inline) against helpers/reference_bias.py's explicit float64 LRP of biased
    attention: relevance of the input and of the relative bias [H, T, T] (CP: exactly 0)."""
    from transformers import MPNetForSequenceClassification

    from helpers.reference_absolute import lrp_linear
    from helpers.reference_bias import biased_attention, lrp_biased_attention

    model = _model("mpnet", MPNetForSequenceClassification)
    attn = model.mpnet.encoder.layer[0].attention.attn
    seq, hidden = 6, model.config.hidden_size
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, seq, hidden, generator=gen, dtype=F64)
    seed = torch.randn(1, seq, hidden, generator=gen, dtype=F64)
    bias = model.mpnet.encoder.compute_position_bias(x).detach()
    with hf_pelrp.lrp(model, mode=mode) as ctx:
        leaf = x.clone().requires_grad_(True)
        out = attn(leaf, None, bias)[0]
        (out * seed).sum().backward()
        b_leaf = ctx.store.layers[0]["bias"]
        r_bias = torch.zeros_like(b_leaf[0]) if b_leaf.grad is None else (b_leaf.detach() * b_leaf.grad)[0]
    r_x = (leaf.detach() * leaf.grad)[0]

    def lin(module, t):
        return t @ module.weight.T + module.bias

    def heads_of(t):
        return t.view(seq, heads, head_dim).transpose(0, 1)

    with torch.no_grad():
        x0 = x[0]
        q, k, v = (heads_of(lin(m, x0)) for m in (attn.q, attn.k, attn.v))
        allowed = torch.ones(heads, seq, seq, dtype=torch.bool)
        scores, probs, ctx_out = biased_attention(q, k, v, head_dim**-0.5, bias[0], allowed)
        flat = ctx_out.transpose(0, 1).reshape(seq, -1)
        r_o = out.detach()[0] * seed[0]
        r_flat = lrp_linear(flat, attn.o.weight, attn.o.bias, r_o)
        r_q, r_k, r_v, ref_bias = lrp_biased_attention(
            q, k, v, head_dim**-0.5, bias[0], allowed, scores, probs, ctx_out, heads_of(r_flat), mode
        )

        def back(t):
            return t.transpose(0, 1).reshape(seq, -1)

        ref_x = sum(
            lrp_linear(x0, m.weight, m.bias, back(r))
            for m, r in ((attn.q, r_q), (attn.k, r_k), (attn.v, r_v))
        )

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))

    assert rel(r_x, ref_x) < 1e-9
    if mode == "cp":
        assert float(r_bias.abs().max()) == 0.0
    else:
        assert rel(r_bias, ref_bias) < 1e-9 and float(ref_bias.abs().max()) > 0


def test_mpnet_position_is_absolute_plus_relative():
    from transformers import MPNetForMaskedLM

    model = _model("mpnet", MPNetForMaskedLM)
    ids = _ids(low=4)
    ids[:, 3] = 3
    attr = hf_pelrp.attribute(model, ids, position=3, mask_token_id=3)
    torch.testing.assert_close(
        attr.position, attr.extras["position_absolute"] + attr.extras["position_relative"]
    )
    assert float(attr.extras["position_relative"].abs().min()) > 0
    cp = hf_pelrp.attribute(model, ids, position=3, mask_token_id=3, mode="cp")
    assert float(cp.extras["position_relative"].abs().max()) == 0.0
    assert float(cp.extras["position_absolute"].abs().max()) > 0
