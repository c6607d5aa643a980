"""Declarations inferred for model types with none, the way a new transformers release looks: a known family's
modeling code copied under new class names and a new ``model_type`` (nothing registered for it) is explained
exactly as the original with the same weights; an unknown part is refused by name; the inferred declaration is
proven by check_adapter before the first attribution, so an inference mistake is an error."""

from __future__ import annotations

import importlib
import itertools
import linecache
import re
import sys
import types

import pytest
import torch

import hf_pelrp
from hf_pelrp import UnsupportedModelError
from hf_pelrp.adapters import infer, refuse_model_type, supported_model_types
from hf_pelrp.adapters.base import _REFUSED, _REGISTRY

pytestmark = pytest.mark.usefixtures("single_thread")

_COUNTER = itertools.count()


def copy_family(family: str, prefix: str, patch=None):
    """transformers' ``family`` config and modeling modules executed again with every ``prefix`` class renamed
    and a fresh ``model_type``: new classes, a type the registry has no declaration for."""
    new_type = f"copied_{family}_{next(_COUNTER)}"
    new_prefix = "".join(part.capitalize() for part in new_type.split("_"))
    pkg = f"transformers.models.{family}"
    modules = []
    for part in ("configuration", "modeling"):
        original = importlib.import_module(f"{pkg}.{part}_{family}")
        with open(original.__file__, encoding="utf-8") as f:
            src = f.read()
        src = src.replace(prefix, new_prefix).replace(f"configuration_{family}", f"configuration_{new_type}")
        src = re.sub(rf'model_type = "{family}"', f'model_type = "{new_type}"', src)
        if patch is not None and part == "modeling":
            src = patch(src, new_prefix)
        name = f"{pkg}.{part}_{new_type}"
        # a path beside the original's (transformers reads the family name off it); the source is in linecache
        filename = original.__file__.replace(f"{part}_{family}.py", f"{part}_{new_type}.py")
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        module = types.ModuleType(name)
        module.__package__ = pkg
        module.__file__ = filename
        sys.modules[name] = module
        exec(compile(src, filename, "exec"), module.__dict__)  # noqa: S102 - transformers' own source
        modules.append(module)
    config_module, modeling = modules
    config_class = next(
        v for k, v in vars(config_module).items() if k.startswith(new_prefix) and k.endswith("Config")
    )
    return new_type, new_prefix, config_class, modeling


SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 97,
    "pad_token_id": 0,
    "initializer_range": 0.05,
}

#: family, class prefix, the original config / causal-LM classes, extra config
FAMILIES = {
    "llama": ("llama", "Llama", "LlamaConfig", "LlamaForCausalLM", {}),
    "gemma": ("gemma", "Gemma", "GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "qwen3": ("qwen3", "Qwen3", "Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
}
#: a mixture of experts (fused experts, softmax top-k router); the eager experts loop runs in float64
MOE = {
    "mixtral": (
        "mixtral",
        "Mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2, "experts_implementation": "eager"},
    )
}
#: not explained by inference: SmolLM3 with a NoPE layer (refused, below)
NOPE = {"smollm3": ("smollm3", "SmolLM3", "SmolLM3Config", "SmolLM3ForCausalLM", {"no_rope_layers": [1, 0]})}


def _pair(key: str, patch=None):
    """(original model, copied model with the same weights, the copy's model type), float64."""
    import transformers

    family, prefix, config_name, model_name, extra = {**FAMILIES, **MOE, **NOPE}[key]
    new_type, new_prefix, config_class, modeling = copy_family(family, prefix, patch)
    torch.manual_seed(0)
    original = getattr(transformers, model_name)(getattr(transformers, config_name)(**SIZES, **extra))
    original = original.to(torch.float64).eval()
    copy_cls = getattr(modeling, model_name.replace(prefix, new_prefix))
    copied = copy_cls(config_class(**SIZES, **extra)).to(torch.float64).eval()
    copied.load_state_dict(original.state_dict())
    copied.renamed = (new_prefix, prefix)
    return original, copied, new_type


IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 60], [9, 2, 33, 71, 4, 25, 13]])


@pytest.mark.parametrize("key", ["llama", "gemma", "qwen3", "mixtral"])
def test_a_renamed_copy_is_explained_exactly_as_the_original(key):
    original, copied, new_type = _pair(key)
    assert new_type not in supported_model_types()
    for mode in ("attnlrp", "cp"):
        want = hf_pelrp.attribute(original, IDS, mode=mode)
        got = hf_pelrp.attribute(copied, IDS, mode=mode)
        for name in ("token", "position", "position_by_layer"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-6, (key, mode, name)
        assert torch.equal(got.target, want.target) and torch.equal(got.target_value, want.target_value)
    assert float(got.position.abs().sum()) == 0.0  # CP: rotary positions exactly 0
    assert float(want.position.abs().sum()) == 0.0
    # the declaration has the original's parts under the new names, and is not listed as registered
    adapter = hf_pelrp.adapter_for(copied)
    assert adapter.model_types == (new_type,) and new_type not in supported_model_types()
    new_prefix, prefix = copied.renamed
    expected = hf_pelrp.adapter_for(original)
    assert {k.replace(new_prefix, prefix): v for k, v in adapter.norms.items()} == dict(expected.norms)
    assert [(g.act, g.up) for g in adapter.gated] == [(g.act, g.up) for g in expected.gated]
    assert (adapter.layers, adapter.attention, adapter.positions) == (
        expected.layers,
        expected.attention,
        expected.positions,
    )


def test_unknown_activation_is_refused_naming_it():
    def with_squareplus(src, prefix):
        src = src.replace("self.act_fn = ACT2FN[config.hidden_act]", "self.act_fn = Squareplus()")
        return src + (
            "\n\nclass Squareplus(nn.Module):\n"
            "    def forward(self, x):\n"
            "        return (x + torch.sqrt(x * x + 4)) / 2\n"
        )

    _, copied, new_type = _pair("llama", with_squareplus)
    with pytest.raises(UnsupportedModelError) as err:
        hf_pelrp.attribute(copied, IDS)
    message = str(err.value)
    assert "'model.layers.0.mlp.act_fn' (Squareplus)" in message
    assert "no LRP identity rule" in message and repr(new_type) in message
    # refused again (cached), without re-running the inference
    with pytest.raises(UnsupportedModelError, match="Squareplus"):
        hf_pelrp.lrp(copied).__enter__()


def test_an_inference_mistake_fails_the_proof(monkeypatch):
    """A gated MLP inferred as a plain one: check_adapter's bias-free CP conservation refuses the declaration
    before anything is attributed."""
    _, copied, new_type = _pair("qwen3")
    monkeypatch.setattr(infer, "_mlp_product", lambda *args: None)
    with pytest.raises(
        UnsupportedModelError, match=r"failed hf_pelrp\.check_adapter.*bias-free CP conservation"
    ):
        hf_pelrp.attribute(copied, IDS)


def test_proven_once_per_class_and_the_random_state_is_left_alone(monkeypatch):
    _, copied, _ = _pair("llama")
    state = torch.get_rng_state()
    adapter = hf_pelrp.adapter_for(copied)
    assert torch.equal(torch.get_rng_state(), state)
    calls = []
    monkeypatch.setattr(infer, "_prove", lambda *args: calls.append(args))
    assert hf_pelrp.adapter_for(copied) is adapter and not calls


def test_describe_adapter_gives_the_code_that_makes_it_explicit():
    _, copied, new_type = _pair("gemma")
    text = hf_pelrp.describe_adapter(copied, print_it=False)
    assert "inferred" in text and "register_adapter(" in text and "rms_norm_one_plus" in text
    code = text[text.index("from hf_pelrp") :]
    saved = dict(_REGISTRY)
    try:
        exec(code, {})  # noqa: S102 - the text under test
        explicit = _REGISTRY[new_type]
        inferred = hf_pelrp.adapter_for(copied)
        for field in ("layers", "attention", "embeddings", "positions", "norms", "modules", "gated", "heads"):
            assert getattr(explicit, field) == getattr(inferred, field), field
        assert "registered declaration" in hf_pelrp.describe_adapter(copied, print_it=False)
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)
    assert "registered declaration 'llama'" in hf_pelrp.describe_adapter(_pair("llama")[0], print_it=False)


def test_explicit_refusals_stay_refusals():
    _, copied, new_type = _pair("llama")
    refuse_model_type(new_type, "refused by name for this test.")
    try:
        with pytest.raises(UnsupportedModelError, match="refused by name for this test") as err:
            hf_pelrp.attribute(copied, IDS)
        assert "inferred" not in str(err.value)
    finally:
        _REFUSED.pop(new_type, None)


def test_a_state_space_model_is_still_refused_with_the_reason():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=101)).eval()
    with pytest.raises(UnsupportedModelError, match=r"'mamba'.*Supported model types: .*llama") as err:
        hf_pelrp.attribute(model, IDS)
    # refused by name with the reason (adapters/refusals.py), never inferred
    assert "mamba" in _REFUSED and "state-space" in str(err.value)


def test_a_layer_that_receives_the_rotary_pair_but_does_not_rotate_is_refused():
    """NoPE layers (SmolLM3's no_rope_layers, the global layers of EXAONE 4 / Command R7B) are handed (cos, sin)
    and ignore them: a plain Rotary() would give their q, k the rotary 1/2, which check_adapter's one-layer
    split (layer 0 rotates) does not see. The inference finds the layer and refuses it."""
    _, copied, _ = _pair("smollm3")
    # the same class with every layer rotating is explained; the cache is per config, so the declaration proven
    # for it is not reused for the instance with a NoPE layer
    rotating = type(copied)(type(copied.config)(**SIZES, no_rope_layers=[1, 1])).to(torch.float64).eval()
    hf_pelrp.attribute(rotating, IDS)
    with pytest.raises(UnsupportedModelError, match=r"'model\.layers\.1\.self_attn' .*does not rotate"):
        hf_pelrp.attribute(copied, IDS)


def _tiny_causal_lm(model_type: str):
    """A tiny causal LM of ``model_type``: from its declaration's ``tiny`` config if it has one, else from the
    default config shrunk as the inference shrinks it."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    from hf_pelrp.check import tiny_config

    if model_type in supported_model_types():
        config = tiny_config(model_type)
    else:
        config = infer._tiny_config(AutoConfig.for_model(model_type))
    cls = getattr(transformers, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("model_type", ["helium", "flex_olmo", "granitemoeshared"])
def test_transformers_types_without_a_declaration_are_inferred_and_proven(model_type, monkeypatch):
    """Real model types of transformers 5.25 (a LLaMA-like, mixtures of experts, one with a shared expert),
    their explicit declarations taken out as for a type the next release adds: inferred from a tiny instance,
    proven by check_adapter, explained."""
    model = _tiny_causal_lm(model_type)
    monkeypatch.delitem(_REGISTRY, model_type, raising=False)
    adapter = hf_pelrp.adapter_for(model)
    assert "inferred" in adapter.name and model_type not in _REGISTRY
    assert "has no registered declaration" in hf_pelrp.describe_adapter(model, print_it=False)
    attr = hf_pelrp.attribute(model, IDS, mode="cp")
    assert float(attr.position.abs().max()) == 0.0 and bool(torch.isfinite(attr.token).all())


@pytest.mark.parametrize(
    "model_type",
    [
        "llama",
        "qwen3",
        "gemma2",
        "olmo2",
        "phi3",
        "glm",
        "nemotron",
        "cohere",
        "starcoder2",
        "granite",
        "gptj",
    ],
)
def test_the_inference_reproduces_the_explicit_declarations(model_type):
    """What the inference reads off a tiny instance of a declared family equals its hand-written declaration:
    blocks, attention, leaves, positional layout, the surrogate of every norm class, the gated products."""
    explicit = hf_pelrp.adapters.adapter_for_type(model_type)
    with torch.random.fork_rng(devices=[]):
        inferred, _ = infer._infer(_tiny_causal_lm(model_type))
    assert (inferred.layers, inferred.attention, dict(inferred.embeddings)) == (
        explicit.layers,
        explicit.attention,
        {k: v[:1] for k, v in explicit.embeddings.items()},
    )
    assert (inferred.positions.names, inferred.positions.layout) == (
        explicit.positions.names,
        explicit.positions.layout,
    )
    assert dict(inferred.norms) == dict(explicit.norms)
    assert {(g.act, g.up, g.up_channels) for g in inferred.gated} == {
        (g.act, g.up, g.up_channels) for g in explicit.gated
    }
    assert set(inferred.modules) <= set(explicit.modules) | {"LayerNorm"}
