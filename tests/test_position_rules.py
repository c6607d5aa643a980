"""What the rotary position map is, and the identity-reference split proposed as a rule variant (docs/positions.md).

1. An identity of the paper's uniform rule, pinned: per layer and slot, the PE-LRP rotary position relevance
   equals the relevance of that slot's q and k *content* (the outputs of ``q_proj`` and ``k_proj``). The 1/2
   split at ``q * cos`` and ``rotate_half(q) * sin`` gives cos / sin exactly as much as q, element by element,
   whatever the angle: even a slot whose rotation is the identity (position 0) gets position relevance.
2. The prototype of the rule variants (``evaluation._engine_gaps.rotary_split``): ``"uniform"`` reproduces the
   engine; ``"reference"`` agrees with an explicit float64 implementation of its formula (the slow reference of
   ``reference_lrp.py`` with the rotation rule replaced), and gives exactly 0 where the rotation is the identity.
"""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family
from helpers import reference_lrp
from helpers.rotary_leaves import rotary_leaf_relevance
from hf_pelrp.evaluation._engine_gaps import rotary_split
from hf_pelrp.inputs import causal_position_ids

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(dtype=torch.float64):
    return tiny_llama_family("llama", "causal_lm", num_layers=2, seed=0, initializer_range=0.15).to(dtype)


def _batch():
    """Two rows: full and left-padded (2 pads)."""
    ids = torch.randint(1, 101, (2, 7), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids * mask, mask


def _seed(model, ids, mask, target=None):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=causal_position_ids(mask)).logits[:, -1]
    target = logits.argmax(-1) if target is None else target
    return logits[torch.arange(ids.shape[0]), target], target


def test_uniform_rotary_position_map_equals_the_q_and_k_content_relevance():
    model = _model(torch.float32)
    ids, mask = _batch()
    captured = {}
    with hf_pelrp.lrp(model, mode="attnlrp", positional=True) as ctx:
        handles = []
        for i, layer in enumerate(model.model.layers):
            for name in ("q_proj", "k_proj"):

                def keep(_m, _a, out, key=(i, name)):
                    out.retain_grad()
                    captured[key] = out

                handles.append(getattr(layer.self_attn, name).register_forward_hook(keep))
        with torch.enable_grad():
            seed, _ = _seed(model, ids, mask)
            seed.sum().backward()
        maps = ctx.maps()
        for h in handles:
            h.remove()
    by_layer = maps["position_by_layer"]
    for i in range(2):
        content = sum((captured[(i, n)] * captured[(i, n)].grad).sum(-1) for n in ("q_proj", "k_proj"))
        torch.testing.assert_close(
            by_layer[:, i], content, rtol=1e-5, atol=1e-6 * by_layer.abs().max().item()
        )
    # the identity rotation (each row's first real token) still gets position relevance under the 1/2 split
    assert by_layer[0, :, 0].abs().sum() > 0 and by_layer[1, :, 2].abs().sum() > 0


def _prototype(model, ids, mask, mode, split, target):
    with hf_pelrp.lrp(model, mode=mode, positional=False) as ctx, rotary_split(model, split) as read:
        with torch.enable_grad():
            seed, _ = _seed(model, ids, mask, target)
            seed.sum().backward()
        return ctx.maps()["token"].double(), read().double()


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_uniform_prototype_reproduces_the_engine(mode):
    model = _model()
    ids, mask = _batch()
    with hf_pelrp.lrp(model, mode=mode, positional=True) as ctx, rotary_leaf_relevance(model) as leaves:
        with torch.enable_grad():
            seed, target = _seed(model, ids, mask)
            seed.sum().backward()
        engine = ctx.maps()
        per_leaf = leaves()
    token, by_layer = _prototype(model, ids, mask, mode, "uniform", target)
    scale = max(engine["token"].abs().max().item(), 1e-12)
    torch.testing.assert_close(token, engine["token"].double(), rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(by_layer, engine["position_by_layer"].double(), rtol=0, atol=1e-6 * scale)
    # cos and sin leaves read separately add up to the engine's per-layer map; sin(0) = 0
    torch.testing.assert_close(
        per_leaf.sum(2), engine["position_by_layer"].float(), rtol=0, atol=1e-6 * scale
    )
    assert per_leaf[0, :, 1, 0].abs().max() == 0
    # the engine's own per-leaf map (Attribution.position_by_leaf) is the same reading
    torch.testing.assert_close(engine["position_by_leaf"].float(), per_leaf, rtol=0, atol=1e-6 * scale)


def _reference_rotation(scale):
    """The identity-reference split written as explicit relevance rules (float64, eps -> 0): with
    ``z = q cos + rh(q) sin = q + [q (cos - s) + rh(q) sin]`` (s = 1 here), the epsilon rule over the content
    term ``q`` and the two positional terms; ``q`` keeps its own term, the angle gets the rest."""

    def rotation(q, cos, sin, r_rot, positional):
        t_sin = reference_lrp.rotate_half(q) * sin
        z = q * cos + t_sin
        ratio = reference_lrp.safe_div(r_rot, z)
        assert positional, "the variant is a rule for positional relevance"
        r_q = q * scale * ratio
        r_cos = (q * (cos - scale)) * ratio
        r_sin = t_sin * ratio
        return r_q, r_cos.sum(0), r_sin.sum(0)

    return rotation


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_reference_split_matches_its_explicit_rules(mode, monkeypatch):
    model = _model()
    ids, mask = _batch()
    scale = float(model.model.rotary_emb.attention_scaling)
    monkeypatch.setattr(reference_lrp, "_lrp_rotation", _reference_rotation(scale))
    ref = reference_lrp.reference_lrp(model, ids, mask, mode=mode, positional=True)
    token, by_layer = _prototype(model, ids, mask, mode, "reference", ref.target)
    peak = max(ref.token.abs().max().item(), 1e-12)
    # maps are float32 reads of a float64 pass
    assert (token - ref.token).abs().max().item() < 1e-6 * peak
    assert (by_layer - ref.position_by_layer).abs().max().item() < 1e-6 * peak
    if mode == "cp":
        assert by_layer.abs().max() == 0  # CP: q and k get nothing, so neither does the rotation
    else:
        assert by_layer.abs().max() > 1e-3 * peak


def test_reference_split_is_zero_where_the_rotation_is_the_identity():
    model = _model()
    ids = torch.randint(1, 101, (1, 7), generator=torch.Generator().manual_seed(12))
    pos = torch.arange(7)
    pos[4] = 0  # slot 4 gets the rotation of position 0, like a removed position
    with hf_pelrp.lrp(model, positional=False) as ctx, rotary_split(model, "reference") as read:
        with torch.enable_grad():
            logits = model(input_ids=ids, position_ids=pos[None]).logits[0, -1]
            logits.max().backward()
        by_layer = read()
        token = ctx.maps()["token"]
    assert by_layer[0, :, 0].abs().max() == 0 and by_layer[0, :, 4].abs().max() == 0
    assert by_layer[0, :, [1, 2, 3, 5, 6]].abs().sum() > 0 and token.abs().sum() > 0


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown rotary split"), rotary_split(_model(), "proportional"):
        pass


def test_reference_method_is_the_prototype():
    """The evaluation's ``attnlrp_pe_ref`` method gives the prototype's maps (its own hooks' leaves get their
    gradient through the method's backward pass, not only the engine's)."""
    from hf_pelrp.evaluation.methods import MethodSettings, explain
    from hf_pelrp.evaluation.samples import Sample

    model = _model(torch.float32)
    ids = torch.randint(1, 101, (1, 7), generator=torch.Generator().manual_seed(13))
    mask = torch.ones_like(ids)
    sample = Sample(
        0, {"input_ids": ids, "attention_mask": mask}, torch.ones(7, dtype=torch.bool), position=6
    )
    with torch.no_grad():
        target = model(input_ids=ids).logits[0, -1].argmax()
    exp = explain("attnlrp_pe_ref", model, sample, int(target), MethodSettings())
    token, by_layer = _prototype(model, ids, mask, "attnlrp", "reference", target[None])
    torch.testing.assert_close(exp.position_by_layer, by_layer[0].float())
    torch.testing.assert_close(exp.units, (token[0] + by_layer[0].sum(0)).float(), rtol=1e-5, atol=1e-6)
    assert exp.position_by_layer.abs().sum() > 0


def test_paper_aggregation_is_the_papers_recipe():
    """``attnlrp_pe_paper``: token / max|token| + normalise(sum over layers and leaves |leaf / max|leaf||), the
    normalisations of the paper's ``run_LRP`` (``single_norm=False``, absolute values), written out here."""
    from hf_pelrp.evaluation.methods import MethodSettings, explain
    from hf_pelrp.evaluation.samples import Sample

    model = _model(torch.float32)
    ids = torch.randint(1, 101, (1, 7), generator=torch.Generator().manual_seed(14))
    sample = Sample(
        0,
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        torch.ones(7, dtype=torch.bool),
        position=6,
    )
    with torch.no_grad():
        target = int(model(input_ids=ids).logits[0, -1].argmax())
    with hf_pelrp.lrp(model, positional=True) as ctx, rotary_leaf_relevance(model) as leaves:
        with torch.enable_grad():
            model(input_ids=ids).logits[0, -1, target].backward()
        token = ctx.maps()["token"][0]
        per_leaf = leaves()[0]  # [L, 2, T]
    acc = torch.zeros(7)
    for layer in range(per_leaf.shape[0]):
        for leaf in per_leaf[layer]:
            if leaf.abs().max() > 0:
                acc += (leaf / leaf.abs().max()).abs()
    expected = token / token.abs().max() + acc / acc.abs().max()
    exp = explain("attnlrp_pe_paper", model, sample, target, MethodSettings())
    torch.testing.assert_close(exp.units, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exp.position, acc / acc.abs().max(), rtol=1e-5, atol=1e-6)
