"""The model comes out of attribute() / lrp() exactly as it went in, also after an exception."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp.attention import attention_rule

pytestmark = pytest.mark.usefixtures("single_thread")


def _ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 101, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hooks(model: torch.nn.Module) -> dict[str, tuple]:
    return {
        name: (
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks),
            dict(m._forward_hooks_with_kwargs),
            dict(m._forward_pre_hooks_with_kwargs),
            dict(m._backward_hooks),
        )
        for name, m in model.named_modules()
    }


def _snapshot(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    with torch.no_grad():
        logits = model(input_ids=ids).logits.clone()
    return {
        "logits": logits,
        "hooks": _hooks(model),
        "configs": {name: m.__dict__.get("config") for name, m in model.named_modules()},
        "attn": {name: c._attn_implementation for name, c in _configs(model).items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "grad": {name: p.grad for name, p in model.named_parameters()},
        "grad_values": {
            name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
        },
    }


def _configs(model):
    return {name: m.__dict__["config"] for name, m in model.named_modules() if "config" in m.__dict__}


def _assert_restored(model: torch.nn.Module, ids: torch.Tensor, before: dict) -> None:
    after = _snapshot(model, ids)
    assert torch.equal(after["logits"], before["logits"]), "outputs changed"
    assert after["hooks"] == before["hooks"], "hooks left on the model"
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._forward_hooks_with_kwargs, name
    for name, cfg in after["configs"].items():
        assert cfg is before["configs"][name], f"{name}: config object replaced"
    assert after["attn"] == before["attn"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for name, grad in after["grad"].items():
        assert grad is before["grad"][name], f"{name}: .grad replaced"
        if grad is not None:
            assert torch.equal(grad, before["grad_values"][name]), f"{name}: .grad changed"
    assert all(attention_rule(m) is None for m in model.modules())


def _dressed_model():
    """A model in an unusual state: mixed train / eval flags, one frozen parameter, one existing .grad."""
    model = tiny_llama_family("llama")
    model.train()
    model.model.layers[1].mlp.eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.grad = torch.full_like(model.lm_head.weight, 0.5)
    return model


def test_attribute_restores_the_model():
    model = _dressed_model()
    ids = _ids()
    before = _snapshot(model, ids)
    attr = hf_pelrp.attribute(model, ids, mode="attnlrp")
    assert attr.token.abs().sum() > 0
    _assert_restored(model, ids, before)
    hf_pelrp.attribute(model, ids, mode="cp", positional=False)
    _assert_restored(model, ids, before)


def test_lrp_restores_the_model_after_an_exception():
    model = _dressed_model()
    ids = _ids()
    before = _snapshot(model, ids)
    with pytest.raises(RuntimeError, match="boom"), hf_pelrp.lrp(model) as ctx:
        # the context really changed the model: configs swapped, eval mode, rules attached
        assert model.config._attn_implementation == hf_pelrp.LRP_ATTENTION
        assert not model.training
        assert attention_rule(model.model.layers[0].self_attn) is not None
        logits = model(input_ids=ids).logits
        logits[:, -1, 3].sum().backward()
        assert ctx.maps()["token"].abs().sum() > 0
        raise RuntimeError("boom")
    _assert_restored(model, ids, before)
    # and the model can be attributed again (the context did not stay marked as active)
    hf_pelrp.attribute(model, ids)
    _assert_restored(model, ids, before)


def test_exception_in_the_forward_pass_is_also_restored():
    model = _dressed_model()
    ids = _ids()
    before = _snapshot(model, ids)
    with pytest.raises(IndexError), hf_pelrp.lrp(model):
        model(input_ids=ids + 1000)  # ids beyond the vocabulary fail inside the embedding
    _assert_restored(model, ids, before)


def _config(**kw) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        pad_token_id=0,
        **kw,
    )


def test_two_models_from_one_config_object_stay_independent():
    cfg = _config()
    torch.manual_seed(0)
    first, second = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    assert first.config is second.config  # the situation being tested
    ids = _ids()

    def plain_gradient(model):
        embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds).logits[:, -1, 5].sum().backward()
        return embeds.grad

    expected = plain_gradient(second)
    alone = hf_pelrp.attribute(first, ids)
    with hf_pelrp.lrp(first) as ctx:
        assert first.config._attn_implementation == hf_pelrp.LRP_ATTENTION
        assert second.config._attn_implementation == "sdpa" and cfg._attn_implementation == "sdpa"
        # the second model's backward pass is the plain gradient, untouched by the first one's rules
        torch.testing.assert_close(plain_gradient(second), expected, rtol=0, atol=0)
        logits = first(input_ids=ids).logits[:, -1]
        logits.gather(1, alone.target[:, None]).sum().backward()
        torch.testing.assert_close(ctx.maps()["token"], alone.token, rtol=1e-6, atol=1e-8)
    # both in a context at once: each gets its own rules and leaves
    with hf_pelrp.lrp(first) as c1, hf_pelrp.lrp(second, mode="cp") as c2:
        first(input_ids=ids).logits[:, -1, 5].sum().backward()
        second(input_ids=ids).logits[:, -1, 5].sum().backward()
        m1, m2 = c1.maps(), c2.maps()
    torch.testing.assert_close(
        m1["token"], hf_pelrp.attribute(first, ids, target=5).token, rtol=1e-6, atol=1e-8
    )
    torch.testing.assert_close(
        m2["token"], hf_pelrp.attribute(second, ids, target=5, mode="cp").token, rtol=1e-6, atol=1e-8
    )
    assert cfg._attn_implementation == "sdpa"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return path


def test_eager_attention_model_works_and_is_restored(saved_model):
    eager = LlamaForCausalLM.from_pretrained(saved_model, attn_implementation="eager").eval()
    sdpa = LlamaForCausalLM.from_pretrained(saved_model, attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager"
    ids = _ids()
    before = _snapshot(eager, ids)
    for mode in ("attnlrp", "cp"):
        a = hf_pelrp.attribute(eager, ids, mode=mode)
        b = hf_pelrp.attribute(sdpa, ids, mode=mode)
        torch.testing.assert_close(a.token, b.token, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.position_by_layer, b.position_by_layer, rtol=1e-4, atol=1e-6)
    _assert_restored(eager, ids, before)
    assert eager.config._attn_implementation == "eager"


def test_lrp_attention_selected_at_construction_equals_sdpa(saved_model):
    lrp_model = LlamaForCausalLM.from_pretrained(saved_model, attn_implementation="lrp").eval()
    sdpa = LlamaForCausalLM.from_pretrained(saved_model, attn_implementation="sdpa").eval()
    assert lrp_model.config._attn_implementation == "lrp"
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 101, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # padding goes through the registered mask function
    with torch.no_grad():
        out_lrp = lrp_model(input_ids=ids, attention_mask=mask).logits
        out_sdpa = sdpa(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out_lrp, out_sdpa)
    before = _snapshot(lrp_model, ids)
    a = hf_pelrp.attribute(lrp_model, ids, mask)
    b = hf_pelrp.attribute(sdpa, ids, mask)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=0, atol=0)
    _assert_restored(lrp_model, ids, before)


def test_hidden_layer_relevance_inside_the_context():
    model = tiny_llama_family("llama")
    ids = _ids()
    with hf_pelrp.lrp(model, mode="cp") as ctx:
        out = model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states
        assert len(hidden) == 3
        for h in hidden:
            h.retain_grad()
        logit = out.logits[:, -1, 9]
        logit.sum().backward()
        maps = ctx.maps()
        per_layer = [(h.detach() * h.grad).sum(-1) for h in hidden]
    # the first hidden state is the token-embedding leaf: same relevance as the token map
    torch.testing.assert_close(per_layer[0], maps["token"], rtol=1e-6, atol=1e-8)
    # CP mode on a bias-free model: every cut through the network carries the whole logit
    for i, rel in enumerate(per_layer):
        torch.testing.assert_close(rel.sum(-1), logit.detach(), rtol=1e-5, atol=1e-6, msg=f"hidden state {i}")
    # the last hidden state holds relevance only at the explained (last) position
    assert torch.equal(per_layer[-1][:, :-1], torch.zeros(2, ids.shape[1] - 1))
