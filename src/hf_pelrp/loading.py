"""Loading models ready for attribution: ``from_pretrained`` with the ``"lrp"`` attention and default rules.

Importing :mod:`hf_pelrp` registers the ``"lrp"`` attention with transformers, so the plain route
``AutoModelForCausalLM.from_pretrained(path, attn_implementation="lrp")`` works as well; outside an attribution
the ``"lrp"`` attention is exactly SDPA. :func:`from_pretrained` adds the rule defaults (``mode``,
``positional``) as per-instance state that :func:`hf_pelrp.attribute`, :func:`hf_pelrp.lrp` and the
``lrp-attribution`` pipeline read when they are called without rules. Neither is written by
``save_pretrained``: a saved model loads without hf_pelrp.
"""

from __future__ import annotations

from typing import Any

import torch

from .adapters import adapter_for
from .attention import LRP_ATTENTION
from .config import LRPConfig, resolve_config, resolve_rules, set_model_default_config

__all__ = ["default_config", "enable_attribution", "from_pretrained"]


def enable_attribution(
    model: torch.nn.Module,
    mode: str | None = None,
    positional: bool | None = None,
    *,
    lrp_config: LRPConfig | None = None,
    attn_implementation: str | None = LRP_ATTENTION,
) -> torch.nn.Module:
    """Prepare an already loaded model for attribution and store its default rules; returns ``model``.

    The model is checked against its adapter (unsupported types raise now, not at the first attribution) and
    its attention implementation is switched to ``attn_implementation`` (``None`` leaves it as it is;
    attribution selects ``"lrp"`` for its own duration in any case).

    Parameters
    ----------
    model
        A transformers model of a supported type.
    mode, positional
        Default rules (``"attnlrp"`` / ``"cp"``; positions as leaves or not) for calls that give none.
    lrp_config
        An :class:`LRPConfig` (a ``mode`` / ``positional`` that contradicts it is an error).
    attn_implementation
        The attention implementation the model runs with outside attribution (default ``"lrp"``).

    Raises
    ------
    UnsupportedModelError
        The model type has no adapter, or the model was patched in a way the rules cannot see through.
    """
    adapter = adapter_for(model)
    adapter.check_model(model)
    cfg = resolve_config(lrp_config, mode, positional)
    current = getattr(model.config, "_attn_implementation", None)
    if attn_implementation is not None and current != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    set_model_default_config(model, cfg)
    return model


def from_pretrained(
    model_class: Any,
    pretrained_model_name_or_path: Any,
    *model_args: Any,
    mode: str | None = None,
    positional: bool | None = None,
    lrp_config: LRPConfig | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a model with ``model_class.from_pretrained`` ready for attribution, with its default rules.

    >>> model = hf_pelrp.from_pretrained(AutoModelForCausalLM, path, mode="cp")   # doctest: +SKIP
    >>> hf_pelrp.attribute(model, input_ids=ids).mode                             # doctest: +SKIP
    'cp'

    The forward pass is identical to the plain model's (the ``"lrp"`` attention is SDPA outside an
    attribution); ``save_pretrained`` writes the ordinary weights and a config without the ``"lrp"``
    attention, so the checkpoint loads without hf_pelrp.

    Parameters
    ----------
    model_class
        An ``AutoModelFor...`` class or a concrete model class (anything with ``from_pretrained``).
    pretrained_model_name_or_path
        A local folder (or a hub id, where a network exists).
    mode, positional, lrp_config
        Default rules of this model instance (see :func:`enable_attribution`).
    **kwargs
        Passed to ``from_pretrained`` (``dtype``, ``device_map``, ...). ``attn_implementation`` defaults to
        ``"lrp"``.

    Returns
    -------
    torch.nn.Module
        The model, in eval mode as ``from_pretrained`` returns it.

    Raises
    ------
    UnsupportedModelError
        The loaded model's type has no adapter.
    """
    if not hasattr(model_class, "from_pretrained"):
        raise TypeError(
            f"model_class must be a transformers model class with from_pretrained (e.g. AutoModelForCausalLM), "
            f"got {model_class!r}"
        )
    kwargs.setdefault("attn_implementation", LRP_ATTENTION)
    model = model_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
    return enable_attribution(model, mode, positional, lrp_config=lrp_config, attn_implementation=None)


def default_config(model: torch.nn.Module) -> LRPConfig:
    """The rules an attribution of ``model`` uses when called without ``mode`` / ``positional`` / ``config``."""
    return resolve_rules(model, None, None, None)
