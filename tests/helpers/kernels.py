"""Hub kernels on a CPU, the way the ``kernels`` library binds them on a GPU.

transformers 5.25 kernelizes every model ``from_pretrained`` loads; on a CPU no kernel exists, so nothing is
bound. :func:`kernelize_on_cpu` maps the layers a LLaMA declares replaceable (``RMSNorm``, ``SiLU``, the
``rotary_pos_emb`` function of each attention) to CPU "kernels" through the library's own ``kernelize`` and
``use_kernel_mapping``: the library validates them and binds their forwards on the instances, exactly as it
binds a hub kernel on a GPU. Each kernel computes its layer's output but with a backward the LRP rules cannot
see (the output is cut from the graph and re-attached through the input), and counts its calls, so a test can
tell whether a kernel ran.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

#: calls of each CPU kernel's forward, by layer name
CALLS: Counter[str] = Counter()


def _opaque(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` in value, with the gradient of the identity in ``x`` (what a fused kernel's own backward
    may well be, and not what the LRP rules prescribe)."""
    return out.detach() + (x - x.detach()) if x.shape == out.shape else out.detach()


class RMSNormKernel(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        CALLS["RMSNorm"] += 1
        x = hidden_states.float()
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return _opaque(self.weight * out.to(hidden_states.dtype), hidden_states)


class SiLUKernel(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        CALLS["SiLU"] += 1
        return _opaque(nn.functional.silu(input), input)


class RotaryKernel(nn.Module):
    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        CALLS["rotary_pos_emb"] += 1
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

        def rotate(x):
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

        return _opaque(q * cos + rotate(q) * sin, q), _opaque(k * cos + rotate(k) * sin, k)


class _Local:
    """A kernel repository that loads a class defined here (the library's ``RepositoryProtocol``)."""

    def __init__(self, layer: type[nn.Module]):
        self.layer = layer

    def load(self) -> type[nn.Module]:
        return self.layer


MAPPING = {
    "RMSNorm": {"cpu": _Local(RMSNormKernel)},
    "SiLU": {"cpu": _Local(SiLUKernel)},
    "rotary_pos_emb": {"cpu": _Local(RotaryKernel)},
}


def kernelize_on_cpu(model: nn.Module) -> nn.Module:
    """Bind the CPU kernels on ``model``'s instances with the ``kernels`` library (``pytest.importorskip``
    it first: transformers before 5.25 does not depend on it)."""
    from kernels import Mode, kernelize, use_kernel_mapping

    with use_kernel_mapping(MAPPING, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    return model
