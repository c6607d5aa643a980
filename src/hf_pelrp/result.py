"""The :class:`Attribution` result: token, position (and segment) relevance of one explained logit per row."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch


@dataclass
class Attribution:
    """Relevance maps of one attribution, all detached, float32, on one device.

    Attributes
    ----------
    token : FloatTensor [B, T]
        Relevance of each token's content (``sum_d e_t * g`` at the token embedding).
    position : FloatTensor [B, T]
        Relevance of each position, signed, summed over layers for rotary models.
    relevance : FloatTensor [B, T]
        ``token + position`` (+ ``segment`` where the model has token types).
    position_by_layer : FloatTensor [B, L, T] or None
        Per-layer position relevance (cos + sin) for rotary models, else None.
    target : LongTensor [B]
        The explained class / vocabulary id of each row.
    target_value : FloatTensor [B]
        The explained logit: the seed of the backward pass.
    conservation_gap : FloatTensor [B]
        ``target_value - relevance.sum(-1)``: the relevance the rules absorbed (biases, the softmax rule).
    segment : FloatTensor [B, T] or None
        Relevance of the token-type (segment) embedding, for models that have one.
    position_index : LongTensor [B] or None
        For causal LMs, the sequence position whose next-token logit was explained.
    input_ids, attention_mask : LongTensor [B, T] or None
        The inputs, kept for display.
    mode, positional, model_type : str, bool, str
        The rules and the architecture that produced the maps.
    gamma : dict
        The generalised Gamma rule parameters in effect (``{"gamma_linear": 0.05, "gamma_conv": 100.0}`` for
        the ``vit-paper`` preset); empty when every linear and convolution layer followed the epsilon rule.
    extras : dict
        Family-specific maps (e.g. ``patch_map`` / ``pixel_map`` for vision models).
    """

    token: torch.Tensor
    position: torch.Tensor
    target: torch.Tensor
    target_value: torch.Tensor
    position_by_layer: torch.Tensor | None = None
    segment: torch.Tensor | None = None
    position_index: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    mode: str = "attnlrp"
    positional: bool = True
    model_type: str = ""
    gamma: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def relevance(self) -> torch.Tensor:
        """``token + position (+ segment)`` per sequence position, [B, T]."""
        total = self.token + self.position
        if self.segment is not None:
            total = total + self.segment
        return total

    @property
    def conservation_gap(self) -> torch.Tensor:
        """``target_value - relevance.sum(-1)``, [B]."""
        return self.target_value - self.relevance.sum(-1)

    @property
    def batch_size(self) -> int:
        return self.token.shape[0]

    def __getattr__(self, name: str) -> Any:
        # family-specific maps read like fields (attr.patch_map); dataclass fields never reach here
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __getitem__(self, index: int | slice) -> Attribution:
        """The attribution of some rows of the batch.

        Extras that are tensors or numpy arrays with the batch as their leading axis are sliced with the rows;
        other extras (lists, dicts, scalars) are passed on unchanged.
        """
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)

        batch = self.batch_size

        def take(x):
            # per-row extras (tensors or arrays with the batch as leading axis) are sliced, the rest is shared
            rows = isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim > 0 and x.shape[0] == batch
            return x[index] if rows else x

        return Attribution(
            token=take(self.token),
            position=take(self.position),
            target=take(self.target),
            target_value=take(self.target_value),
            position_by_layer=take(self.position_by_layer),
            segment=take(self.segment),
            position_index=take(self.position_index),
            input_ids=take(self.input_ids),
            attention_mask=take(self.attention_mask),
            mode=self.mode,
            positional=self.positional,
            model_type=self.model_type,
            gamma=dict(self.gamma),
            extras={k: take(v) for k, v in self.extras.items()},
        )

    def to(self, device: str | torch.device) -> Attribution:
        """A copy with every tensor (fields and tensor extras) on ``device``, e.g. ``attr.to("cpu")``."""
        device = torch.device(device)  # a device only: a dtype would turn the integer ids into floats
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        extras = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extras.items()}
        return replace(self, **moved, gamma=dict(self.gamma), extras=extras)

    def __repr__(self) -> str:
        gap = ", ".join(f"{g:.4g}" for g in self.conservation_gap.tolist()[:4])
        gamma = f", gamma={self.gamma}" if self.gamma else ""
        return (
            f"Attribution(model_type={self.model_type!r}, mode={self.mode!r}, positional={self.positional}{gamma}, "
            f"batch={self.batch_size}, seq_len={self.token.shape[-1]}, target={self.target.tolist()[:4]}, "
            f"conservation_gap=[{gap}])"
        )

    # Display and persistence live in hf_pelrp.viz and hf_pelrp.io; these methods only delegate (imported
    # lazily: the viewers pull in matplotlib and rich, which plain attribution does not need).

    def to_html(self, tokens: Any = None, path: str | None = None, **kwargs: Any) -> str:
        """Self-contained HTML view (see :func:`hf_pelrp.viz.to_html`); written to ``path`` if given.

        ``tokens=`` display strings or ``tokenizer=`` to decode ``input_ids``; ``labels=`` class names.
        """
        from .viz import to_html

        return to_html(self, tokens, path, **kwargs)

    def _repr_html_(self) -> str:
        from .viz import to_html

        return to_html(self, full_page=False)

    def show(self, tokens: Any = None, **kwargs: Any) -> None:
        """HTML in a notebook, a coloured table in a terminal (see :func:`hf_pelrp.viz.show`)."""
        from .viz import show

        show(self, tokens, **kwargs)

    def plot(self, image: Any = None, **kwargs: Any) -> Any:
        """A matplotlib figure: image overlays for vision models, bars for text (see :func:`hf_pelrp.viz.plot`)."""
        from .viz import plot

        return plot(self, image, **kwargs)

    def save_png(self, path: str, image: Any = None, **kwargs: Any) -> Any:
        """Write :meth:`plot` to ``path`` as PNG (see :func:`hf_pelrp.viz.save_png`); returns the path."""
        from .viz import save_png

        return save_png(self, path, image, **kwargs)

    def save(self, path: str) -> Any:
        """Write the attribution to ``path`` (safetensors + JSON metadata, no pickle); returns the path."""
        from .io import save_attribution

        return save_attribution(self, path)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> Attribution:
        """Read an attribution written by :meth:`save`; raises :class:`hf_pelrp.errors.AttributionFileError`
        for truncated, tampered or unknown files."""
        from .io import load_attribution

        return load_attribution(path, device=device)
