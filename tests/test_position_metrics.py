"""The position-faithfulness metrics against explicit implementations on tiny models.

Every removal is re-done here by a different mechanism than the hooks of ``hf_pelrp.evaluation.positions``:
the identity rotation of a slot is the rotation of position 0, so a LLaMA called with ``position_ids[i] = 0``;
an additive row replaced by the mean row is ``inputs_embeds = wte + (mean - p_i)``; the neighbour's row is
``position_ids[i] = i + 1``; per-layer removals run the decoder layers by hand with per-layer position ids.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_llama_family
from hf_pelrp.evaluation.ground_truth import PositionalTask, ground_truth_scores
from hf_pelrp.evaluation.methods import MethodSettings, explain
from hf_pelrp.evaluation.metrics import mean_confidence_interval, student_t_quantile
from hf_pelrp.evaluation.paper_protocol import ceil_count, paper_flip
from hf_pelrp.evaluation.positions import position_flip, position_occlusion, token_position_flip
from hf_pelrp.evaluation.report import summarise
from hf_pelrp.evaluation.samples import Sample
from hf_pelrp.evaluation.tasks import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")
FRACS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _llama_lm():
    return tiny_llama_family("llama", "causal_lm", num_layers=2, seed=3, initializer_range=0.15)


def _sample(ids: torch.Tensor, causal: bool, allowed=None) -> Sample:
    n = ids.shape[-1]
    allowed = torch.ones(n, dtype=torch.bool) if allowed is None else allowed
    return Sample(
        0,
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        allowed,
        position=n - 1 if causal else None,
        readout=n - 1,
    )


def _first_k(relevance, allowed, k, most_first):
    """The first k allowed units in order of relevance (ties by index), written out by hand."""
    units = [i for i in range(len(relevance)) if allowed[i]]
    units.sort(key=lambda i: (-relevance[i] if most_first else relevance[i], i))
    return units[:k]


def _count(f, n):
    return int(math.floor(f * n + 0.5))


def _auc(ys, xs=FRACS):
    return float(np.trapezoid(ys, xs) / (xs[-1] - xs[0]))


@torch.no_grad()
def _llama_logits_with_position_ids(model, ids, position_ids):
    return model(input_ids=ids, position_ids=position_ids).logits[0, -1]


def test_rotary_position_flip_equals_position_zero():
    model = _llama_lm()
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    sample = _sample(ids, causal=True)
    target = 5
    rel = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.5, -0.2, 1.5])
    out = position_flip(model, sample, target, rel, "identity", FRACS)
    for name, most_first in (("morf", True), ("lerf", False)):
        logits, probs = [], []
        for f in FRACS:
            pos = torch.arange(7)
            pos[_first_k(rel.tolist(), [True] * 7, _count(f, 7), most_first)] = 0
            lg = _llama_logits_with_position_ids(model, ids, pos[None])
            logits.append(lg[target].item())
            probs.append(lg.softmax(-1)[target].item())
        assert out[f"pos_{name}_logit_curve"] == pytest.approx(logits, abs=1e-5)
        assert out[f"pos_{name}_prob_curve"] == pytest.approx(probs, abs=1e-6)
        assert out[f"pos_{name}_logit_auc"] == pytest.approx(_auc(logits), abs=1e-5)
    assert out["pos_lerf_minus_morf_prob_auc"] == pytest.approx(
        out["pos_lerf_prob_auc"] - out["pos_morf_prob_auc"]
    )


@torch.no_grad()
def _llama_by_hand(model, ids, layer_position_ids):
    """A LLaMA forward written out layer by layer, each layer with its own position ids (rotary only)."""
    base = model.model
    h = base.embed_tokens(ids)
    for layer, pos in zip(base.layers, layer_position_ids, strict=True):
        pe = base.rotary_emb(h, pos[None])
        h = layer(h, attention_mask=None, position_embeddings=pe)
    return model.lm_head(base.norm(h))[0, -1]


def test_per_layer_rotary_position_flip_equals_layer_by_layer_forward():
    model = _llama_lm()
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    sample = _sample(ids, causal=True)
    target = 7
    rel = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    out = position_flip(model, sample, target, rel, "identity", FRACS, prefix="poslayer")
    for name, most_first in (("morf", True), ("lerf", False)):
        logits = []
        for f in FRACS:
            cells = _first_k(rel.flatten().tolist(), [True] * 12, _count(f, 12), most_first)
            pos = torch.arange(6).repeat(2, 1)
            for c in cells:
                pos[c // 6, c % 6] = 0
            logits.append(_llama_by_hand(model, ids, pos)[target].item())
        assert out[f"poslayer_{name}_logit_curve"] == pytest.approx(logits, abs=1e-5)


def _gpt2():
    return tiny_model("gpt2", "sequence_classification", seed=4, num_labels=2)


@torch.no_grad()
def test_additive_position_flip_mean_and_neighbour():
    model = _gpt2()
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    allowed = torch.tensor([True, True, True, True, True, False])
    sample = _sample(ids, causal=False, allowed=allowed)
    rel = torch.tensor([0.1, 0.9, -0.5, 0.4, 0.2, 5.0])
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight[:6]
    for how in ("mean", "neighbour"):
        out = position_flip(model, sample, 1, rel, how, FRACS)
        logits = []
        for f in FRACS:
            removed = _first_k(rel.tolist(), allowed.tolist(), _count(f, 5), True)
            if how == "mean":
                emb = wte[ids[0]].clone()
                for i in removed:
                    emb[i] += wpe.mean(0) - wpe[i]
                lg = model(inputs_embeds=emb[None]).logits[0]
            else:
                pos = torch.arange(6)
                for i in removed:
                    pos[i] = i + 1 if i < 5 else 4
                lg = model(input_ids=ids, position_ids=pos[None]).logits[0]
            logits.append(lg[1].item())
        assert out["pos_morf_logit_curve"] == pytest.approx(logits, abs=1e-5), how
    with pytest.raises(ValueError, match="identity"):
        position_flip(model, sample, 1, rel, "identity", FRACS)


def test_position_occlusion_is_one_slot_at_a_time():
    model = _llama_lm()
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(4))
    allowed = torch.tensor([True, True, False, True, True])
    sample = _sample(ids, causal=True, allowed=allowed)
    occ = position_occlusion(model, sample, 9, "identity")
    base = _llama_logits_with_position_ids(model, ids, torch.arange(5)[None])[9]
    for i in range(5):
        pos = torch.arange(5)
        pos[i] = 0
        expected = (
            0.0 if not allowed[i] else (base - _llama_logits_with_position_ids(model, ids, pos[None])[9])
        )
        assert occ[i].item() == pytest.approx(float(expected), abs=1e-5)
    assert occ[0] == 0  # position 0 already has the identity rotation
    layer = position_occlusion(model, sample, 9, "identity", per_layer=True)
    assert layer.shape == (2, 5) and torch.all(layer[:, 2] == 0)


@torch.no_grad()
def test_token_position_flip_deletes_and_renumbers():
    model = _gpt2()
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(5))
    sample = _sample(ids, causal=False)  # readout = last token: never deleted
    rel = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, 9.0])
    out = token_position_flip(model, sample, 0, rel, FRACS)
    for name, most_first in (("morf", True), ("lerf", False)):
        logits = []
        for f in FRACS:
            gone = set(_first_k(rel.tolist(), [True] * 5 + [False], _count(f, 5), most_first))
            kept = torch.tensor([[t for i, t in enumerate(ids[0].tolist()) if i not in gone]])
            logits.append(model(input_ids=kept).logits[0, 0].item())
        assert out[f"tokpos_{name}_logit_curve"] == pytest.approx(logits, abs=1e-5)
    assert out["tokpos_morf_logit_curve"][-1] == out["tokpos_lerf_logit_curve"][-1]  # only the readout left


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@torch.no_grad()
def test_paper_flip_against_the_papers_loops():
    """The paper's ``flip_wiki`` written out: per fraction, ceil(f N) tokens inserted / replaced."""
    model = _llama_lm()
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(6))
    sample = _sample(ids, causal=True)
    x = np.array([0.3, -1.0, 2.0, 0.5, 0.7, -0.2, 1.5, 0.1])
    fracs = np.linspace(0, 1, 11)
    unk = 1
    y0 = model(ids).logits[0, -1].numpy()
    y_true = int(y0.argmax())
    out = paper_flip(model, sample, y_true, torch.tensor(x), unk)
    n = len(x)
    expect = {k: [] for k in ("gen_p", "gen_mse", "gen_logit", "least_logit", "prune_p", "prune_mse")}
    for frac in fracs:
        k = ceil_count(float(frac), n)
        inputs = torch.full_like(ids, unk)
        inputs2 = torch.full_like(ids, unk)
        for i in np.argsort(x)[::-1][:k]:
            inputs[:, i] = ids[:, i]
        for i in np.argsort(x, kind="stable")[:k]:
            inputs2[:, i] = ids[:, i]
        pruned = ids.clone()
        for i in np.argsort(x, kind="stable")[:k]:
            pruned[:, i] = unk
        y = model(inputs).logits[0, -1].numpy()
        y2 = model(inputs2).logits[0, -1].numpy()
        yp = model(pruned).logits[0, -1].numpy()
        expect["gen_p"].append(_softmax(y)[y_true])
        expect["gen_mse"].append((y0[y_true] - y[y_true]) ** 2)
        expect["gen_logit"].append(y[y_true])
        expect["least_logit"].append(y2[y_true])
        expect["prune_p"].append(_softmax(yp)[y_true])
        expect["prune_mse"].append((y0[y_true] - yp[y_true]) ** 2)
    auc = {k: float(np.trapezoid(v, fracs)) for k, v in expect.items()}
    assert out["paper_generate_au_ac"] == pytest.approx(auc["gen_p"], abs=1e-6)
    assert out["paper_generate_au_mse"] == pytest.approx(auc["gen_mse"], rel=1e-4, abs=1e-6)
    assert out["paper_merf"] == pytest.approx(auc["gen_logit"], abs=1e-5)
    assert out["paper_lerf"] == pytest.approx(auc["least_logit"], abs=1e-5)
    assert out["paper_pruning_au_ac"] == pytest.approx(auc["prune_p"], abs=1e-6)
    assert out["paper_pruning_au_mse"] == pytest.approx(auc["prune_mse"], rel=1e-4, abs=1e-6)
    assert [ceil_count(f, 10) for f in fracs] == list(range(11))  # no 0.3 * 10 = 3.0000000000000004 artefact


def test_ground_truth_scores_by_hand():
    rel = torch.tensor([9.0, 0.5, 2.0, -1.0, 3.0, 0.0])
    allowed = torch.tensor([False, True, True, True, True, True])
    # allowed order by relevance: 4 (3.0), 2 (2.0), 1 (0.5), 5 (0.0), 3 (-1.0)
    s = ground_truth_scores(rel, [2, 3], allowed)
    assert s["hit"] == 0.5
    assert s["rank"] == pytest.approx((1 + 4) / 2 / 4)
    assert s["mass"] == pytest.approx(2.0 / 5.5)
    assert ground_truth_scores(rel, [4], allowed) == {"hit": 1.0, "rank": 0.0, "mass": pytest.approx(3 / 5.5)}
    assert ground_truth_scores(-rel.abs(), [4], allowed)["mass"] == 0.0
    with pytest.raises(ValueError, match="allowed"):
        ground_truth_scores(rel, [0], allowed)


def test_positional_tasks_have_the_stated_labels():
    for kind in ("token_at_k", "pair_equal", "order_ab"):
        task = PositionalTask(kind)
        ids, labels, truth = task.generate(200, seed=0)
        assert ids.shape == (200, task.sequence_length) and (ids[:, 0] == 1).all() and (ids[:, -1] == 2).all()
        content = ids[:, 1:-1] - 3
        if kind == "token_at_k":
            assert torch.equal(labels, content[:, task.k]) and truth[0] == [task.k + 1]
        elif kind == "pair_equal":
            i, j = task.pair
            assert torch.equal(labels, (content[:, i] == content[:, j]).long())
            assert 0.35 < labels.float().mean() < 0.75
        else:
            for r in range(200):
                a, b = (content[r] == 0).nonzero().item(), (content[r] == 1).nonzero().item()
                assert labels[r] == int(a < b) and truth[r] == sorted([a + 1, b + 1])


def test_student_t_interval():
    for df, value in (
        (1, 12.706204736),
        (2, 4.302652730),
        (3, 3.182446305),
        (10, 2.228138852),
        (30, 2.042272456),
    ):
        assert student_t_quantile(0.975, df) == pytest.approx(value, abs=1e-8)
    assert student_t_quantile(0.975, 100_000) == pytest.approx(1.959963985, abs=1e-4)
    mean, ci = mean_confidence_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(4.302652730 / math.sqrt(3))


def test_summary_leaves_out_methods_without_a_family_and_marks_missing_cells():
    specs = [("pos_morf_prob_auc", "MoRF", "↓"), ("gt_units_hit", "hit", "↑")]
    records = [
        {"sample": s, "method": m, "scores": scores, "seconds": 0.1}
        for s in range(3)
        for m, scores in (
            ("a", {"pos_morf_prob_auc": 0.1 * s, "gt_units_hit": 1.0}),
            ("b", {"pos_morf_prob_auc": 0.1 * s + 0.2}),
            ("c", {"morf_prob_auc": 0.5}),
        )
    ]
    summary = summarise(records, ["a", "b", "c"], specs, [("a", "b")])
    assert set(summary["methods"]) == {"a", "b"} and "gt_units_hit" not in summary["methods"]["b"]
    diff = summary["paired"]["a - b"]["pos_morf_prob_auc"]
    assert diff["mean"] == pytest.approx(-0.2) and diff["better"] and diff["significant"]
    assert "gt_units_hit" not in summary["paired"]["a - b"]


def test_positional_ig_is_complete():
    """Integrated Gradients on the positional tensors sums to f(x) - f(reference): rotary (reference: every
    slot at position 0) and additive (every row the mean row)."""
    model = _llama_lm()
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(7))
    sample = _sample(ids, causal=True)
    exp = explain("pos_ig", model, sample, 4, MethodSettings(ig_steps=64))
    full = _llama_logits_with_position_ids(model, ids, torch.arange(6)[None])[4]
    ref = _llama_logits_with_position_ids(model, ids, torch.zeros(1, 6, dtype=torch.long))[4]
    assert exp.position.sum().item() == pytest.approx(
        (full - ref).item(), abs=2e-3 * abs(full - ref).item() + 1e-4
    )
    assert exp.position_by_layer.shape == (2, 6) and exp.units is None
    torch.testing.assert_close(exp.position_by_layer.sum(0), exp.position)

    gpt2 = _gpt2()
    sample = _sample(ids, causal=False)
    exp = explain("pos_ig", gpt2, sample, 0, MethodSettings(ig_steps=64))
    with torch.no_grad():
        wte, wpe = gpt2.transformer.wte.weight[ids[0]], gpt2.transformer.wpe.weight[:6]
        full = gpt2(input_ids=ids).logits[0, 0]
        ref = gpt2(inputs_embeds=(wte - wpe + wpe.mean(0))[None]).logits[0, 0]
    assert exp.position.sum().item() == pytest.approx(
        (full - ref).item(), abs=1e-3 * abs(full - ref).item() + 1e-4
    )


def test_ixg_reference_is_the_directional_derivative_towards_the_reference():
    """``ixg_pe_ref``: the sum over layers and slots of (x - ref) * grad is d/de f(x + e (x - ref)) at e = 0,
    differentiated here through a scalar ``e`` fed in by a hook written in the test (a finite difference is
    no good: LLaMA's RMSNorm computes its statistics in float32 even in a float64 model)."""
    model = _llama_lm().double()
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(8))
    sample = _sample(ids, causal=True)
    exp = explain("ixg_pe_ref", model, sample, 2, MethodSettings())
    e = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def hook(_m, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        return args, {**kwargs, "position_embeddings": (cos + e * (cos - 1), sin + e * sin)}

    handles = [
        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers
    ]
    try:
        (derivative,) = torch.autograd.grad(model(input_ids=ids).logits[0, -1, 2], e)
    finally:
        for h in handles:
            h.remove()
    assert exp.position.sum().item() == pytest.approx(derivative.item(), rel=1e-6, abs=1e-9)
    assert exp.position_by_layer[:, 0].abs().max() == 0  # slot 0 is at the reference already
