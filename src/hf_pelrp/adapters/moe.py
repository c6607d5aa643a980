"""Mixture-of-experts decoders (``mixtral``, ``qwen2_moe``, ``qwen3_moe``): routed experts, routers, shared experts.

The rules (method.md 2, "Mixture of experts"): the router's top-k selection is a constant of the forward pass;
each routed term ``w_e(x) * E_e(x)`` is a product of two relevance-carrying factors: the uniform rule gives each
half under AttnLRP, CP-LRP makes the routing weight a constant (like a gate). Inside each expert,
``E_e(x) = down_e(act(gate_e(x)) * up_e(x))`` is a gated MLP (identity rule on ``act``, uniform rule / constant
gate at the product). A softmax router passes the weight's half on through its top-k renormalisation (the
denominator is a constant, like a norm's scale) and its softmax (AttnLRP's softmax rule, Gradient x Input).
Sigmoid gates (DeepSeek-V3's routing scores, Qwen2-MoE's shared-expert gate) are constants in both modes
("signal-take-all"): a sigmoid has no conservative rule of its own (``sigmoid(0) = 1/2``).

transformers keeps the experts of a layer as fused 3-D parameters inside one ``*Experts`` module whose forward
is dispatched by ``config._experts_implementation`` (an eager loop, ``grouped_mm``, ``batched_mm``, ...). The
:class:`RoutedExperts` rule therefore re-computes the experts' output under the rules with the module's own
parameters and keeps the module's output as the forward value (:func:`hf_pelrp.rules.straight_through`): the
outputs stay bit-identical whatever the implementation, the re-computation is checked to reproduce them, and the
expert part of the forward pass runs twice (once by the model, once for the backward pass).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LRPConfig
from ..devices import weights_on_device
from ..errors import UnsupportedModelError
from ..hooks import Handles, HookRule, LeafStore, OutputGradient, check_reproduces
from ..rules import identity_rule, scale_gradient, straight_through
from .base import GatedProduct, register_adapter
from .llama import llama_like


def expert_mixture(
    experts: nn.Module,
    x: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    *,
    gate_factor: float,
    up_factor: float,
    weight_factor: float,
    expert_factor: float,
) -> torch.Tensor:
    """``sum_k w_k E_{e_k}(x)`` of a fused ``*Experts`` module, computed with the LRP rules in the backward pass.

    ``x`` [N, H] are the token states, ``index`` [N, K] the selected experts (a constant), ``weights`` [N, K]
    their routing weights. For each selected expert ``e`` of token ``n`` (``gate, up = x W_e^gate_up``)::

        E = down_e(act(gate) * up)      identity rule on act; act gets gate_factor, up gets up_factor
        t = E * w                       E gets expert_factor, w gets weight_factor

    (AttnLRP: 1/2 everywhere, the uniform rule; CP-LRP: ``gate_factor = weight_factor = 0``: the gate and the
    routing weight are constants). An index ``>= num_experts`` (the sentinel of expert-parallel sharding) adds
    nothing, as in transformers.
    """
    out = torch.zeros_like(x)
    act = experts.act_fn
    for e in torch.unique(index).tolist():
        if e >= experts.num_experts:
            continue
        token, slot = torch.where(index == e)
        gate, up = F.linear(x[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
        # the module's own function, without its hooks: the identity rule is applied here, explicitly
        activated = identity_rule(gate, act.forward(gate))
        hidden = scale_gradient(activated, gate_factor) * scale_gradient(up, up_factor)
        expert = F.linear(hidden, experts.down_proj[e])
        term = scale_gradient(expert, expert_factor) * scale_gradient(
            weights[token, slot, None], weight_factor
        )
        out = out.index_add(0, token, term.to(out.dtype))
    return out


def _experts_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if any(v is None for v in values):
        raise UnsupportedModelError(
            "an experts module was called without (hidden_states, top_k_index, top_k_weights): not the fused "
            "experts layout the mixture-of-experts rules were written for"
        )
    return values[0], values[1], values[2]


@dataclass
class RoutedExperts(HookRule):
    """The rules of a fused ``*Experts`` module (see :func:`expert_mixture` for the factors).

    A forward hook re-computes the output with the rules, checks that it reproduces the module's own output
    (so an expert implementation with other arithmetic is refused, not explained wrongly), and returns the
    module's output with the re-computation's backward pass (:func:`hf_pelrp.rules.straight_through`).
    """

    gate_factor: float
    up_factor: float
    weight_factor: float
    expert_factor: float
    name: str = ""

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(mod, args, kwargs, output):
            x, index, weights = _experts_inputs(args, kwargs)
            if not (x.requires_grad or weights.requires_grad):
                return output
            with weights_on_device(mod):
                surrogate = expert_mixture(
                    mod,
                    x.to(output.device),
                    index.to(output.device),
                    weights.to(output.device),
                    gate_factor=self.gate_factor,
                    up_factor=self.up_factor,
                    weight_factor=self.weight_factor,
                    expert_factor=self.expert_factor,
                )
            check_reproduces(surrogate, output, self.name or type(mod).__name__, "expert re-computation")
            return straight_through(output, surrogate.to(output.dtype))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))


def softmax_routing_weights(router: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The routing weights of a softmax top-k router with the rules of method.md ("Mixture of experts").

    ``p = softmax(x W_r^T)`` (in float32, as transformers computes it), ``w_k = p_{e_k} / S`` with
    ``S = sum_k p_{e_k}`` when the router renormalises its top-k probabilities (Mixtral always; Qwen-MoE with
    ``norm_topk_prob``). ``S`` is a constant of the backward pass (a normalising scale, like a norm's: the
    weights pass their relevance on to ``p`` whole), the softmax keeps its Gradient x Input rule (AttnLRP
    Prop. 3.1) and the router's linear map the epsilon rule. The selection ``e_k`` is a constant.
    """
    logits = F.linear(x.reshape(-1, router.weight.shape[-1]), router.weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top = probs.gather(1, index)
    if getattr(router, "norm_topk_prob", True):
        top = top / top.sum(dim=-1, keepdim=True).detach()
    return top


@dataclass
class SoftmaxRouter(HookRule):
    """The rules of a softmax top-k router (:func:`softmax_routing_weights`) on its ``(logits, weights, index)``
    output; the weights keep the module's values (straight-through), checked to be reproduced."""

    name: str = ""

    def attach(self, module: nn.Module, handles: Handles) -> None:
        def hook(mod, args, kwargs, output):
            logits, weights, index = output
            x = args[0] if args else kwargs["hidden_states"]
            if not x.requires_grad:
                return output
            with weights_on_device(mod):
                surrogate = softmax_routing_weights(mod, x.to(weights.device), index)
            check_reproduces(surrogate, weights, self.name or type(mod).__name__, "router re-computation")
            return logits, straight_through(weights, surrogate.to(weights.dtype)), index

        handles.append(module.register_forward_hook(hook, with_kwargs=True))


#: what the fused-experts rule re-computes: ``act(x W_gate) * (x W_up)`` with ``[gate; up]`` concatenated in one
#: [E, 2I, H] weight, a [E, H, I] down projection, no biases, no norm after the experts
_EXPERTS_LAYOUT = {
    "has_bias": False,
    "has_gate": True,
    "is_transposed": False,
    "is_concatenated": True,
    "has_post_expert_norm": False,
}


@dataclass(frozen=True)
class MixtureOfExperts:
    """The mixture-of-experts part of a family's declaration (``Adapter.experts``): its rules (call it) and its
    refusal of experts it does not describe (:meth:`check`).

    Parameters
    ----------
    experts
        Class name of the fused experts module (``MixtralExperts``).
    router
        Class name of a softmax top-k router whose weights get :class:`SoftmaxRouter` (``None``: no router rule,
        e.g. with ``routing="sigmoid"``, where the weights are constants).
    routing
        ``"softmax"``: the uniform rule at ``weight * expert`` (AttnLRP), weight constant under CP-LRP.
        ``"sigmoid"``: the weights are sigmoid scores, constants in both modes (signal-take-all): the expert
        output carries the whole term.
    constant_gates
        Model-relative module paths (``fnmatch`` patterns) of the linear layers whose output only feeds a
        sigmoid gate ``sigmoid(g(x)) * f(x)`` (Qwen2-MoE's ``shared_expert_gate``): made constants in both
        modes (signal-take-all), so ``f(x)`` carries the whole product.
    """

    experts: str
    router: str | None = None
    routing: str = "softmax"
    constant_gates: tuple[str, ...] = ()
    #: the hook rule of the router (a :class:`SoftmaxRouter` variant for routers of another layout)
    router_rule: type[HookRule] | None = None

    def __post_init__(self) -> None:
        if self.routing not in ("softmax", "sigmoid"):
            raise ValueError(f"routing must be 'softmax' or 'sigmoid', got {self.routing!r}")

    def factors(self, config: LRPConfig) -> dict[str, float]:
        """The gradient factors of :func:`expert_mixture` for ``config``."""
        if self.routing == "softmax":
            weight, expert = config.gate_factor, config.up_factor
        else:
            weight, expert = 0.0, 1.0
        return {
            "gate_factor": config.gate_factor,
            "up_factor": config.up_factor,
            "weight_factor": weight,
            "expert_factor": expert,
        }

    def __call__(
        self, model: nn.Module, config: LRPConfig, store: LeafStore
    ) -> list[tuple[nn.Module, HookRule]]:
        rules: list[tuple[nn.Module, HookRule]] = []
        factors = self.factors(config)
        for path, module in model.named_modules():
            name = type(module).__name__
            if name == self.experts:
                rules.append((module, RoutedExperts(**factors, name=f"{path} ({name})")))
            elif self.router is not None and name == self.router and factors["weight_factor"] != 0.0:
                # (CP-LRP: the weights are constants, nothing reaches the router)
                rules.append((module, (self.router_rule or SoftmaxRouter)(name=f"{path} ({name})")))
            elif any(fnmatch.fnmatchcase(path, pattern) for pattern in self.constant_gates):
                rules.append((module, OutputGradient(0.0)))
        return rules

    def check(self, model: nn.Module) -> None:
        """Refuse experts modules whose arithmetic :func:`expert_mixture` does not re-compute."""
        for path, module in model.named_modules():
            if type(module).__name__ != self.experts:
                continue
            layout = {key: getattr(module, key, value) for key, value in _EXPERTS_LAYOUT.items()}
            weights = [getattr(module, n, None) for n in ("gate_up_proj", "down_proj")]
            shaped = all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights)
            if layout != _EXPERTS_LAYOUT or not shaped or not hasattr(module, "act_fn"):
                raise UnsupportedModelError(
                    f"module {path!r} ({type(module).__name__}) is not the fused experts layout hf_pelrp's "
                    f"mixture-of-experts rules re-compute (concatenated [gate; up] 3-D weights without biases, "
                    f"a gate activation, no post-expert norm; found {layout}): its relevance would not be exact."
                )


def _moe_tiny(**overrides: Any) -> dict[str, Any]:
    # float64 instances need the eager experts loop: grouped_mm has no float64 kernel on CPU
    return {"experts_implementation": "eager", "num_experts_per_tok": 2, **overrides}


MIXTRAL = MixtureOfExperts(experts="MixtralExperts", router="MixtralTopKRouter")
QWEN2_MOE = MixtureOfExperts(
    experts="Qwen2MoeExperts", router="Qwen2MoeTopKRouter", constant_gates=("*.mlp.shared_expert_gate",)
)
QWEN3_MOE = MixtureOfExperts(experts="Qwen3MoeExperts", router="Qwen3MoeTopKRouter")

#: the gated MLP of a dense block (families that keep some blocks dense)
DENSE_MLP = GatedProduct(act="mlp.act_fn", up="mlp.up_proj", optional=True)
#: the shared expert of a mixture-of-experts block (absent in dense blocks)
SHARED_EXPERTS = GatedProduct(act="mlp.shared_experts.act_fn", up="mlp.shared_experts.up_proj", optional=True)

register_adapter(
    llama_like(
        ("mixtral",),
        "Mixtral",
        modules=("MixtralSparseMoeBlock", "MixtralExperts", "MixtralTopKRouter"),
        gated=(),
        experts=MIXTRAL,
        tiny=_moe_tiny(num_local_experts=4),
        name="mixtral",
    )
)
register_adapter(
    llama_like(
        ("qwen2_moe",),
        "Qwen2Moe",
        modules=("Qwen2MoeSparseMoeBlock", "Qwen2MoeExperts", "Qwen2MoeTopKRouter"),
        gated=(
            DENSE_MLP,
            GatedProduct(act="mlp.shared_expert.act_fn", up="mlp.shared_expert.up_proj", optional=True),
        ),
        experts=QWEN2_MOE,
        # one MoE block (routed + gated shared expert), one dense block
        tiny=_moe_tiny(
            num_experts=4,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            norm_topk_prob=True,
        ),
        name="qwen2_moe",
    )
)
register_adapter(
    llama_like(
        ("qwen3_moe",),
        "Qwen3Moe",
        modules=("Qwen3MoeSparseMoeBlock", "Qwen3MoeExperts", "Qwen3MoeTopKRouter"),
        gated=(DENSE_MLP,),
        experts=QWEN3_MOE,
        tiny=_moe_tiny(
            num_experts=4, moe_intermediate_size=16, head_dim=8, decoder_sparse_step=1, mlp_only_layers=[1]
        ),
        name="qwen3_moe",
    )
)
