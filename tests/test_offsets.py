"""Relevance per query-key offset (hf_pelrp.offsets, method.md 2 "Relevance per offset") against explicit float64
references with a loop over pairs: the split ``R_p = R_S * P / S`` of each score's relevance, summed per offset
``d = i - j``, per layer and head; its conservation (position + content = score relevance); the chunked
re-computation; the model restored; refusals where no offset map exists."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_pelrp
from conftest import tiny_llama_family
from helpers.reference_bias import alibi_reference
from helpers.reference_lrp import reference_lrp
from hf_pelrp import LRPConfig
from hf_pelrp.adapters import adapter_for_type
from hf_pelrp.errors import UnsupportedModelError
from hf_pelrp.offsets import offset_sums, rotate, unrotate
from test_family_alibi import _model as alibi_model

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-8
#: the model computes its rotary cos / sin in float32 (transformers disables autocast there) and the reference in
#: float64, so the position part ``S - C`` of a score agrees to ~1e-7 of the largest score only
ROTARY_TOL = 1e-6
#: BLOOM / MPT take their softmax in float32 (test_family_alibi.py compares its maps at 1e-6 as well)
ALIBI_TOL = 1e-5
OFFSETS = LRPConfig(offsets=True, offset_chunk=None)


#: YaRN scales cos and sin by an attention factor a != 1: the identity rotation is (a, 0)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 10000.0}


def _llama(**overrides):
    return tiny_llama_family(
        "llama", "causal_lm", num_layers=2, seed=0, initializer_range=0.15, **overrides
    ).double()


def _batch(length: int = 7, vocab: int = 100):
    """Three rows: full, left-padded (2 pads), right-padded (2 pads)."""
    ids = torch.randint(1, vocab, (3, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, -2:] = 0
    return ids * mask, mask


def _per_offset(pairs: torch.Tensor) -> torch.Tensor:
    """[B, L, H, T, T] -> [B, L, H, T]: an explicit loop over the pairs (i, j), offset d = i - j >= 0."""
    b, layers, heads, seq, _ = pairs.shape
    out = torch.zeros(b, layers, heads, seq, dtype=torch.float64)
    for i in range(seq):
        for j in range(i + 1):
            out[..., i - j] += pairs[..., i, j]
    return out


def _close(fast: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    scale = float(ref.abs().max().clamp(min=1e-12))
    err = float((fast.double() - ref).abs().max()) / scale
    assert err < tol, f"{what}: relative error {err:.2e}"


def test_offset_sums_is_a_loop_over_pairs():
    pairs = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = offset_sums(pairs, first_query=1)  # queries are keys 1..4 (a block)
    ref = torch.zeros(2, 9, dtype=torch.float64)
    for i in range(4):
        for j in range(5):
            ref[:, (i + 1) - j + 4] += pairs[:, i, j]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rotated", ["first", "last"])
def test_unrotate_gives_the_identity_rotation(layout, rotated):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    width = 3 if layout == "interleaved" else 6  # partial rotary: 6 of 8 channels
    angle = torch.randn(2, 5, width, generator=gen, dtype=torch.float64)
    if layout == "half":
        angle = torch.cat([angle[..., :3], angle[..., :3]], -1)
    scale = 1.3  # attention scaling: the identity rotation is (1.3, 0)
    cos, sin = scale * angle.cos(), scale * angle.sin()
    turned = rotate(x, cos, sin, layout, rotated)
    content = unrotate(turned, cos, sin, layout, rotated)
    identity = rotate(x, torch.full_like(cos, scale), torch.zeros_like(sin), layout, rotated)
    assert torch.allclose(content, identity, atol=1e-12)
    assert not torch.allclose(content, turned, atol=1e-3)


@pytest.mark.parametrize("rope", [None, YARN], ids=["rope", "yarn"])
def test_rotary_offsets_match_the_explicit_reference(rope):
    model = _llama() if rope is None else _llama(rope_parameters=rope)
    ids, mask = _batch()
    attr = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS)
    ref = reference_lrp(model, ids, mask, target=attr.target)
    _close(attr.token, ref.token, "token")  # the offset maps change nothing else
    r_s, s, c = ref.score_relevance, ref.scores, ref.content_scores
    safe = torch.where(s == 0, torch.ones_like(s), s)
    r_p = torch.where(s == 0, torch.zeros_like(s), r_s * (s - c) / safe)
    r_c = torch.where(s == 0, torch.zeros_like(s), r_s * c / safe)
    by_head = _per_offset(r_p)
    assert attr.position_by_offset.shape == (3, 2, 7)
    assert torch.equal(attr.offset_labels[0], torch.arange(7))
    _close(attr.position_by_offset_by_head, by_head, "position_by_offset_by_head", ROTARY_TOL)
    _close(attr.position_by_offset, by_head.sum(2), "position_by_offset", ROTARY_TOL)
    _close(attr.content_by_offset, _per_offset(r_c).sum(2), "content_by_offset", ROTARY_TOL)
    # offset 0: the rotation is the identity, no position part
    assert float(attr.position_by_offset[..., 0].abs().max()) < 1e-12
    # conservation: position + content over all offsets is the relevance of the scores, per layer
    total = (attr.position_by_offset + attr.content_by_offset).sum(-1)
    _close(total, r_s.sum((2, 3, 4)), "sum of position and content")
    # the rotary leaves' rule gives the positions half of the score relevance of a layer (the per-slot map)
    _close(attr.position_by_layer.sum(-1), 0.5 * r_s.sum((2, 3, 4)), "position_by_layer")
    assert float(attr.position_by_offset.abs().max()) > 1e-3 * float(r_s.abs().max())
    # padding: the left-padded row's offsets are those of the row alone
    alone = hf_pelrp.attribute(model, ids[1:2, 2:], config=OFFSETS, target=attr.target[1:2])
    _close(attr.position_by_offset[1, :, :5], alone.position_by_offset[0], "padded row")


def test_alibi_offsets_match_the_explicit_reference():
    model = alibi_model("bloom")
    ids, mask = _batch(vocab=97)
    attr = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS)
    ref = alibi_reference(model, ids, mask, mode="attnlrp", target=attr.target)
    by_head = _per_offset(ref.bias_pairs)
    _close(attr.position_by_offset_by_head, by_head, "position_by_offset_by_head", ALIBI_TOL)
    _close(attr.position_by_offset, by_head.sum(2), "position_by_offset", ALIBI_TOL)
    # the split is exact: the bias part and the content part add up to the score relevance of every pair
    content = ref.score_pairs - ref.bias_pairs
    assert float(content.abs().max()) > 1e-3 * float(ref.score_pairs.abs().max())
    # the same relevance as the per-key map, regrouped
    _close(attr.position_by_offset.sum(-1), attr.position_by_layer.sum(-1), "per layer")
    assert "content_by_offset" not in attr.extras  # not known for bias models


@pytest.mark.parametrize("model_type", ["bloom", "mpt", "falcon"])
def test_alibi_offsets_regroup_the_bias_relevance(model_type):
    model = alibi_model(model_type)
    ids, mask = _batch(vocab=97)
    attr = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS)
    assert attr.position_by_offset.shape == (3, model.config.num_hidden_layers, 7)
    _close(attr.position_by_offset.sum(-1), attr.position_by_layer.sum(-1), f"{model_type} per layer", 1e-6)
    _close(
        attr.position_by_offset.sum((1, 2)), attr.position_by_distance.sum(-1), f"{model_type} total", 1e-6
    )


def test_chunked_equals_unchunked():
    model = _llama()
    ids, mask = _batch()
    whole = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS)
    for chunk in (1, 3):
        parts = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS.with_(offset_chunk=chunk))
        for name in ("position_by_offset", "content_by_offset", "position_by_offset_by_head"):
            _close(parts.extras[name], whole.extras[name], f"{name}, chunk {chunk}", tol=1e-12)


@pytest.mark.parametrize("model_type", ["gptj", "phi", "gemma2", "qwen3"])
def test_rotary_families_conserve_per_layer(model_type):
    """Interleaved (GPT-J) and partial (Phi) rotary, soft-capping (Gemma 2), q/k norms (Qwen3): the offset maps
    exist, do not depend on the block size, and the chunked re-computation runs every layer."""
    config = AutoConfig.for_model(model_type, **dict(adapter_for_type(model_type).tiny))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    ids, mask = _batch(vocab=config.vocab_size)
    a = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS)
    b = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS.with_(offset_chunk=2))
    layers = config.num_hidden_layers
    assert a.position_by_offset.shape == (3, layers, 7)
    _close(b.position_by_offset, a.position_by_offset, "chunked", tol=1e-10)
    assert float(a.position_by_offset.abs().sum()) > 0
    _close(a.token, hf_pelrp.attribute(model, ids, attention_mask=mask).token, "token unchanged", tol=1e-12)


def test_cp_gives_zero_offsets_and_the_model_comes_back_unchanged():
    model = _llama()
    ids, mask = _batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = hf_pelrp.attribute(model, ids, attention_mask=mask)
    cp = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS.with_(mode="cp"))
    assert cp.position_by_offset.shape == (3, 2, 7)
    assert float(cp.position_by_offset.abs().max()) == 0.0  # CP: the scores are constants
    assert float(cp.content_by_offset.abs().max()) == 0.0
    hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS)
    after = hf_pelrp.attribute(model, ids, attention_mask=mask)
    assert after.position_by_offset is None and before.position_by_offset is None
    assert torch.equal(after.token, before.token) and torch.equal(after.position, before.position)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_save_and_load_keep_the_offset_map(tmp_path):
    model = _llama()
    ids, mask = _batch()
    attr = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS)
    attr.save(str(tmp_path / "a.safetensors"))
    back = hf_pelrp.Attribution.load(str(tmp_path / "a.safetensors"))
    assert torch.equal(back.position_by_offset, attr.position_by_offset)
    assert torch.equal(back.offset_labels, attr.offset_labels)
    assert back[1].position_by_offset.shape == (1, 2, 7)


def test_refusals_name_the_fix():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    with pytest.raises(UnsupportedModelError, match="offsets=False"):
        hf_pelrp.attribute(gpt2, torch.tensor([[1, 2, 3]]), config=OFFSETS)
    with pytest.raises(ValueError, match="positional=True"):
        LRPConfig(offsets=True, positional=False)
    with pytest.raises(ValueError, match="offset_chunk"):
        LRPConfig(offsets=True, offset_chunk=0)


def test_the_html_report_shows_the_recency_profile():
    model = _llama()
    ids, mask = _batch()
    with_offsets = hf_pelrp.attribute(model, ids[:1], config=OFFSETS).to_html()
    assert "recency profile" in with_offsets and "offset i - j = 6" in with_offsets
    assert "recency profile" not in hf_pelrp.attribute(model, ids[:1]).to_html()


def test_gradient_checkpointing_gives_the_same_offsets():
    model = _llama()
    ids, mask = _batch()
    plain = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS)
    again = hf_pelrp.attribute(model, ids, attention_mask=mask, config=OFFSETS, gradient_checkpointing=True)
    assert torch.equal(plain.position_by_offset, again.position_by_offset)
    assert torch.equal(plain.content_by_offset, again.content_by_offset)


def test_offsets_with_a_conservative_softmax_rule_is_refused():
    """The split reads the scores' relevance under AttnLRP's own softmax rule; another rule is refused by name."""
    from hf_pelrp.config import LRPConfig

    with pytest.raises(ValueError, match="softmax='identity'.*use softmax='gxi' with offsets=True"):
        LRPConfig(offsets=True, softmax="identity")
