"""The BART-layout encoder-decoders (mbart, marian, pegasus, blenderbot, blenderbot-small, m2m_100): the seq2seq
attribution on tiny float64 models, conservation over source + target prefix, the additive position leaves of
both sides against an explicit float64 reference (the table row of each position, written out from the
family's formula or read off its learned table, times the gradient the rules leave at the embedding sum), one
leaf per batch row for the tables that return one [T, H] block for the whole batch, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

import hf_pelrp
from hf_pelrp import AttributionInputError
from hf_pelrp.adapters import adapter_for_type
from hf_pelrp.result import Seq2SeqAttribution

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-6
FAMILIES = ("mbart", "marian", "pegasus", "blenderbot", "blenderbot-small", "m2m_100")
SINUSOIDAL = ("marian", "pegasus", "m2m_100")


def _model(model_type, cls=AutoModelForSeq2SeqLM, scale=0.3, bias_free=False, **overrides):
    config = AutoConfig.for_model(model_type, **{**adapter_for_type(model_type).tiny, **overrides})
    torch.manual_seed(0)
    model = (cls.from_config(config) if cls is AutoModelForSeq2SeqLM else cls(config)).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name and model_type in SINUSOIDAL:
                continue  # the fixed table stays what the family computes (the reference writes it out)
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            value = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale + base
            p.copy_(value * 0 if bias_free and name.endswith("bias") else value)
        for name, b in model.named_buffers():
            if bias_free and name.endswith("final_logits_bias"):
                b.zero_()
    return model


def _inputs(model):
    start = model.config.decoder_start_token_id
    gen = torch.Generator().manual_seed(3)
    src = torch.randint(3, 97, (2, 7), generator=gen)
    tgt = torch.randint(3, 97, (2, 4), generator=gen)
    tgt[:, 0] = start
    return src, tgt


def _sinusoid(rows: torch.Tensor, dim: int, family: str) -> torch.Tensor:
    """The fixed tables, written out in float64: Marian / Pegasus (``sin`` of the even frequencies in the first
    half, ``cos`` of the odd ones in the second, as the family's ``create_weight``; it rounds to float32), M2M100
    (``fairseq``: ``sin`` then ``cos`` of ``half`` frequencies ``10000 ** (-i / (half - 1))``, computed in float32)."""
    pos = rows.to(torch.float64)[:, None]
    if family == "m2m_100":
        half = dim // 2
        freq = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000) / (half - 1)))
        return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1).float().double()
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(
        torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(j, 2, rounding_mode="floor") / dim
    )
    return torch.cat([torch.sin(angle[:, 0::2]), torch.cos(angle[:, 1::2])], dim=1).float().double()


def _position_rows(model, family: str, ids: torch.Tensor, side) -> torch.Tensor:
    """[B, T, H]: the positional row each token of ``ids`` gets, from the family's own rule."""
    batch, length = ids.shape
    dim = model.config.d_model
    steps = torch.arange(length)
    if family == "m2m_100":  # numbered from padding_idx + 1 over the non-pad tokens, pad ids get the zero row
        pad = model.config.pad_token_id
        real = ids.ne(pad)
        numbers = torch.cumsum(real, dim=1) * real + pad
        rows = _sinusoid(numbers.flatten(), dim, family).view(batch, length, dim)
        return rows * real[..., None]
    if family in SINUSOIDAL:
        return _sinusoid(steps, dim, family)[None].expand(batch, -1, -1)
    offset = 2 if family == "mbart" else 0
    return side.embed_positions.weight.detach()[steps + offset][None].expand(batch, -1, -1)


def _sum_consumer(side, family: str, decoder: bool):
    """The module that receives the sum ``token + position`` first (its input is the embedding sum)."""
    if family == "mbart" or (family == "blenderbot-small" and not decoder):
        return side.layernorm_embedding
    return side.layers[0]


def _grad_at_sum(module, store):
    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if x.requires_grad:
            x.register_hook(lambda g: store.append(g.detach().clone()))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_cp_conservation_over_source_and_target_prefix(family):
    model = _model(family, bias_free=True)
    src, tgt = _inputs(model)
    attr = hf_pelrp.attribute(model, src, decoder_input_ids=tgt, mode="cp")
    assert isinstance(attr, Seq2SeqAttribution)
    assert attr.token.shape == src.shape and attr.target_token.shape == tgt.shape
    gap = (attr.conservation_gap.abs() / attr.target_value.abs()).max()
    assert float(gap) < TOL, f"{family}: CP conservation gap {float(gap):.2e}"
    # both sides carry relevance: the source through cross-attention, the prefix through self-attention
    assert float(attr.token.abs().sum()) > 0 and float(attr.target_token.abs().sum()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_position_leaves_match_the_explicit_reference_per_row(family):
    """AttnLRP: ``position`` / ``target_position`` of each row = sum over channels of the position row the family
    adds (its formula or table) times the gradient at the embedding sum, which the token and position leaves
    share. A positional table that returned one shared leaf for the batch would give every row the batch's sum."""
    model = _model(family)
    src, tgt = _inputs(model)
    base = model.get_encoder(), model.get_decoder()
    grads: tuple[list, list] = ([], [])
    handles = [_grad_at_sum(_sum_consumer(side, family, i == 1), grads[i]) for i, side in enumerate(base)]
    try:
        attr = hf_pelrp.attribute(model, src, decoder_input_ids=tgt, mode="attnlrp")
    finally:
        for h in handles:
            h.remove()
    assert grads[0] and grads[1], "the backward pass reached both embedding sums"
    for ids, side, got, g in (
        (src, base[0], attr.position, grads[0][-1]),
        (tgt, base[1], attr.target_position, grads[1][-1]),
    ):
        ref = (_position_rows(model, family, ids, side) * g).sum(-1)
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < TOL, f"{family}: position relevance vs reference, relative error {err:.2e}"
        assert float(ref.abs().min(dim=1).values.max()) > 0  # non-zero under AttnLRP
        assert not torch.allclose(got[0], got[1])  # one leaf per row: rows of different inputs differ


def _table_rows_are_the_family_formula(model, family):
    """The reference's table is the one the model adds (for the sinusoidal families)."""
    side = model.get_encoder()
    steps = torch.arange(5)
    if family == "m2m_100":
        got = side.embed_positions.weights[steps + model.config.pad_token_id + 1]
        want = _sinusoid(steps + model.config.pad_token_id + 1, model.config.d_model, family)
    else:
        got = side.embed_positions.weight[steps]
        want = _sinusoid(steps, model.config.d_model, family)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)  # float32 computed tables


@pytest.mark.parametrize("family", SINUSOIDAL)
def test_sinusoidal_tables_are_leaves_not_parameters(family):
    """The fixed sinusoidal outputs are position leaves: with ``positional=False`` they are constants that
    absorb their share (CP gap = their relevance), with ``positional=True`` CP conserves over tokens + positions,
    and the table itself is never modified."""
    model = _model(family, bias_free=True)
    _table_rows_are_the_family_formula(model, family)
    src, tgt = _inputs(model)
    table = dict(model.named_buffers()) | dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in table.items() if "embed_positions" in k}
    on = hf_pelrp.attribute(model, src, decoder_input_ids=tgt, mode="attnlrp")
    off = hf_pelrp.attribute(model, src, decoder_input_ids=tgt, mode="attnlrp", positional=False)
    assert float(on.position.abs().max()) > 0 and float(on.target_position.abs().max()) > 0
    assert float(off.position.abs().max()) == 0.0 and float(off.target_position.abs().max()) == 0.0
    # token relevance is the same whether the positions are leaves or constants (same gradients)
    torch.testing.assert_close(on.token, off.token, rtol=1e-9, atol=1e-12)
    absorbed = on.position.sum(-1) + on.target_position.sum(-1)
    torch.testing.assert_close(off.conservation_gap - on.conservation_gap, absorbed, rtol=1e-6, atol=1e-9)
    for k, v in before.items():
        assert torch.equal(dict(model.named_buffers()).get(k, dict(model.named_parameters()).get(k)), v), k


def test_m2m100_pad_ids_take_the_zero_row_and_right_padding_is_exact():
    model = _model("m2m_100")
    src, tgt = _inputs(model)
    pad = model.config.pad_token_id
    mask = torch.ones_like(src)
    mask[1, 5:] = 0
    padded = hf_pelrp.attribute(
        model, src * mask + pad * (1 - mask), attention_mask=mask, decoder_input_ids=tgt
    )
    assert float(padded.token[1, 5:].abs().max()) == 0.0 and float(padded.position[1, 5:].abs().max()) == 0.0
    alone = hf_pelrp.attribute(model, src[1:, :5], decoder_input_ids=tgt[1:])
    torch.testing.assert_close(padded.position[1:, :5], alone.position, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(padded.target_position[1:], alone.target_position, rtol=1e-9, atol=1e-12)


def test_mbart_sequence_classifier_conserves_over_source_and_shifted_target():
    from transformers import MBartForSequenceClassification

    model = _model("mbart", MBartForSequenceClassification, bias_free=True, num_labels=3)
    src, _ = _inputs(model)
    src[src == model.config.eos_token_id] = 5
    src[:, -1] = model.config.eos_token_id  # the classifier reads the last end-of-sequence token
    attr = hf_pelrp.attribute(model, src, mode="cp")
    assert isinstance(attr, Seq2SeqAttribution) and attr.target_token.shape == src.shape
    assert float((attr.conservation_gap.abs() / attr.target_value.abs()).max()) < TOL


@pytest.mark.parametrize("family", ("marian", "m2m_100", "blenderbot"))
def test_position_ids_and_too_long_prefixes_are_refused(family):
    model = _model(family)
    src, tgt = _inputs(model)
    with pytest.raises(AttributionInputError, match="position_ids"):
        hf_pelrp.attribute(model, src, decoder_input_ids=tgt, position_ids=torch.arange(7)[None])
    limit = model.config.max_position_embeddings
    long = torch.full((1, limit + 1), 5)
    long[:, 0] = model.config.decoder_start_token_id
    with pytest.raises(AttributionInputError, match="shorten the target prefix"):
        hf_pelrp.attribute(model, src[:1], decoder_input_ids=long)
    with pytest.raises(AttributionInputError):
        hf_pelrp.attribute(model, torch.full((1, limit + 1), 5), decoder_input_ids=tgt[:1])


def test_marian_with_its_own_decoder_vocabulary():
    """``share_encoder_decoder_embeddings=False``: the decoder's table (``decoder_vocab_size`` ids) is the
    ``target_token`` leaf; target ids are checked against it, not against the source vocabulary."""
    model = _model("marian", bias_free=True, share_encoder_decoder_embeddings=False, decoder_vocab_size=50)
    assert model.get_decoder().embed_tokens.num_embeddings == 50
    src, _ = _inputs(model)
    tgt = torch.tensor([[1, 49, 7, 30], [1, 3, 48, 12]])
    attr = hf_pelrp.attribute(model, src, decoder_input_ids=tgt, mode="cp")
    assert float((attr.conservation_gap.abs() / attr.target_value.abs()).max()) < TOL
    assert float(attr.target_token.abs().sum()) > 0
    with pytest.raises(AttributionInputError, match="decoder vocabulary has 50 ids"):
        hf_pelrp.attribute(model, src, decoder_input_ids=torch.tensor([[1, 60]]))


@pytest.mark.parametrize("family", ("marian", "m2m_100"))
def test_continuation_rows_equal_single_explanations(family):
    """A continuation is explained as one batch of right-padded target prefixes: each row's source and
    target-prefix maps (positions included) equal the prefix explained alone."""
    model = _model(family)
    src, tgt = _inputs(model)
    cont = tgt[0, 1:]
    rows = hf_pelrp.attribute(model, src[0], continuation_ids=cont)
    assert rows.batch_size == cont.numel()
    for s in range(cont.numel()):
        single = hf_pelrp.attribute(model, src[:1], decoder_input_ids=tgt[:1, : s + 1], target=int(cont[s]))
        torch.testing.assert_close(rows.position[s], single.position[0])
        torch.testing.assert_close(rows.target_position[s, : s + 1], single.target_position[0])
        torch.testing.assert_close(rows.target_token[s, : s + 1], single.target_token[0])


def test_check_adapter_on_marian_with_its_own_smaller_decoder_vocabulary():
    """check_adapter draws the target prefix from the decoder's table (it drew from the encoder's and ended in
    an IndexError inside the checker)."""
    from transformers import MarianConfig

    config = MarianConfig(**{**adapter_for_type("marian").tiny, "share_encoder_decoder_embeddings": False})
    config.decoder_vocab_size = 50
    assert hf_pelrp.check_adapter(config).passed
