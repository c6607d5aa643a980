"""The surrogates of normalisation layers (identity rule, AttnLRP Prop. 3.4) and the activation table.

A surrogate re-computes a norm with its normalising scale detached; the rule keeps the module's own output as
the forward value and checks that the surrogate reproduces it (:class:`hf_pelrp.hooks.Norm`), so a wrong
declaration fails loudly instead of propagating relevance through the wrong function. An adapter names the
surrogate of each of its norm classes:

- :func:`rms_norm`: ``w * x / rms(x)`` (LLaMA, Mistral, Qwen, ...; the weight multiplies after the cast back)
- :func:`rms_norm_one_plus`: ``(1 + w) * x / rms(x)`` (Gemma)
- :func:`layer_norm`: ``(x - mean) / std * w + b`` (``nn.LayerNorm`` and LayerNorms without bias / weight)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import activations as hf_act

from ..rules import layer_norm_identity, rms_norm_identity

#: element-wise activations for which the identity rule ``R_x = R_y`` is the AttnLRP rule
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    hf_act.GELUActivation,
    hf_act.NewGELUActivation,
    hf_act.FastGELUActivation,
    hf_act.QuickGELUActivation,
    hf_act.GELUTanh,
    hf_act.AccurateGELUActivation,
    hf_act.ClippedGELUActivation,
    hf_act.SiLUActivation,
    hf_act.MishActivation,
    hf_act.ReLUSquaredActivation,
    hf_act.LinearActivation,
    nn.GELU,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Hardswish,
)


def _eps(module: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, int | float):
            return float(value)
    return 1e-6


def rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``w * x / rms(x)`` with ``rms`` detached; the weight multiplies after the cast to the input dtype."""
    return module.weight * rms_norm_identity(x, _eps(module)).to(x.dtype)


def rms_norm_one_plus(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(1 + w) * x / rms(x)`` with ``rms`` detached, in float32 and cast at the end (Gemma's RMSNorm)."""
    normed = rms_norm_identity(x, _eps(module))
    return (normed * (1.0 + module.weight.float())).to(x.dtype)


def layer_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std * w + b`` with ``std`` detached; a missing weight or bias is left out."""
    return layer_norm_identity(
        x, getattr(module, "weight", None), getattr(module, "bias", None), _eps(module)
    )


def is_norm_like(module: nn.Module) -> bool:
    """Whether ``module`` looks like a normalisation layer (for a specific refusal message)."""
    if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm1d | nn.BatchNorm2d | nn.RMSNorm):
        return True
    return type(module).__name__.lower().endswith("norm")


def is_activation_like(module: nn.Module) -> bool:
    """Whether ``module`` looks like an activation (for a specific refusal message)."""
    origin = type(module).__module__
    return origin.startswith("torch.nn.modules.activation") or origin == hf_act.__name__
