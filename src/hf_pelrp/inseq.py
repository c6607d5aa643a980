"""PE-LRP as an Inseq attribution method: ``import hf_pelrp.inseq`` registers ``"pelrp"`` with Inseq.

>>> import inseq, hf_pelrp.inseq                                           # doctest: +SKIP
>>> model = inseq.load_model(hf_model, "pelrp", tokenizer=tokenizer)      # doctest: +SKIP
>>> out = model.attribute("The capital of France is", generation_args={"max_new_tokens": 4})  # doctest: +SKIP
>>> out.show()   # token + position relevance of every prefix token, per generated token  # doctest: +SKIP

Inseq finds methods by subclassing (its ``FeatureAttribution`` registry has no entry points), so defining
:class:`PELRPAttribution` here is the registration; plain ``import hf_pelrp`` does not import this module.
Needs the ``inseq`` extra (tested with inseq 0.7.1 and transformers 5).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch

try:
    from inseq.attr.attribution_decorators import set_hook, unset_hook
    from inseq.attr.feat import FeatureAttribution
    from inseq.data import FeatureAttributionSequenceOutput, FeatureAttributionStepOutput
    from inseq.data.aggregation_functions import DEFAULT_ATTRIBUTION_AGGREGATE_DICT
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'hf_pelrp.inseq needs inseq 0.7: pip install "hf_pelrp[inseq]" (install torch first)'
    ) from error

from . import AttributionStateError, UnsupportedModelError, lrp, supported_model_types
from .config import LRPConfig, resolve_rules

__all__ = ["PARTS", "PELRPAttribution", "PELRPSequenceOutput", "PELRPStepOutput"]

#: the last axis of the attributions: index 0 is the token's content, 1 its position
PARTS = ("token", "position")
#: options a call of ``model.attribute(...)`` may override (besides Inseq's own arguments)
_OPTIONS = ("mode", "positional", "config", "return_convergence_delta")


def _aggregate_fns() -> dict[str, Any]:
    """Inseq's default aggregation table with PE-LRP's choices: relevance is additive, so the two parts of a
    token are summed (``scores``) and merged tokens / generated spans add up (``spans``)."""
    fns = copy.deepcopy(DEFAULT_ATTRIBUTION_AGGREGATE_DICT)
    for field in ("source_attributions", "target_attributions"):
        fns[field] = {"scores": "sum", "spans": "sum"}
    fns["step_scores"]["spans"]["deltas"] = "sum"
    return fns


def _dim_names() -> dict[str, dict[int, str]]:
    names = {0: "Input Tokens", 1: "Generated Tokens", 2: "Relevance part (0: token, 1: position)"}
    return {"source_attributions": dict(names), "target_attributions": dict(names)}


@dataclass(eq=False, repr=False)
class PELRPSequenceOutput(FeatureAttributionSequenceOutput):
    """One sequence of PE-LRP attributions: ``target_attributions`` [prefix + generated, generated, 2].

    The last axis holds the :data:`PARTS` (token, position). By default ``show()`` / ``aggregate()`` sum them
    (``relevance = token + position``) and then normalise each generated token's column as Inseq does for every
    method; ``show(select_idx=0)`` shows the token part alone, ``select_idx=1`` the position part,
    ``normalize=False`` the raw values (logit units).
    """

    def __post_init__(self) -> None:
        # Inseq's __post_init__ merges these into its module-level defaults; hand it None so that building a
        # PE-LRP output never changes what other methods' outputs aggregate with
        own_fns, own_names = self._dict_aggregate_fn, self._attribution_dim_names
        self._dict_aggregate_fn = self._attribution_dim_names = None
        super().__post_init__()
        self._dict_aggregate_fn = own_fns if own_fns else _aggregate_fns()
        self._attribution_dim_names = own_names if own_names else _dim_names()


@dataclass(eq=False, repr=False)
class PELRPStepOutput(FeatureAttributionStepOutput):
    """One generation step of PE-LRP: ``target_attributions`` [batch, prefix length, 2] (token, position)."""

    _sequence_cls: type[FeatureAttributionSequenceOutput] = PELRPSequenceOutput


def _embed_without_hooks(wrapper: Any, ids: torch.Tensor, as_targets: bool = False) -> torch.Tensor:
    """Inseq's ``embed_ids`` (decoder-only, no Captum interpretable embeddings) without the module's hooks."""
    return wrapper.get_embedding_layer().forward(ids) * wrapper.embed_scale


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as ``generate`` and :func:`hf_pelrp.attribute` number a
    left-padded row (Inseq's own forward pass leaves them to the model, which counts the padding)."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


class PELRPAttribution(FeatureAttribution):
    """PE-LRP for Inseq: each generation step is one forward and one backward pass inside :func:`hf_pelrp.lrp`.

    The explained value of a step is Inseq's attributed function of the model output for the step's target
    token. While this method is the model's method, the default attributed function is ``"logit"`` (relevance
    in logit units that sums to the logit up to the conservation gap); pass ``attributed_fn=`` (e.g.
    ``"probability"``, ``"contrast_logits_diff"``) to explain something else, through the same rules.

    Options (at ``inseq.load_model(model, "pelrp", mode=..., ...)``, or per call of ``model.attribute``):
    ``mode`` (``"attnlrp"`` / ``"cp"``), ``positional`` and ``config`` as in :func:`hf_pelrp.attribute`;
    ``return_convergence_delta=True`` adds the step score ``"deltas"``: explained value minus the step's summed
    relevance (Captum's LRP sign, :attr:`hf_pelrp.Attribution.conservation_gap`).

    Output: :class:`PELRPSequenceOutput` objects whose ``target_attributions`` hold token and position
    relevance (last axis, :data:`PARTS`). Decoder-only models of the types :func:`hf_pelrp.supported_model_types`
    lists with a causal-LM head (llama, mistral, qwen2, gpt2).
    """

    method_name = "pelrp"

    def __init__(
        self,
        attribution_model: Any,
        mode: str | None = None,
        positional: bool | None = None,
        config: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(attribution_model, hook_to_model=False)
        model = attribution_model.model
        if attribution_model.is_encoder_decoder:
            raise UnsupportedModelError(
                f"{type(model).__name__} is an encoder-decoder model; hf_pelrp's Inseq method explains "
                "decoder-only (causal LM) models"
            )
        model_type = getattr(model.config, "model_type", None)
        if model_type not in supported_model_types():
            raise UnsupportedModelError(
                f"model type {model_type!r} has no hf_pelrp adapter; supported: {', '.join(supported_model_types())}"
            )
        self.options = {"mode": mode, "positional": positional, "config": config}
        # token ids go to the model unchanged: hf_pelrp makes the embedding output the token leaf itself
        self.attribute_batch_ids = True
        self.forward_batch_embeds = False
        self._replaced_default: str | None = None
        self._call_rules: LRPConfig | None = None
        self.hook(**kwargs)

    @set_hook
    def hook(self, **kwargs: Any) -> None:
        """Make ``"logit"`` the model's default attributed function while this method is hooked."""
        super().hook(**kwargs)
        if self._replaced_default is None:
            # Inseq 0.7 keeps the default in this attribute (its public setter is misnamed ``set_attributed_fn``)
            self._replaced_default = self.attribution_model._default_attributed_fn_id
            self.attribution_model._default_attributed_fn_id = "logit"

    @unset_hook
    def unhook(self, **kwargs: Any) -> None:
        """Restore the model's default attributed function."""
        super().unhook(**kwargs)
        if self._replaced_default is not None:
            self.attribution_model._default_attributed_fn_id = self._replaced_default
            self._replaced_default = None

    def get_attribution_args(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split ``model.attribute(**kwargs)`` into this method's options and the rest."""
        ours = {k: v for k, v in kwargs.items() if k in _OPTIONS}
        # the rules of this call, resolved once for all of its generation steps (kept here, not in the
        # arguments: Inseq serialises those into its output)
        self._call_rules = self._rules({**self.options, **ours})
        return ours, {k: v for k, v in kwargs.items() if k not in ours}

    def _rules(self, options: dict[str, Any]) -> LRPConfig:
        """The rules of a step called without :meth:`get_attribution_args` (Inseq always calls it first)."""
        return resolve_rules(
            self.attribution_model.model, options["config"], options["mode"], options["positional"]
        )

    def attribute_step(
        self, attribute_fn_main_args: dict[str, Any], attribution_args: dict[str, Any] | None = None
    ) -> PELRPStepOutput:
        """One generation step: explain the attributed function of the step's target, read the maps."""
        options = {**self.options, **(attribution_args or {})}
        (forward_ids,) = attribute_fn_main_args["inputs"]
        input_ids, target_ids, attributed_fn, attention_mask, _, argnames, *argvalues = (
            attribute_fn_main_args["additional_forward_args"]
        )
        wrapper = self.attribution_model
        model = wrapper.model
        embedding = model.get_input_embeddings()
        calls = {model: 0, embedding: 0}

        def count(module: torch.nn.Module, _args: Any) -> None:
            calls[module] += 1

        with (
            lrp(model, config=self._call_rules or self._rules(options)) as ctx,
            torch.enable_grad(),
        ):
            handles = [model.register_forward_pre_hook(count), embedding.register_forward_pre_hook(count)]
            # contrastive step functions embed their contrast text inside the step; through the embedding
            # module's hooks, hf_pelrp would take that for the token leaf of the explained forward pass
            wrapper.embed_ids = functools.partial(_embed_without_hooks, wrapper)
            try:
                explained = wrapper.forward(
                    forward_ids,
                    input_ids,
                    target_ids,
                    attributed_fn,
                    attention_mask,
                    False,  # the forward pass takes the token ids
                    argnames,
                    *argvalues,
                    position_ids=_position_ids(attention_mask),
                )
            finally:
                del wrapper.embed_ids
                for handle in handles:
                    handle.remove()
            if calls[model] != 1 or calls[embedding] != 1:
                raise AttributionStateError(
                    f"the attributed function ran the model {calls[model]} times (its embedding "
                    f"{calls[embedding]} times) in one step; PE-LRP explains one forward pass (contrastive "
                    "functions: leave contrast_force_inputs=False so that only the contrast target differs, or "
                    "use hf_pelrp.attribute(..., foil=))"
                )
            if not explained.requires_grad:
                raise AttributionStateError(
                    f"the attributed function {getattr(attributed_fn, '__name__', attributed_fn)!r} does not "
                    "depend on the model's inputs (no gradient): PE-LRP has nothing to propagate"
                )
            # rows are independent (one explained value each), so one backward pass serves the batch
            torch.autograd.backward(
                explained.sum(), inputs=[leaf for leaf in ctx.leaves() if leaf.requires_grad]
            )
            maps = ctx.maps()
        if maps.get("segment") is not None:
            raise UnsupportedModelError("token-type (segment) relevance has no place in the Inseq output")
        attributions = torch.stack([maps[part] for part in PARTS], dim=-1)
        if not torch.isfinite(attributions).all():
            raise AttributionStateError(
                f"relevance is not finite (NaN or inf) for {type(model).__name__}: run hf_pelrp.attribute on "
                "the same prefix to locate the module that overflowed"
            )
        step_scores = {}
        if options.get("return_convergence_delta"):
            step_scores["deltas"] = explained.detach().float() - attributions.sum((1, 2)).to(explained.device)
        return PELRPStepOutput(target_attributions=attributions, step_scores=step_scores)
