"""One evaluation sample: the model inputs (batch of 1) and what the tests need to know about them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AttributionInputError
from ..heads import Request, head_of, select


@dataclass
class Sample:
    """A single input to explain.

    Attributes
    ----------
    id : int
        Stable index within the task; seeds the random baseline and keys the per-sample results.
    inputs : dict
        Model inputs with a batch dimension of 1 (``input_ids`` + ``attention_mask``, or ``pixel_values``).
    allowed : BoolTensor [N]
        Units (tokens / patches) the perturbation tests may replace; special tokens (CLS, SEP) stay.
    position : int or None
        Causal language models: the position whose next-token logit is explained.
    readout : int
        The sequence row the output head reads (CLS = 0, or the last / explained token); used by rollout.
    label : int or None
        Ground-truth class, where there is one (accuracy curves).
    mask : BoolTensor [H, W] or None
        Ground-truth object mask (vision).
    text : str or None
        The text, for display.
    ground_truth : list of int or None
        Sequence indices the label depends on (positional ground-truth tasks).
    """

    id: int
    inputs: dict[str, Any]
    allowed: torch.Tensor
    position: int | None = None
    readout: int = 0
    label: int | None = None
    mask: torch.Tensor | None = None
    text: str | None = None
    ground_truth: list[int] | None = None

    @property
    def length(self) -> int:
        """Number of tokens (text) or patches (vision) the explanation covers."""
        return int(self.allowed.numel())


def explained_logits(model: torch.nn.Module, sample: Sample, inputs: dict[str, Any]) -> torch.Tensor:
    """The [B, C] logits the sample's explanation is about, read the way the engine reads them
    (:func:`hf_pelrp.heads.select`): the class logits, or for a causal LM the next-token logits at
    ``sample.position``. A toy model without a transformers head (the metric tests) gives its logits as they are,
    or at ``sample.position``."""
    try:
        kind = head_of(model)
    except AttributionInputError:
        logits = model(**inputs).logits
        return logits if sample.position is None else logits[:, sample.position]
    reference = next(
        v for k, v in inputs.items() if k in ("input_ids", "inputs_embeds", "pixel_values") and v is not None
    )
    mask = inputs.get("attention_mask")
    if mask is None:
        length = reference.shape[1] if kind.explains_positions else 1
        mask = torch.ones(reference.shape[0], length, dtype=torch.long, device=reference.device)
    position = sample.position if kind.explains_positions else None
    selection = select(model, kind, model, inputs, mask, Request(position=position))
    return selection.logits[:, 0]
