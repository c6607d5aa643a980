"""The rule configuration of one attribution: which attention rule, whether positions are leaves."""

from __future__ import annotations

from dataclasses import dataclass, replace

MODES = ("attnlrp", "cp")


@dataclass(frozen=True)
class LRPConfig:
    """Which LRP rules an attribution uses.

    Parameters
    ----------
    mode
        ``"attnlrp"``: AttnLRP rules (softmax rule, uniform rule on ``Q K^T``, ``A V`` and gated products).
        ``"cp"``: CP-LRP, the attention probabilities and MLP gates are constants of the backward pass.
    positional
        ``True``: positional tensors (rotary cos/sin, additive position embeddings) are leaves and receive
        relevance (PE-LRP). ``False``: they are constants (the classic AttnLRP / CP-LRP baseline).
    """

    mode: str = "attnlrp"
    positional: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.positional, bool):
            raise TypeError(f"positional must be a bool, got {type(self.positional).__name__}")

    def with_(self, **changes) -> LRPConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @property
    def qk_factor(self) -> float:
        """Gradient factor on q and k: 1/4 (uniform rule on A at ``A V``, then on q, k at ``Q K^T``), 0 in CP mode.

        The softmax between the two products passes its share on unchanged (its rule is Gradient x Input), so
        the 1/2 that A gets at ``A V`` and the 1/2 of the uniform rule at ``Q K^T`` multiply (method.md 1).
        """
        return 0.25 if self.mode == "attnlrp" else 0.0

    @property
    def v_factor(self) -> float:
        """Gradient factor on v at ``A V``: 1/2 (uniform rule), 1 in CP mode (A is a constant)."""
        return 0.5 if self.mode == "attnlrp" else 1.0

    @property
    def gate_factor(self) -> float:
        """Gradient factor on the activated gate of a gated MLP: 1/2, 0 in CP mode (the gate is a constant)."""
        return 0.5 if self.mode == "attnlrp" else 0.0

    @property
    def up_factor(self) -> float:
        """Gradient factor on the up projection of a gated MLP: 1/2, 1 in CP mode."""
        return 0.5 if self.mode == "attnlrp" else 1.0


#: instance attribute holding a model's own default rules (set by :func:`hf_pelrp.from_pretrained`)
_MODEL_DEFAULT_ATTR = "_hf_pelrp_default_config"


def set_model_default_config(model: object, config: LRPConfig | None) -> None:
    """Store ``config`` on this model instance as the rules :func:`attribute` / :func:`lrp` use by default.

    Per instance (an attribute of the model object, not a global), never serialised by ``save_pretrained``;
    ``None`` removes it. Explicit ``mode`` / ``positional`` / ``config`` arguments still win.
    """
    if config is None:
        vars(model).pop(_MODEL_DEFAULT_ATTR, None)
        return
    if not isinstance(config, LRPConfig):
        raise TypeError(f"config must be an LRPConfig, got {type(config).__name__}")
    vars(model)[_MODEL_DEFAULT_ATTR] = config


def model_default_config(model: object) -> LRPConfig | None:
    """The default rules stored on ``model`` by :func:`set_model_default_config`, or ``None``."""
    return vars(model).get(_MODEL_DEFAULT_ATTR) if hasattr(model, "__dict__") else None


def resolve_config(config: LRPConfig | str | None, mode: str | None, positional: bool | None) -> LRPConfig:
    """Merge an optional config object with the ``mode`` / ``positional`` keywords of the public API."""
    if isinstance(config, str):
        config = LRPConfig(mode=config)
    base = config or LRPConfig()
    changes = {}
    if mode is not None:
        changes["mode"] = mode
    if positional is not None:
        changes["positional"] = positional
    return base.with_(**changes) if changes else base
