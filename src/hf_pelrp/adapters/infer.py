"""Declarations inferred for model types that have none ("the way a new release looks").

A new transformers release often adds a model type whose parts hf_pelrp already knows: the LLaMA layout under
new class names, a known norm, a known activation, a gated MLP, attention through transformers' attention
interface with rotary positions. For such a type :func:`infer_adapter` builds the declaration from the module
tree and the config of a tiny float64 instance of the same classes:

- **norms are recognised by what they compute**: every parameter-only leaf module is run on its recorded input
  and on a synthetic input (offset mean, tiny variance, so that the mean subtraction and the epsilon matter), and
  the surrogate that reproduces the module's own output (``w x / rms``, ``(1 + w) x / rms``, LayerNorm with or
  without weight / bias, with the module's epsilon or a fixed one) becomes its declaration — the check the
  :class:`~hf_pelrp.hooks.Norm` rule repeats at every call;
- element-wise activations are those with an identity rule (:data:`~hf_pelrp.adapters.norms.ACTIVATIONS`);
- an MLP (linear layers around one activation) is **gated** when the input of its output projection equals
  ``act(gate) * up`` (or ``act(gate_up[:half]) * gate_up[half:]`` for a fused projection) on the recorded
  values, plain when it equals ``act(...)``; anything else is refused;
- attention is the module of each block whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS``; its
  positions are rotary when it receives the ``position_embeddings`` pair: the order of the pair (``cos`` is
  the one equal to the scaling at position 0), and the layout from the width of ``cos`` against the rotary
  width of the config (``head_dim x partial_rotary_factor`` or ``rotary_dim``): equal = the LLaMA layout
  (full, partial, or interleaved pairs with a repeated ``cos``), half = GPT-J's narrow interleaved layout.
  A layer that receives the pair but does not rotate (NoPE: the logits do not change when that layer alone gets
  the identity rotation) is refused: check_adapter's one-layer rotary split would not see the wrong 1/2 there.
  The tiny instance keeps one layer of every kind the per-layer config lists describe;
- a mixture of experts: fused experts (3-D ``gate_up_proj`` / ``down_proj``) and a top-k router returning
  ``(logits, weights, index)`` get the rules of :mod:`hf_pelrp.adapters.moe`, whose re-computation is checked
  against the modules' outputs at every call (a router that is not a softmax top-k fails there).

Whatever it cannot place is refused, naming the module and what is unknown about it (a parameter-free module
with no identity rule, an embedding table that is not the input embedding, a container that is none of the
parts above, an encoder or additive positions, which need an explicit declaration). The inferred declaration is
then **proven** by :func:`hf_pelrp.check_adapter` on a tiny float64 instance of the same config class and model
class before the first attribution (cached per model class, module classes and config), so an inference mistake
is an error, never a silent map.
:func:`describe_adapter` shows the declaration and the code that registers it explicitly.

Model types refused by name (:mod:`hf_pelrp.adapters.refusals`) are never inferred.
"""

from __future__ import annotations

import copy
import inspect
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..positions import Rotary
from ..rules import layer_norm_identity, rms_norm_identity
from . import base as _base
from .base import _PRIMITIVE_NAMES, PRIMITIVES, Adapter, GatedProduct
from .gemma import final_logit_softcap
from .llama import DECODER_INPUTS
from .moe import MixtureOfExperts
from .norms import ACTIVATIONS, _eps, layer_norm, rms_norm, rms_norm_one_plus

__all__ = ["FixedEpsNorm", "describe_adapter", "infer_adapter", "inferred_adapters", "layer_norm_one_plus"]

_LOCK = threading.RLock()
#: (model class, its module classes, its config) -> the proven declaration: the config is part of the key, since
#: options such as the layer types decide what the proof covers (a NoPE layer, a norm on q and k)
_PROVEN: dict[tuple[type, frozenset[type], str], Adapter] = {}
#: the same key -> why it was refused (inference or proof), so a refusal costs its minute once
_REFUSED: dict[tuple[type, frozenset[type], str], str] = {}
#: model class -> the declaration being proven (the proof attributes tiny instances of that class)
_PROVING: dict[type, Adapter] = {}

#: sizes of the tiny instances the inference probes and check_adapter proves the declaration on
_TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 97,
}
_PROBE_LENGTH = 6
_TOL = 1e-5


@dataclass(frozen=True)
class FixedEpsNorm:
    """A norm surrogate with an epsilon written into the module's forward (no ``eps`` attribute), e.g.
    ``FixedEpsNorm("layer_norm", 1e-5)`` for ``F.layer_norm(x, None, None, eps=1e-5)``."""

    kind: str
    eps: float

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms_norm":
            return module.weight * rms_norm_identity(x, self.eps).to(x.dtype)
        return layer_norm_identity(
            x, getattr(module, "weight", None), getattr(module, "bias", None), self.eps
        )


def layer_norm_one_plus(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std * (1 + w) + b`` with ``std`` detached (Nemotron's ``LayerNorm1P``): the identity rule
    of a LayerNorm whose weight is stored minus one."""
    return layer_norm_identity(x, module.weight + 1.0, getattr(module, "bias", None), _eps(module))


_SURROGATES: tuple[tuple[str, Any], ...] = (
    ("rms_norm", rms_norm),
    ("rms_norm_one_plus", rms_norm_one_plus),
    ("layer_norm", layer_norm),
    ("layer_norm_one_plus", layer_norm_one_plus),
    *(
        (f"FixedEpsNorm({kind!r}, {eps!r})", FixedEpsNorm(kind, eps))
        for kind in ("layer_norm", "rms_norm")
        for eps in (1e-5, 1e-6, 1e-12)
    ),
)


class _Unplaced(UnsupportedModelError):
    pass


def _refuse(model: nn.Module, path: str, module: nn.Module | None, what: str) -> _Unplaced:
    where = f"module {path or '<model>'!r} ({type(module).__name__}) of " if module is not None else ""
    return _Unplaced(
        f"{where}{type(model).__name__}: {what} Declare the model type explicitly (register_adapter, see the "
        "README's 'Adding an architecture') if it is covered by the rules."
    )


# ---- the public entry points -----------------------------------------------------------------------------------


def infer_adapter(model: nn.Module) -> Adapter:
    """The declaration inferred for ``model`` (whose model type has none), proven by check_adapter on a tiny
    float64 instance of its classes; cached per model class. Raises :class:`UnsupportedModelError` naming what
    it cannot place, or the checks the inferred declaration failed."""
    cls = type(model)
    with _LOCK:
        if cls in _PROVING:
            return _PROVING[cls]
        key = (cls, frozenset(type(m) for m in model.modules()), _config_key(model.config))
        if key in _PROVEN:
            return _PROVEN[key]
        if key in _REFUSED:
            raise UnsupportedModelError(_REFUSED[key])
        try:
            with torch.random.fork_rng(devices=[]):
                # (the caller's check_model then refuses a module of the user's instance the tiny one lacks)
                try:
                    adapter, tiny = _infer(model)
                except UnsupportedModelError:
                    raise
                except Exception as err:  # noqa: BLE001 - the tiny instance does not run as probed: refused
                    raise _refuse(
                        model,
                        "",
                        None,
                        f"probing a tiny float64 instance failed ({type(err).__name__}: {err}).",
                    ) from err
                _prove(model, adapter, tiny)
        except UnsupportedModelError as err:
            _REFUSED[key] = str(err)
            raise
        _PROVEN[key] = adapter
        return adapter


def _config_key(config: Any) -> str:
    """The config's values, without those that do not change the computation (name, versions, dtype)."""
    try:
        values = config.to_dict()
    except Exception:  # noqa: BLE001 - a config that does not serialise: keyed by identity
        return f"id:{id(config)}"
    for name in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        values.pop(name, None)
    return repr(sorted(values.items(), key=lambda item: item[0]))


def inferred_adapters() -> dict[str, Adapter]:
    """The inferred (and proven) declarations so far, by model class name."""
    return {cls.__name__: adapter for (cls, _, _), adapter in _PROVEN.items()}


def describe_adapter(model: nn.Module, *, print_it: bool = True) -> str:
    """The declaration hf_pelrp uses for ``model``: for an inferred one, what was inferred and the code that
    registers it explicitly (``register_adapter``); for a registered one, where it is declared."""
    adapter = _base.adapter_for(model)
    model_type = getattr(model.config, "model_type", "?")
    registered = model_type in _base._REGISTRY and adapter in _base.adapter_variants(model_type)
    if registered:
        text = (
            f"{type(model).__name__} ({model_type!r}): the registered declaration {adapter.label!r} "
            f"({type(adapter.positions).__name__} positions, {len(adapter.norms)} norm classes, "
            f"{len(adapter.gated)} gated products); see hf_pelrp.adapters."
        )
    else:
        text = (
            f"{type(model).__name__} ({model_type!r}) has no registered declaration; this one was inferred from its "
            "module tree and config and proven by hf_pelrp.check_adapter on a tiny float64 instance. To make it "
            "explicit (and skip the inference):\n\n" + adapter_code(adapter)
        )
    if print_it:
        print(text)
    return text


def adapter_code(adapter: Adapter) -> str:
    """Python code registering ``adapter`` (a declaration the inference builds)."""
    norms = ", ".join(f"{name!r}: {_surrogate_name(fn)}" for name, fn in adapter.norms.items())
    lines = [
        "from hf_pelrp.adapters import Adapter, GatedProduct, register_adapter",
        "from hf_pelrp.adapters.gemma import final_logit_softcap",
        "from hf_pelrp.adapters.infer import FixedEpsNorm, layer_norm_one_plus",
        "from hf_pelrp.adapters.llama import DECODER_INPUTS",
        "from hf_pelrp.adapters.norms import layer_norm, rms_norm, rms_norm_one_plus",
        "from hf_pelrp.positions import Rotary",
        "",
        "register_adapter(",
        "    Adapter(",
        f"        model_types={adapter.model_types!r},",
        f"        name={adapter.name!r},",
        f"        layers={adapter.layers!r},",
        f"        attention={adapter.attention!r},",
        f"        embeddings={dict(adapter.embeddings)!r},",
        f"        positions=Rotary(names={adapter.positions.names!r}, layout={adapter.positions.layout!r}),",
        f"        norms={{{norms}}},",
        f"        modules={adapter.modules!r},",
        f"        gated={adapter.gated!r},",
        "        inputs=DECODER_INPUTS,",
        f"        heads={adapter.heads!r},",
    ]
    if adapter.extra_rules is final_logit_softcap:
        lines.append("        extra_rules=final_logit_softcap,")
    if isinstance(adapter.experts, MixtureOfExperts):
        lines.insert(0, "from hf_pelrp.adapters.moe import MixtureOfExperts")
        lines.append(f"        experts={adapter.experts!r},")
    lines += ["    )", ")"]
    return "\n".join(lines) + "\n"


def _surrogate_name(fn: Any) -> str:
    for name, candidate in _SURROGATES:
        if candidate is fn or candidate == fn:
            return name
    raise ValueError(f"no name for the surrogate {fn!r}")


# ---- inference ---------------------------------------------------------------------------------------------------


def _tiny_config(config: Any) -> Any:
    """``config`` shrunk to a tiny instance with the same options (per-layer lists cut to two layers)."""
    tiny = copy.deepcopy(config)
    layers = getattr(config, "num_hidden_layers", None)
    for name, value in _TINY.items():
        if hasattr(tiny, name):
            setattr(tiny, name, value)
    if getattr(config, "head_dim", None) is not None:
        tiny.head_dim = 8
    kv, heads = getattr(config, "num_key_value_heads", None), getattr(config, "num_attention_heads", None)
    if kv is not None:
        tiny.num_key_value_heads = 4 if kv == heads else (1 if kv == 1 else 2)
    if getattr(config, "rotary_dim", None) is not None:
        tiny.rotary_dim = 4
    if getattr(config, "query_pre_attn_scalar", None) is not None:
        tiny.query_pre_attn_scalar = 8
    if getattr(config, "sliding_window", None) is not None:
        tiny.sliding_window = 3
    if hasattr(config, "_experts_implementation"):
        tiny._experts_implementation = "eager"  # grouped_mm has no float64 kernel on CPU
    if getattr(config, "initializer_range", None) is not None:
        tiny.initializer_range = 0.05
    if getattr(tiny, "pad_token_id", 0) is None:
        tiny.pad_token_id = 0  # the proof pads batches (a classifier refuses batches without a pad id)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= _TINY["vocab_size"]:
            setattr(tiny, name, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[name])
    if isinstance(layers, int) and layers > 1:
        # keep one layer of every kind the per-layer lists describe (sliding / global, NoPE, ...), at least two
        per_layer = {
            n: v for n, v in vars(config).items() if isinstance(v, list | tuple) and len(v) == layers
        }
        kinds: dict[tuple[str, ...], int] = {}
        for i in range(layers):
            kinds.setdefault(tuple(repr(v[i]) for v in per_layer.values()), i)
        keep = sorted(kinds.values())
        if len(keep) < 2:
            keep = [0, 1]
        tiny.num_hidden_layers = len(keep)
        for name, value in per_layer.items():
            setattr(tiny, name, type(value)(value[i] for i in keep))
    return tiny


def _dispatches_attention(module: nn.Module) -> bool:
    forward = getattr(type(module), "forward", None)
    try:
        forward = inspect.unwrap(forward) if forward is not None else None
    except ValueError:  # a wrapper cycle
        return False
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return bool(float((a - b).abs().max()) <= _TOL * scale) if b.numel() else True


def _probe(model: nn.Module) -> tuple[dict[nn.Module, tuple[Any, Any]], dict[nn.Module, Any]]:
    """One forward pass recording each module's first (input, output) and each attention's rotary pair."""
    records: dict[nn.Module, tuple[Any, Any]] = {}
    pairs: dict[nn.Module, Any] = {}
    pair_outputs: dict[nn.Module, list[torch.Tensor]] = {}
    handles = []

    def record(module, args, kwargs, output):
        if isinstance(output, tuple) and len(output) == 2:
            pair_outputs.setdefault(module, []).append(output[0])
        if module not in records:
            first = args[0] if args else next(iter(kwargs.values()), None)
            records[module] = (first, output)

    def rotary(module, args, kwargs):
        pairs.setdefault(module, kwargs.get("position_embeddings"))

    for module in model.modules():
        handles.append(module.register_forward_hook(record, with_kwargs=True))
        if _dispatches_attention(module):
            handles.append(module.register_forward_pre_hook(rotary, with_kwargs=True))
    try:
        ids = torch.arange(1, _PROBE_LENGTH + 1).reshape(1, -1) + 3
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    # every pair a module returned (a rotary embedding called once per layer type), for _is_rotary_embedding
    for module, outputs in pair_outputs.items():
        if module in records:
            records[module] = (records[module][0], records[module][1], outputs)
    return records, pairs


def _norm_surrogate(module: nn.Module, record: tuple[Any, Any] | None) -> Any:
    """The surrogate reproducing ``module`` on its recorded input and on a synthetic one, or None."""
    if record is None or not isinstance(record[0], torch.Tensor) or not isinstance(record[1], torch.Tensor):
        return None
    x, y = record[0], record[1]
    gen = torch.Generator().manual_seed(7)
    synthetic = (torch.randn(x.shape, generator=gen, dtype=torch.float64) * 0.003 + 0.002).to(x.dtype)
    with torch.no_grad():
        try:
            y_synthetic = module(synthetic)
        except Exception:  # noqa: BLE001 - a module that is not a function of one tensor is no norm
            return None
        if not isinstance(y_synthetic, torch.Tensor):
            return None
        for _, fn in _SURROGATES:
            try:
                if _close(fn(module, x), y) and _close(fn(module, synthetic), y_synthetic):
                    return fn
            except Exception:  # noqa: BLE001,S112 - a surrogate that does not apply is not this norm
                continue
    return None


def _mlp_product(
    model: nn.Module, path: str, mlp: nn.Module, records: dict[nn.Module, tuple[Any, Any]]
) -> tuple[str, str, str | None] | None:
    """``(act, up, up_channels)`` names inside ``mlp`` when it computes ``down(act(gate) * up)``; None when it
    computes ``down(act(fc))``; refused otherwise."""
    children = dict(mlp.named_children())
    acts = [n for n, c in children.items() if isinstance(c, ACTIVATIONS)]
    linears = [
        n for n, c in children.items() if isinstance(c, nn.Linear) or type(c).__name__ in _PRIMITIVE_NAMES
    ]
    if len(acts) != 1 or mlp not in records or any(children[n] not in records for n in acts + linears):
        raise _refuse(
            model, path, mlp, "an MLP the inference cannot read (not one activation between linears)."
        )
    act_name = acts[0]
    act_in, act_out = records[children[act_name]][:2]
    x = records[mlp][0]
    downs = [n for n in linears if not _close(records[children[n]][0], x)]
    if len(downs) != 1:
        raise _refuse(model, path, mlp, "an MLP without a single output projection.")
    down_in = records[children[downs[0]]][0]
    if _close(down_in, act_out):
        return None
    for name in linears:
        if name == downs[0]:
            continue
        out = records[children[name]][1]
        if out.shape == act_out.shape and _close(down_in, act_out * out):
            return act_name, name, None
        width = out.shape[-1]
        half = width // 2
        if width % 2 == 0 and _close(out[..., :half], act_in) and _close(down_in, act_out * out[..., half:]):
            return act_name, name, "second_half"
    raise _refuse(
        model,
        path,
        mlp,
        "an MLP whose output projection reads neither act(gate) * up nor act(fc): its arithmetic is unknown.",
    )


def _infer(model: nn.Module) -> tuple[Adapter, Any]:
    config = model.config
    model_type = config.model_type
    cls = type(model)
    tiny = _tiny_config(config)
    torch.manual_seed(0)
    try:
        probe = cls(copy.deepcopy(tiny)).to(torch.float64).eval()
    except Exception as err:  # noqa: BLE001 - reported as the refusal
        raise _refuse(model, "", None, f"no tiny instance of its config could be built ({err}).") from None
    _proof("randomise")(probe, 0)
    base = getattr(probe, "base_model", probe)
    base_paths = {m: p for p, m in base.named_modules()}

    # blocks and attention
    layers = getattr(tiny, "num_hidden_layers", None)
    lists = [
        (p, m)
        for p, m in base.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == layers and any(map(_dispatches_attention, m.modules()))
    ]
    if not isinstance(layers, int):
        # a composite config (vision-language wrapper, encoder-decoder, speech model): its sub-models have the
        # layers, and the inference does not enter them
        raise _refuse(
            model,
            "",
            None,
            "a composite model (its config has no num_hidden_layers of its own: sub-models such as a vision "
            "tower, an encoder and a decoder, or a wrapped language model); the inference covers a single "
            "decoder stack.",
        )
    if len(lists) > 1:
        raise _refuse(
            model,
            "",
            None,
            f"several lists of attention blocks ({', '.join(p for p, _ in lists)}); the inference covers a "
            "single decoder stack.",
        )
    if len(lists) != 1:
        raise _refuse(
            model,
            "",
            None,
            "no single list of blocks whose modules dispatch attention through transformers' attention "
            "interface (a state-space or recurrent model, or attention written inline).",
        )
    layers_path, blocks = lists[0]
    prefix = next(p for p, m in probe.named_modules() if m is base)
    model_layers_path = f"{prefix}.{layers_path}" if prefix else layers_path
    attention_paths = {
        p for block in blocks for p, m in block.named_modules() if m is not block and _dispatches_attention(m)
    }
    if len(attention_paths) != 1 or not all(
        any(p == next(iter(attention_paths)) for p, _ in b.named_modules()) for b in blocks
    ):
        raise _refuse(
            model, model_layers_path, blocks[0], "blocks without exactly one attention module each."
        )
    attention_path = next(iter(attention_paths))
    attentions = [b.get_submodule(attention_path) for b in blocks]
    if not all(getattr(a, "is_causal", False) for a in attentions):
        raise _refuse(
            model,
            f"{model_layers_path}.0.{attention_path}",
            attentions[0],
            "bidirectional (encoder) attention: the inference covers causal decoders only.",
        )

    records, pairs = _probe(probe)
    positions = _rotary_kind(model, tiny, attentions, pairs, f"{model_layers_path}.0.{attention_path}")
    _refuse_layers_ignoring_rotary(model, probe, model_layers_path, attention_path, attentions, positions)

    # every module: placed or refused
    embed = probe.get_input_embeddings()
    block_set, attention_set = set(blocks), set(attentions)
    modules: list[str] = []
    norms: dict[str, Any] = {}
    gated: dict[tuple[str, str, str | None], int] = {}
    routers: list[nn.Module] = []
    experts: list[nn.Module] = []
    # leaves first: an unknown activation is named as itself, not as the MLP around it
    ordered = sorted(probe.named_modules(), key=lambda item: bool(list(item[1].children())))
    for path, module in ordered:
        name = type(module).__name__
        if module is probe or module is base or module in block_set or module in attention_set:
            modules.append(name)
            continue
        if isinstance(module, PRIMITIVES) or name in _PRIMITIVE_NAMES or isinstance(module, ACTIVATIONS):
            continue
        if isinstance(module, nn.Embedding):
            if module is not embed:
                raise _refuse(
                    model,
                    path,
                    module,
                    "an embedding table other than the input embedding (additive positions, token types?): "
                    "the inference covers rotary decoders only, and its relevance would be lost.",
                )
            continue
        if _is_rotary_embedding(module, records.get(module), pairs):
            modules.append(name)  # the rotary embedding: its (cos, sin) are the leaves
            continue
        children = list(module.children())
        if _is_router(module, records.get(module)):
            routers.append(module)
            modules.append(name)
            continue
        if _is_fused_experts(module):
            experts.append(module)
            modules.append(name)
            continue
        if children and _is_mixture_block(module, routers, experts):
            modules.append(name)
            continue
        if not children:
            surrogate = _norm_surrogate(module, records.get(module))
            if surrogate is not None:
                if norms.get(name, surrogate) != surrogate:
                    raise _refuse(model, path, module, "instances of one norm class compute different norms.")
                norms[name] = surrogate
                continue
            if not list(module.parameters()):
                raise _refuse(
                    model,
                    path,
                    module,
                    "a parameter-free module hf_pelrp has no rule for (an activation with no LRP identity rule? "
                    "supported: GELU variants, ReLU, SiLU, tanh, ...): its relevance would not be conserved.",
                )
            raise _refuse(
                model,
                path,
                module,
                "a module with parameters that is none of the norms hf_pelrp knows (w x / rms, (1 + w) x / rms, "
                "LayerNorm, (1 + w) LayerNorm) on its own output (an activation with parameters has no identity "
                "rule in hf_pelrp).",
            )
        if all(
            isinstance(c, PRIMITIVES + ACTIVATIONS) or type(c).__name__ in _PRIMITIVE_NAMES for c in children
        ):
            product = _mlp_product(model, path, module, records)
            block = next((b for b in blocks if any(m is module for m in b.modules())), None)
            if product is not None:
                if block is None:
                    raise _refuse(model, path, module, "a gated MLP outside the blocks.")
                rel = next(p for p, m in block.named_modules() if m is module)
                act, up, channels = product
                key = (f"{rel}.{act}", f"{rel}.{up}", channels)
                gated[key] = gated.get(key, 0) + 1
            modules.append(name)
            continue
        raise _refuse(
            model,
            path,
            module,
            "a container that is none of the parts the inference knows (model, block, attention, MLP, norm, "
            "rotary embedding): its forward may do arithmetic the rules do not cover.",
        )

    extra: dict[str, Any] = {}
    if getattr(config, "final_logit_softcapping", None) is not None:
        extra["extra_rules"] = final_logit_softcap
    if experts:
        mixture = _mixture(model, routers, experts)
        if extra:
            raise _refuse(model, "", None, "a mixture of experts with soft-capped logits: not inferred.")
        extra["experts"] = mixture
    embed_path = base_paths.get(embed)
    if embed_path is None:
        raise _refuse(model, "", embed, "the input embedding is not inside the base model.")
    adapter = Adapter(
        model_types=(model_type,),
        name=f"{model_type} (inferred from {cls.__name__})",
        layers=layers_path,
        attention=attention_path,
        embeddings={embed_path: ("token",)},
        positions=positions,
        norms=norms,
        modules=tuple(dict.fromkeys(modules)),
        gated=tuple(
            GatedProduct(act=act, up=up, up_channels=channels, optional=count < len(blocks))
            for (act, up, channels), count in gated.items()
        ),
        inputs=DECODER_INPUTS,
        heads=None,
        **extra,
    )
    return adapter, tiny


def _is_router(module: nn.Module, record: tuple[Any, ...] | None) -> bool:
    """A top-k router: a leaf with one [experts, hidden] weight returning ``(logits, weights, index)``."""
    weight = getattr(module, "weight", None)
    if record is None or list(module.children()) or not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return False
    out = record[1]
    return isinstance(out, tuple) and len(out) == 3 and not out[2].is_floating_point()


def _is_fused_experts(module: nn.Module) -> bool:
    """Fused experts: 3-D ``gate_up_proj`` / ``down_proj`` parameters and an activation child."""
    weights = [getattr(module, n, None) for n in ("gate_up_proj", "down_proj")]
    return all(isinstance(w, nn.Parameter) and w.dim() == 3 for w in weights) and isinstance(
        getattr(module, "act_fn", None), ACTIVATIONS
    )


def _is_mixture_block(module: nn.Module, routers: list[nn.Module], experts: list[nn.Module]) -> bool:
    """A sparse block holding exactly one router and one experts module (and nothing else)."""
    children = list(module.children())
    return (
        len(children) == 2
        and sum(c in routers for c in children) == 1
        and sum(_is_fused_experts(c) for c in children) == 1
        and not list(module.parameters(recurse=False))
    )


def _mixture(model: nn.Module, routers: list[nn.Module], experts: list[nn.Module]) -> MixtureOfExperts:
    """The mixture-of-experts rules of one router class and one experts class (softmax routing: the router
    rule re-computes the weights and refuses a router that computes anything else)."""
    router_names = {type(m).__name__ for m in routers}
    expert_names = {type(m).__name__ for m in experts}
    if len(router_names) != 1 or len(expert_names) != 1 or len(routers) != len(experts):
        raise _refuse(model, "", experts[0], "experts without exactly one softmax top-k router class each.")
    return MixtureOfExperts(experts=expert_names.pop(), router=router_names.pop())


def _is_rotary_embedding(
    module: nn.Module, record: tuple[Any, Any] | None, pairs: dict[nn.Module, Any]
) -> bool:
    """A parameter-free leaf whose output pair is what the attention modules receive as ``(cos, sin)``."""
    if record is None or list(module.parameters()) or list(module.children()):
        return False
    outputs = record[2] if len(record) > 2 else []
    return any(
        isinstance(p, tuple) and len(p) == 2 and any(p[0] is out for out in outputs) for p in pairs.values()
    )


def _refuse_layers_ignoring_rotary(
    model: nn.Module, probe: nn.Module, layers_path: str, attention_path: str, attentions: list, kind: Rotary
) -> None:
    """Refuse layers that receive the rotary pair but do not rotate (NoPE layers: the rotary 1/2 would reach
    q and k there): the logits must change when that layer alone gets the identity rotation."""
    ids = torch.arange(1, _PROBE_LENGTH + 1).reshape(1, -1) + 3
    with torch.no_grad():
        plain = probe(input_ids=ids).logits
    for i, attention in enumerate(attentions):

        def identity(module, args, kwargs):
            pair = kwargs.get(kind.keyword)
            cos = pair[kind.names.index("cos")]
            new = {"cos": torch.ones_like(cos), "sin": torch.zeros_like(cos)}
            return args, {**kwargs, kind.keyword: (new[kind.names[0]], new[kind.names[1]])}

        handle = attention.register_forward_pre_hook(identity, with_kwargs=True)
        try:
            with torch.no_grad():
                unrotated = probe(input_ids=ids).logits
        finally:
            handle.remove()
        if torch.equal(unrotated, plain):
            raise _refuse(
                model,
                f"{layers_path}.{i}.{attention_path}",
                attention,
                "this layer receives the rotary (cos, sin) pair but does not rotate q and k (a NoPE layer, e.g. "
                "the global layers of a sliding-window pattern): the inference cannot tell which layers rotate. "
                "Declare it with Rotary(applies=...).",
            )


def _rotary_kind(
    model: nn.Module, tiny: Any, attentions: list[nn.Module], pairs: dict[nn.Module, Any], where: str
) -> Rotary:
    got = [pairs.get(a) for a in attentions]
    if not all(isinstance(p, tuple) and len(p) == 2 for p in got):
        raise _refuse(
            model,
            where,
            attentions[0],
            "attention receives no rotary (cos, sin) pair (absolute, relative or no positions): the inference "
            "covers rotary positions only.",
        )
    first, second = got[0]
    # position 0: cos = attention scaling (constant), sin = 0
    zero_first, zero_second = first[..., 0, :], second[..., 0, :]
    if bool((zero_second == 0).all()) and not bool((zero_first == 0).all()):
        names = ("cos", "sin")
    elif bool((zero_first == 0).all()) and not bool((zero_second == 0).all()):
        names = ("sin", "cos")
    else:
        raise _refuse(model, where, attentions[0], "a rotary pair whose cos and sin cannot be told apart.")
    cos = first if names[0] == "cos" else second
    heads = tiny.num_attention_heads
    head_dim = getattr(tiny, "head_dim", None) or tiny.hidden_size // heads
    rotary_dim = getattr(tiny, "rotary_dim", None)
    if rotary_dim is None:
        params = getattr(tiny, "rope_parameters", None) or {}
        factor = params.get("partial_rotary_factor", getattr(tiny, "partial_rotary_factor", None)) or 1.0
        rotary_dim = int(head_dim * factor)
    width = cos.shape[-1]
    if width == rotary_dim:
        layout = "half"
    elif 2 * width == rotary_dim:
        layout = "interleaved"
    else:
        raise _refuse(
            model,
            where,
            attentions[0],
            f"a rotary cos of width {width} for {rotary_dim} rotary channels per head: an unknown layout.",
        )
    return Rotary(names=names, layout=layout)


#: ``check_adapter`` and its weight drawing, installed by :mod:`hf_pelrp.check` when it is imported (as
#: ``import hf_pelrp`` does): the proof needs the whole engine, which sits above the adapters
PROOF: dict[str, Any] = {}


def _proof(name: str) -> Any:
    if name not in PROOF:
        raise UnsupportedModelError(
            "an inferred declaration must be proven by hf_pelrp.check_adapter, which is not loaded: import hf_pelrp"
        )
    return PROOF[name]


def _prove(model: nn.Module, adapter: Adapter, tiny: Any) -> None:
    """check_adapter on a tiny float64 instance of ``model``'s class, with ``adapter`` in place."""
    check_adapter = _proof("check_adapter")
    cls = type(model)
    model_type = adapter.model_types[0]
    previous = _base._INFERRED.get(model_type)
    _PROVING[cls] = adapter
    _base._INFERRED[model_type] = adapter
    try:
        report = check_adapter(tiny, classes=[cls], raise_on_failure=False)
    finally:
        _PROVING.pop(cls, None)
    if not report.passed:
        if previous is None:
            _base._INFERRED.pop(model_type, None)
        else:
            _base._INFERRED[model_type] = previous
        failures = "; ".join(f"{r.name}: {r.detail}" for r in report.failures)
        raise UnsupportedModelError(
            f"the declaration inferred for {cls.__name__} ({model_type!r}) failed hf_pelrp.check_adapter on a "
            f"tiny float64 instance: {failures}. Its maps would be wrong, so it is refused; declare the model "
            "type explicitly (register_adapter)."
        )


_base._INFERENCE[:] = [infer_adapter]
