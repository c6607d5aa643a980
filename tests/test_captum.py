"""hf_pelrp.captum: the Captum-style PELRP class gives hf_pelrp.attribute's numbers under Captum's conventions."""

from __future__ import annotations

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family, tiny_word_tokenizer
from hf_pelrp import AttributionInputError

captum_attr = pytest.importorskip("captum.attr", reason="the captum extra is not installed")
from hf_pelrp.captum import PELRP, visualization_records  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, pad_token_id=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.copy_(
            0.5 * torch.randn_like(model.vit.embeddings.position_embeddings)
        )
    return model.eval()


def left_padded(seed: int = 1):
    torch.manual_seed(seed)
    ids = torch.randint(1, 101, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


MODELS = {"llama": tiny_llama_family, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("mode,positional", [("attnlrp", True), ("cp", True), ("attnlrp", False)])
def test_same_numbers_as_attribute(family, mode, positional):
    model = MODELS[family]()
    ids, mask = left_padded()
    target = torch.tensor([5, 17])
    ref = hf_pelrp.attribute(model, ids, mask, target=target, mode=mode, positional=positional)
    explainer = PELRP(model, mode=mode, positional=positional)

    attributions, delta = explainer.attribute(
        ids, target=target, attention_mask=mask, return_convergence_delta=True
    )
    assert attributions.shape == ids.shape
    assert torch.equal(attributions, ref.relevance)
    assert torch.equal(delta, ref.conservation_gap)

    (token, position), delta_parts = explainer.attribute(
        ids, target=target, attention_mask=mask, return_positions=True, return_convergence_delta=True
    )
    assert torch.equal(token, ref.token) and torch.equal(position, ref.position)
    torch.testing.assert_close(delta_parts, ref.conservation_gap, rtol=0, atol=1e-6)


def test_captum_conventions():
    model = tiny_llama_family()
    ids, mask = left_padded()
    explainer = PELRP(model)
    assert isinstance(explainer, captum_attr.GradientAttribution)
    assert explainer.has_convergence_delta() and explainer.multiplies_by_inputs
    assert explainer.get_name() == "PE-LRP"
    attributions, delta = explainer.attribute(
        ids, target=[5, 17], additional_forward_args=(mask,), return_convergence_delta=True
    )
    assert delta.shape == (ids.shape[0],)
    ref = hf_pelrp.attribute(model, ids, mask, target=torch.tensor([5, 17]))
    # Captum's own LRP defines the delta as output - sum(attributions): the conservation gap
    assert torch.equal(delta, captum_attr.LRP.compute_convergence_delta(None, attributions, ref.target_value))
    assert torch.equal(delta, explainer.compute_convergence_delta(attributions, ref.target_value))
    # a tuple in gives a tuple out; a single int target applies to every example
    (as_tuple,) = explainer.attribute((ids,), target=5, additional_forward_args=(mask,))
    torch.testing.assert_close(
        as_tuple[0], hf_pelrp.attribute(model, ids[:1], mask[:1], target=5).relevance[0], rtol=0, atol=1e-6
    )
    # Captum's future API: the same results as a completed Future; bad input raises at the call
    future = explainer.attribute_future(
        ids, target=[5, 17], additional_forward_args=(mask,), return_convergence_delta=True
    )
    assert isinstance(future, torch.futures.Future) and future.done()
    got, got_delta = future.wait()
    assert torch.equal(got, attributions) and torch.equal(got_delta, delta)
    with pytest.raises(AttributionInputError, match="target"):
        explainer.attribute_future(ids, target=[5], additional_forward_args=(mask,))


def test_forward_args_bind_like_captum():
    model = tiny_llama_family()
    ids, mask = left_padded()
    explainer = PELRP(model)
    by_keyword = explainer.attribute(ids, target=3, attention_mask=mask)
    # LlamaForCausalLM.forward(input_ids, attention_mask, ...): Captum would call model(ids, mask)
    assert torch.equal(explainer.attribute(ids, target=3, additional_forward_args=mask), by_keyword)
    assert torch.equal(explainer.attribute(ids, target=3, additional_forward_args=(mask,)), by_keyword)
    assert torch.equal(
        explainer.attribute(ids, target=3, additional_forward_args={"attention_mask": mask}), by_keyword
    )
    with pytest.raises(AttributionInputError, match="positional arguments"):
        explainer.attribute(ids, target=3, additional_forward_args=(mask,) * 200)


def test_embeddings_give_the_token_relevance():
    model = tiny_llama_family()
    ids, mask = left_padded()
    embeds = model.get_input_embeddings()(ids).detach()
    from_ids = PELRP(model).attribute(ids, target=3, attention_mask=mask)
    from_embeds = PELRP(model).attribute(embeds, target=3, attention_mask=mask)
    assert from_embeds.shape == ids.shape  # one value per token (summed over the hidden size)
    torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=1e-6)


def test_vision_pixels_and_parts():
    model = tiny_vit()
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 16, 16)
    ref = hf_pelrp.attribute(model, pixel_values=pixels, target=1)
    explainer = PELRP(model)
    attributions, delta = explainer.attribute(pixels, target=1, return_convergence_delta=True)
    assert attributions.shape == (2, 1, 16, 16)
    assert torch.equal(attributions[:, 0], ref.pixel_map)
    torch.testing.assert_close(delta, ref.target_value - ref.pixel_map.sum((1, 2)), rtol=0, atol=1e-5)
    (token, position), delta_parts = explainer.attribute(
        pixels, target=1, return_positions=True, return_convergence_delta=True
    )
    assert token.shape == (2, 5)  # CLS + 2 x 2 patches
    assert torch.equal(token, ref.token) and torch.equal(position, ref.position)
    torch.testing.assert_close(delta_parts, ref.conservation_gap, rtol=0, atol=1e-5)


def test_refusals():
    model = tiny_llama_family()
    ids, _ = left_padded()
    explainer = PELRP(model)
    with pytest.raises(AttributionInputError, match="tuple targets"):
        explainer.attribute(ids, target=(0, 3))
    with pytest.raises(AttributionInputError, match="continuation"):
        explainer.attribute(ids[:1], continuation_ids=ids[0, :2])
    with pytest.raises(AttributionInputError, match="one input tensor"):
        explainer.attribute((ids, ids))
    with pytest.raises(AttributionInputError, match="no baseline"):
        explainer.attribute(ids, target=3, baselines=torch.zeros_like(ids))
    with pytest.raises(AttributionInputError, match="embeddings"):
        explainer.attribute(torch.randn(2, 7))


def test_visualization_records():
    from captum.attr import visualization

    model = tiny_llama_family()
    tok = tiny_word_tokenizer()
    ids = tok(["w1 w2 w3 w4", "w5 w6 w7 w8"], return_tensors="pt").input_ids
    attributions, delta = PELRP(model).attribute(ids, target=[5, 6], return_convergence_delta=True)
    tokens = [tok.convert_ids_to_tokens(row) for row in ids]
    records = visualization_records(attributions, tokens, target=[5, 6], delta=delta)
    assert len(records) == 2
    assert records[0].word_attributions.abs().max() == pytest.approx(1.0)
    assert records[1].convergence_score == pytest.approx(float(delta[1]))
    assert records[0].attr_score == pytest.approx(float(attributions[0].sum()))
    html = visualization.format_word_importances(records[0].raw_input_ids, records[0].word_attributions)
    assert all(t in html for t in tokens[0])
