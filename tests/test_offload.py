"""accelerate big-model dispatch: device_map / CPU / disk offload give the relevance of the model in one place."""

from __future__ import annotations

import accelerate
import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from transformers import AutoModelForCausalLM

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp.devices import execution_device

pytestmark = pytest.mark.usefixtures("single_thread")

# half the blocks on the CPU, the other half (and the head) offloaded to disk
HALF_CPU_HALF_DISK = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "disk",
    "lm_head": "disk",
}
# tied embeddings (SmolLM2): the head shares the embedding's weight, so it stays where the embedding is
# (accelerate cannot load a tied weight that is on the CPU for one module and on disk for the other)
TIED_HALF_CPU_HALF_DISK = {**HALF_CPU_HALF_DISK, "lm_head": "cpu"}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _hook_state(model: torch.nn.Module) -> list:
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), m.__dict__.get("forward"))
        for name, m in model.named_modules()
    ]


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    # tied embeddings, as SmolLM2: the tied weight lives on the CPU (embedding) and on disk (head)
    model = tiny_llama_family("llama", num_layers=2, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(3)
    return torch.randint(1, 101, (2, 10))


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_device_map_cpu_and_disk_offload_matches_plain_model(saved_llama, ids, tmp_path, mode):
    plain, folder = saved_llama
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row too
    reference = hf_pelrp.attribute(plain, ids, mask, mode=mode)
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=TIED_HALF_CPU_HALF_DISK, offload_folder=tmp_path / "offload", dtype=torch.float32
    ).eval()
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    before = _hook_state(model)
    logits_before = model(ids, attention_mask=mask).logits

    result = hf_pelrp.attribute(model, ids, mask, mode=mode)

    assert _relative(result.relevance, reference.relevance) <= 1e-5
    assert _relative(result.token, reference.token) <= 1e-5
    assert torch.equal(result.target, reference.target)
    if mode == "attnlrp":
        assert _relative(result.position_by_layer, reference.position_by_layer) <= 1e-5
        assert result.position_by_layer[:, 1].abs().sum() > 0  # the disk-offloaded layer carries relevance
    # every map on one device
    assert {t.device for t in (result.token, result.position, result.target_value)} == {torch.device("cpu")}
    # the model comes out as it went in: accelerate's hooks in place, no rule left, same outputs
    assert _hook_state(model) == before
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert torch.equal(model(ids, attention_mask=mask).logits, logits_before)


def _cpu_offload(model, tmp_path):
    return accelerate.cpu_offload(model, execution_device="cpu")


def _disk_offload(model, tmp_path):
    return accelerate.disk_offload(model, str(tmp_path / "disk"), execution_device="cpu")


def _offload_with_hook(model, tmp_path):
    return accelerate.cpu_offload_with_hook(model, execution_device="cpu")[0]


def _dispatch(model, tmp_path):
    return accelerate.dispatch_model(
        model, device_map=HALF_CPU_HALF_DISK, offload_dir=str(tmp_path / "dispatch")
    )


@pytest.mark.parametrize("place", [_cpu_offload, _disk_offload, _offload_with_hook, _dispatch])
def test_accelerate_offload_hooks_are_transparent(place, ids, tmp_path):
    reference = hf_pelrp.attribute(tiny_llama_family("llama", num_layers=2), ids)
    model = place(tiny_llama_family("llama", num_layers=2), tmp_path)
    result = hf_pelrp.attribute(model, ids)
    assert _relative(result.relevance, reference.relevance) <= 1e-5
    assert _relative(result.position_by_layer, reference.position_by_layer) <= 1e-5


def test_offload_with_gradient_checkpointing(saved_llama, ids, tmp_path):
    plain, folder = saved_llama
    reference = hf_pelrp.attribute(plain, ids)
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=TIED_HALF_CPU_HALF_DISK, offload_folder=tmp_path / "offload", dtype=torch.float32
    ).eval()
    result = hf_pelrp.attribute(model, ids, gradient_checkpointing=True)
    assert _relative(result.relevance, reference.relevance) <= 1e-5


def test_rotary_leaves_live_on_the_device_of_their_layer(ids, tmp_path):
    model = _dispatch(tiny_llama_family("llama", num_layers=2), tmp_path)
    with hf_pelrp.lrp(model) as ctx:
        model(ids)
        for layer, (cos, sin) in ((i, (v["cos"], v["sin"])) for i, v in ctx.store.layers.items()):
            device = execution_device(model.model.layers[layer].self_attn)
            assert device is not None
            assert cos.device == sin.device == device
            assert cos.is_leaf and sin.is_leaf


def test_hook_running_under_no_grad_is_refused(ids):
    class NoGrad(ModelHook):
        no_grad = True

    model = tiny_llama_family("llama", num_layers=2)
    add_hook_to_module(model.model.layers[0].mlp, NoGrad())
    with pytest.raises(hf_pelrp.UnsupportedModelError, match=r"model\.layers\.0\.mlp.*no_grad"):
        hf_pelrp.attribute(model, ids)


def test_unknown_accelerate_hook_is_refused(ids):
    class Rescale(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    model = tiny_llama_family("llama", num_layers=2)
    add_hook_to_module(model.model.layers[1].self_attn, Rescale())
    with pytest.raises(hf_pelrp.UnsupportedModelError, match=r"Rescale.*remove_hook_from_module"):
        hf_pelrp.attribute(model, ids)


def test_hf_hook_without_old_forward_is_refused(ids):
    model = tiny_llama_family("llama", num_layers=2)
    layer = model.model.layers[0]
    layer._hf_hook = ModelHook()
    layer.forward = lambda *args, **kwargs: type(layer).forward(layer, *args, **kwargs)
    with pytest.raises(hf_pelrp.UnsupportedModelError, match="_old_forward"):
        hf_pelrp.attribute(model, ids)


def test_forward_replaced_without_accelerate_hook_is_refused(ids):
    model = tiny_llama_family("llama", num_layers=2)
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, x).detach()
    with pytest.raises(hf_pelrp.UnsupportedModelError, match="forward replaced"):
        hf_pelrp.attribute(model, ids)


@pytest.mark.parametrize("layer", [0, 1])  # 0: positions of layer 1 still reach the logit, the tokens do not
def test_a_hook_that_cuts_the_backward_pass_raises_instead_of_zero_maps(ids, layer):
    model = tiny_llama_family("llama", num_layers=2)
    handle = model.model.layers[layer].register_forward_hook(lambda _m, _a, output: output.detach())
    with pytest.raises(hf_pelrp.AttributionStateError, match="no gradient reached the token embedding"):
        hf_pelrp.attribute(model, ids)
    handle.remove()
    assert torch.isfinite(hf_pelrp.attribute(model, ids).relevance).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layers_split_between_cuda_and_cpu(ids, tmp_path):
    reference = hf_pelrp.attribute(tiny_llama_family("llama", num_layers=2), ids)
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "lm_head": "disk",
    }
    model = accelerate.dispatch_model(
        tiny_llama_family("llama", num_layers=2), device_map=device_map, offload_dir=str(tmp_path / "off")
    )
    with hf_pelrp.lrp(model) as ctx:
        model(ids.cuda())
        assert ctx.store.layers[0]["cos"].device.type == "cuda"
        assert ctx.store.layers[1]["cos"].device.type == "cpu"
    result = hf_pelrp.attribute(model, ids.cuda())
    devices = {
        t.device for t in (result.token, result.position, result.position_by_layer, result.target_value)
    }
    assert len(devices) == 1
    assert _relative(result.relevance.cpu(), reference.relevance) <= 1e-4


def _other_family(name: str):
    """Tiny models of the other families, from their own test modules; returns (model factory, inputs)."""
    if name in ("gpt2", "bert"):
        from helpers.builders import tiny_bert_family, tiny_gpt2

        torch.manual_seed(2)
        inputs = {"input_ids": torch.randint(1, 50, (2, 9))}
        return (tiny_gpt2 if name == "gpt2" else lambda: tiny_bert_family("bert")), inputs
    from helpers.builders import tiny_vision

    config = tiny_vision("vit").config
    torch.manual_seed(2)
    pixels = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    return (lambda: tiny_vision("vit")), {"pixel_values": pixels, "config": "vit-paper"}


@pytest.mark.parametrize("family", ["gpt2", "bert", "vit"])
def test_disk_offload_of_the_other_families(family, tmp_path):
    # their rules read weights too (LayerNorm surrogates, the Gamma rule, ViT's class token and positions)
    make, inputs = _other_family(family)
    reference = hf_pelrp.attribute(make(), **inputs)
    model = accelerate.disk_offload(make(), str(tmp_path / "disk"), execution_device="cpu")
    result = hf_pelrp.attribute(model, **inputs)
    assert _relative(result.relevance, reference.relevance) <= 1e-5
    for name, value in reference.extras.items():
        assert _relative(result.extras[name], value) <= 1e-5
