"""PE-LRP as a Captum attribution method: code written for ``captum.attr`` switches to PE-LRP in one line.

>>> from hf_pelrp.captum import PELRP                                       # doctest: +SKIP
>>> attributions, delta = PELRP(model).attribute(input_ids, target=paris,   # doctest: +SKIP
...                                              additional_forward_args=(attention_mask,),
...                                              return_convergence_delta=True)

Needs the ``captum`` extra (``pip install "hf_pelrp[captum]"``). Each call is one :func:`hf_pelrp.attribute`.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

import torch

try:
    from captum.attr import GradientAttribution
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError('hf_pelrp.captum needs captum: pip install "hf_pelrp[captum]" (captum>=0.8)') from error

from . import Attribution, AttributionInputError, LRPConfig
from .engine import explain
from .request import single_request, split_options

__all__ = ["PELRP", "visualization_records", "visualize_text"]

#: options of :func:`hf_pelrp.attribute` that do not fit Captum's one-row-per-example contract
_NOT_CAPTUM = ("continuation_ids", "generate", "max_new_tokens", "span_reduce")


class PELRP(GradientAttribution):
    """Positional-encoding-aware LRP with Captum's interface (a :class:`captum.attr.GradientAttribution`).

    ``PELRP(model).attribute(inputs, target=...)`` is one :func:`hf_pelrp.attribute` call: one forward and one
    backward pass, with the model restored afterwards.

    What ``attribute`` returns (Captum: one attribution per input feature; here the feature of slot ``i`` is
    the pair (token ``i``, position ``i``), method.md section 2):

    ==========================================  ====================================================
    ``inputs``                                   attributions
    ==========================================  ====================================================
    token ids [B, T] (text models)               ``relevance`` [B, T] = token + position (+ segment)
    embeddings [B, T, H] (``inputs_embeds``)     ``relevance`` [B, T]: one value per token, summed over H
    ``pixel_values`` [B, C, H, W] (ViT, DeiT)    ``pixel_map`` [B, 1, H, W] (broadcasts over channels)
    any, with ``return_positions=True``          ``(token, position)`` [B, T] each, plus ``segment``
                                                 when the model has token types
    ==========================================  ====================================================

    The values are relevance in logit units: they sum to the explained logit up to the convergence delta.

    Parameters
    ----------
    model
        A supported transformers model (:func:`hf_pelrp.supported_model_types`) with a causal-LM, masked-LM,
        sequence- or image-classification head. It is also Captum's ``forward_func``.
    mode, positional, config
        The rules, as in :func:`hf_pelrp.attribute` (default: the model's own default, else AttnLRP with
        positions as leaves).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mode: str | None = None,
        positional: bool | None = None,
        *,
        config: LRPConfig | str | None = None,
    ) -> None:
        super().__init__(model)
        self.model = model
        self.mode = mode
        self.positional = positional
        self.config = config

    @property
    def multiplies_by_inputs(self) -> bool:
        """Relevance is input x modified gradient, so it is already multiplied by the inputs (as Captum's LRP)."""
        return True

    def has_convergence_delta(self) -> bool:
        return True

    @classmethod
    def get_name(cls) -> str:
        """The readable name Captum shows (its default would spell the class name as ``P E L R P``)."""
        return "PE-LRP"

    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor],
        target: int | torch.Tensor | list[int] | None = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        *,
        attention_mask: torch.Tensor | None = None,
        return_positions: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Relevance of every input slot for the ``target`` logit of each example.

        Parameters
        ----------
        inputs
            Token ids [B, T], embeddings [B, T, H] (fed as ``inputs_embeds``) or, for vision models,
            ``pixel_values`` [B, C, H, W]; a 1-tuple of one of them is accepted (and a tuple comes back).
        target
            ``None`` (arg-max), an int, a list of ints or a LongTensor [B]: the class id, or for language models
            the vocabulary id of the next token (causal LMs, at each row's last real token; ``position=``
            picks another) or of the ``[MASK]`` token (masked LMs, ``position=`` and ``mask_token_id=``).
        additional_forward_args
            As Captum passes them to the model: a value or a tuple bound positionally to the parameters of
            ``model.forward`` that follow its main input (LLaMA family: ``(attention_mask,)``; GPT-2's second
            parameter is the cache, so give it ``attention_mask=`` instead). A dict is taken as keywords.
        return_convergence_delta
            Also return the convergence delta (see :meth:`compute_convergence_delta`), [B].
        attention_mask
            LongTensor [B, T] (1 = token, 0 = padding, left or right).
        return_positions
            Return the parts ``(token, position)`` (``(token, position, segment)`` for models with token types)
            instead of their sum; for images, the token-level maps [B, T] (special tokens first).
        **kwargs
            Passed on to :func:`hf_pelrp.attribute`: ``position``, ``mask_token_id``, ``foil``,
            ``gradient_checkpointing`` and model inputs (``token_type_ids``, ``interpolate_pos_encoding``, ...).

        Returns
        -------
        attributions, or ``(attributions, delta)`` with ``return_convergence_delta=True``.
        """
        if kwargs.get("baselines") is not None:
            raise AttributionInputError(
                "LRP has no baseline (it decomposes the explained logit itself, as captum.attr.LRP does): drop "
                "baselines=; the convergence delta is output - sum(attributions)"
            )
        kwargs.pop("baselines", None)
        for name in _NOT_CAPTUM:
            if kwargs.get(name) is not None:
                raise AttributionInputError(
                    f"{name}= explains a continuation (one row per generated token), which does not fit Captum's "
                    "one-attribution-per-example contract: call hf_pelrp.explain_continuation(model, ids, "
                    f"{name}=...) directly."
                )
        is_tuple = isinstance(inputs, tuple)
        if is_tuple:
            if len(inputs) != 1:
                raise AttributionInputError(
                    f"PELRP explains one input tensor (ids, embeddings or pixel values), got a tuple of {len(inputs)}"
                    "; pass the attention mask as additional_forward_args or attention_mask="
                )
            inputs = inputs[0]
        options, extra = split_options(kwargs)
        if options.get("config") is not None:
            raise AttributionInputError("give the rules to PELRP(model, config=...), not to attribute()")
        options.pop("config", None)
        model_inputs = {**self._forward_args(additional_forward_args), **extra}
        if attention_mask is not None:
            model_inputs["attention_mask"] = attention_mask
        model_inputs[self._input_name(inputs)] = inputs
        request = single_request(
            self.model,
            model_inputs,
            config=self.config,
            mode=self.mode,
            positional=self.positional,
            target=_as_target(target),
            **options,
        )
        result = explain(request)
        attributions = self._attributions(
            result, vision="pixel_values" in model_inputs, parts=return_positions
        )
        if not return_positions and is_tuple:
            attributions = (attributions,)
        if return_convergence_delta:
            delta = self.compute_convergence_delta(attributions, result.target_value)
            prefix = _target_prefix_sum(result)
            if prefix is not None:
                # an encoder-decoder's target prefix (decoder input) holds relevance too: it is explained, not
                # absorbed, so the delta is the result's conservation gap, as for every other model
                delta = delta - prefix
            return attributions, delta
        return attributions

    def compute_convergence_delta(
        self, attributions: torch.Tensor | tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        """``output - sum(attributions)`` per example, [B]: Captum's LRP definition (:class:`captum.attr.LRP`).

        LRP has no baseline: ``output`` is the explained logit (``Attribution.target_value``) and the delta is
        the relevance the rules absorbed (biases, AttnLRP's softmax rule). For the text maps and for
        ``return_positions=True`` it equals :attr:`hf_pelrp.Attribution.conservation_gap` (for encoder-decoder
        models :meth:`attribute` also subtracts the target prefix's relevance, which the source maps leave
        out: the delta is :attr:`hf_pelrp.Seq2SeqAttribution.conservation_gap`); the pixel map
        leaves out the special tokens and the patch convolution's bias, whose share the delta then includes.
        Note the sign: Captum's path methods define ``sum(attributions) - (f(x) - f(baseline))``, the opposite.
        """
        parts = attributions if isinstance(attributions, tuple) else (attributions,)
        summed = sum(part.reshape(part.shape[0], -1).sum(-1) for part in parts)
        return output.flatten() - summed.flatten()

    def attribute_future(self, *args: Any, **kwargs: Any) -> torch.futures.Future:
        """:meth:`attribute` as Captum's future API: the same arguments and results, returned as a completed
        ``torch.futures.Future``. One attribution is one forward and one backward pass in this process, so it
        runs before this returns and bad input raises here, as in :meth:`attribute`."""
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(self.attribute(*args, **kwargs))
        return future

    # ---- helpers --------------------------------------------------------------------------------------------

    def _input_name(self, inputs: torch.Tensor) -> str:
        if not isinstance(inputs, torch.Tensor):
            raise AttributionInputError(f"inputs must be a tensor, got {type(inputs).__name__}")
        if getattr(self.model, "main_input_name", "input_ids") == "pixel_values":
            return "pixel_values"
        if inputs.is_floating_point():
            if inputs.dim() != 3:
                raise AttributionInputError(
                    f"floating-point inputs of a text model are embeddings [B, T, H], got {tuple(inputs.shape)}"
                )
            return "inputs_embeds"
        return "input_ids"

    def _forward_args(self, additional_forward_args: Any) -> dict[str, Any]:
        """Captum's ``additional_forward_args`` as keyword arguments of ``model.forward``."""
        if additional_forward_args is None:
            return {}
        if isinstance(additional_forward_args, dict):
            return dict(additional_forward_args)
        values = (
            tuple(additional_forward_args)
            if isinstance(additional_forward_args, tuple | list)
            else (additional_forward_args,)
        )
        params = list(inspect.signature(self.model.forward).parameters.values())
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        main = getattr(self.model, "main_input_name", "input_ids")
        after = names[names.index(main) + 1 :] if main in names else names[1:]
        if len(values) > len(after):
            raise AttributionInputError(
                f"{len(values)} additional_forward_args but {type(self.model).__name__}.forward takes "
                f"{len(after)} positional arguments after {main}"
            )
        return {name: value for name, value in zip(after, values, strict=False) if value is not None}

    @staticmethod
    def _attributions(
        result: Attribution, vision: bool, parts: bool
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if parts:
            maps = (result.token, result.position)
            return maps if result.segment is None else (*maps, result.segment)
        if vision:
            return result.pixel_map[:, None]
        return result.relevance


def _target_prefix_sum(result: Attribution) -> torch.Tensor | None:
    """The summed relevance of an encoder-decoder result's target prefix per example, [B]; None otherwise."""
    prefix = getattr(result, "target_relevance", None)
    if not isinstance(prefix, torch.Tensor) or "target_token" not in result.extras:
        return None
    return prefix.sum(-1)


def _as_target(target: Any) -> int | torch.Tensor | None:
    """Captum's target forms (None, int, list of ints, tensor) as :func:`hf_pelrp.attribute` takes them."""
    if isinstance(target, tuple):
        raise AttributionInputError(
            "tuple targets index outputs with more than 2 dimensions; PE-LRP explains one logit per example: "
            "give the class / vocabulary id (and position= for language models)"
        )
    if isinstance(target, list):
        return torch.tensor(target, dtype=torch.long)
    return target


def _row_targets(target: Any, batch: int) -> list[int]:
    """One class id per row from an int (every row, as Captum's ``target=`` takes it), a list or a tensor."""
    if isinstance(target, bool):
        raise AttributionInputError(f"target must be an int, a list of ints or a tensor, got {target!r}")
    if isinstance(target, int):
        return [target] * batch
    if isinstance(target, torch.Tensor):
        if target.dim() == 0:
            return [int(target)] * batch
        target = target.reshape(-1).tolist()
    if not isinstance(target, list | tuple):
        raise AttributionInputError(
            f"target must be an int, a list of ints or a tensor, got {type(target).__name__}"
        )
    if len(target) != batch:
        raise AttributionInputError(f"target has {len(target)} entries for {batch} rows of attributions")
    return [int(t) for t in target]


def visualization_records(
    attributions: torch.Tensor,
    tokens: list[list[str]],
    target: int | torch.Tensor | list[int],
    delta: torch.Tensor | None = None,
    *,
    true_class: list[Any] | None = None,
    pred_prob: torch.Tensor | None = None,
) -> list[Any]:
    """Captum ``VisualizationDataRecord`` objects for :func:`visualize_text`.

    Each row of ``attributions`` [B, T] is scaled by its largest absolute value (Captum's colours span
    [-1, 1]); the attribution score column shows the row's total relevance, the convergence column ``delta``.
    ``target`` is what :meth:`PELRP.attribute` took: an int (every row), a list of ints or a tensor.
    ``pred_prob`` (e.g. the softmax of the logits) fills the "Predicted Label" column; without it that column
    shows the class id only (``nan``).
    """
    from captum.attr import visualization

    targets = _row_targets(target, attributions.shape[0])
    rows = []
    for b in range(attributions.shape[0]):
        row = attributions[b].detach().float().cpu()
        scale = row.abs().max().clamp_min(torch.finfo(row.dtype).tiny)
        label = targets[b]
        rows.append(
            visualization.VisualizationDataRecord(
                word_attributions=row / scale,
                pred_prob=float("nan") if pred_prob is None else float(pred_prob[b]),
                pred_class=label,
                true_class=label if true_class is None else true_class[b],
                attr_class=label,
                attr_score=float(row.sum()),
                raw_input_ids=list(tokens[b]),
                convergence_score=float("nan") if delta is None else float(delta[b]),
            )
        )
    return rows


def visualize_text(records: list[Any], legend: bool = True) -> Any:
    """:func:`captum.attr.visualization.visualize_text` of ``records`` (:func:`visualization_records`), which
    shows an HTML table in a notebook.

    Raises
    ------
    ImportError
        IPython is not installed: Captum's view needs it, and ``pip install "hf_pelrp[captum]"`` does not
        install it (``pip install ipython``; outside a notebook, ``Attribution.to_html`` writes a report).
    """
    from captum.attr import visualization

    if importlib.util.find_spec("IPython") is None:
        # Captum only asserts (and a bare AssertionError vanishes under python -O): say what is missing
        raise ImportError(
            "captum's visualize_text needs IPython, which the hf_pelrp[captum] extra does not install: "
            "pip install ipython (it displays in a Jupyter notebook; elsewhere use Attribution.to_html(path))"
        )
    return visualization.visualize_text(records, legend=legend)
