"""The rule configuration of one attribution: which attention rule, whether positions are leaves."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .rules import INPUT_RULES, SOFTMAX_RULES

MODES = ("attnlrp", "cp")

#: the vision-only LRPConfig fields (issue 20) and their values; adapters list the ones they apply
VISION_OPTIONS: dict[str, tuple[str, ...]] = {
    "patch_rule": tuple(INPUT_RULES),
    "logit_contrast": ("softmax", "mean"),
    "position_reference": ("mean",),
    "image_readout": ("positive",),
}


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
    gamma_linear
        ``None`` (default): linear layers follow the epsilon rule. A number ``gamma >= 0``: the generalised
        Gamma rule (:func:`hf_pelrp.rules.gamma_rule`) on the linear layers the adapter declares for it (ViT /
        DeiT: the MLP and classifier-head linears); other adapters keep the epsilon rule everywhere.
    gamma_conv
        The same for convolutions the adapter declares (ViT / DeiT: the patch-embedding convolution).
    softmax
        The rule at the attention softmax (:func:`hf_pelrp.rules.softmax_rule`; AttnLRP mode only, CP has no
        softmax relevance): ``"gxi"`` (default, AttnLRP Prop. 3.1, not conservative), ``"identity"`` (the
        normaliser a constant: ``R_z = R_A``) or ``"split"`` (uniform split between ``exp(z)`` and the
        normaliser). The last two conserve and need the written-out N x N scores (eager attention).
    softmax_eps
        Stabiliser of those two rules' ratio ``R_z / (z + eps sign(z))`` (0: exactly conservative).
    residual_gamma
        ``None`` (default): residual additions are plain sums (epsilon rule). A number ``gamma >= 0``: ResLRP's
        residual rule (:func:`hf_pelrp.rules.residual_rule`) at both residual additions of every pre-norm block
        (:class:`hf_pelrp.hooks.ResidualGamma`); exactly conservative, composable with both modes and positions.
    offsets
        ``True``: also split the relevance of every attention score into a content and a position part and sum
        the position part per query-key offset ``d = i - j`` (``Attribution.position_by_offset`` [B, L, D],
        method.md 2 "Relevance per offset"), for rotary and ALiBi models; other families refuse it. Needs
        ``positional=True``. Opt-in: rotary layers re-compute their scores in the backward pass (one more
        attention pass per layer, in blocks of ``offset_chunk`` queries).
    offset_chunk
        Queries per block of that re-computation (its memory is about ``6 * B * H * offset_chunk * T`` floats at
        a time, besides up to four ``[B, H, T, D]`` tensors per layer kept for the backward pass); ``None``: all
        queries in one block. The maps do not depend on it.
    patch_rule
        Vision families (ViT / DeiT / DINOv2 layouts): the rule that carries the patch tokens' relevance to the
        pixels in ``pixel_map``. ``None`` (default): Gradient x Input through the patch convolution (epsilon, or
        Gamma with ``gamma_conv``). ``"zplus"``, ``"wsquare"``, ``"flat"``, ``"zbox"``: the input-layer rules
        of :data:`hf_pelrp.rules.INPUT_RULES` (``"zbox"`` bounds the pixels to ``[0, 1]``). Changes only the
        pixel map (each patch's relevance stays that patch's), never ``patch_map``.
    logit_contrast
        ``None`` (default): the explained logit itself. ``"softmax"`` / ``"mean"``: the logit against the others
        (:func:`hf_pelrp.rules.contrast_logits`: the linearised log-probability, or the logit minus the mean
        logit); relevance then sums to that contrast. ViT / DeiT / DINOv2.
    position_reference
        ``None`` (default): the position leaf is ``p``. ``"mean"``: the mean position row over the sequence is a
        sink credited to the token map and the position map holds ``(p - mean p) . g`` only
        (:func:`hf_pelrp.rules.reference_split`); ``patch_map`` and ``pixel_map`` are unchanged. ViT / DeiT /
        DINOv2, with ``positional=True``.
    image_readout
        ``None`` (default): ``pixel_map`` and ``patch_map`` are signed and conserve the patches' relevance.
        ``"positive"``: the PE-LRP paper's ViT read-out, ``pixel_map`` clamped at 0 and ``patch_map`` its sums
        per patch (negative evidence dropped from the image maps only; ``token``, ``position`` and the
        conservation gap stay as they are). ViT / DeiT / DINOv2.
    """

    mode: str = "attnlrp"
    positional: bool = True
    gamma_linear: float | None = None
    gamma_conv: float | None = None
    softmax: str = "gxi"
    softmax_eps: float = 0.0
    residual_gamma: float | None = None
    offsets: bool = False
    offset_chunk: int | None = 256
    patch_rule: str | None = None
    logit_contrast: str | None = None
    position_reference: str | None = None
    image_readout: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.positional, bool):
            raise TypeError(f"positional must be a bool, got {type(self.positional).__name__}")
        if self.softmax not in SOFTMAX_RULES:
            raise ValueError(f"softmax must be one of {SOFTMAX_RULES}, got {self.softmax!r}")
        if self.softmax != "gxi" and self.mode != "attnlrp":
            raise ValueError(
                f"softmax={self.softmax!r} applies to mode='attnlrp' only (under {self.mode!r} the attention "
                "probabilities are constants and the softmax passes on no relevance): use softmax='gxi'"
            )
        eps = self.softmax_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"softmax_eps must be a finite number >= 0, got {eps!r}")
        object.__setattr__(self, "softmax_eps", float(eps))

        if not isinstance(self.offsets, bool):
            raise TypeError(f"offsets must be a bool, got {type(self.offsets).__name__}")
        if self.offsets and not self.positional:
            raise ValueError(
                "offsets=True splits the relevance that reaches the positions, which positional=False makes "
                "constants: use positional=True with offsets=True"
            )
        chunk = self.offset_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(
                f"offset_chunk must be None or a positive int (queries per block), got {chunk!r}"
            )
        if self.offsets and self.softmax != "gxi":
            raise ValueError(
                f"offsets=True splits the scores' relevance under AttnLRP's own softmax rule; softmax={self.softmax!r} "
                "gives the scores other relevance: use softmax='gxi' with offsets=True"
            )
        for name in ("gamma_linear", "gamma_conv", "residual_gamma"):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be None (epsilon rule) or a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        self._check_vision_options()

    def _check_vision_options(self) -> None:
        for name, allowed in VISION_OPTIONS.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be None or one of {allowed}, got {value!r}")
        if self.position_reference is not None and not self.positional:
            raise ValueError(
                "position_reference splits the position leaf, which positional=False does not have: set "
                "positional=True or position_reference=None"
            )

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
    def scores_factor(self) -> float:
        """Gradient factor at the attention scores (A's share at ``A V``): 1/2, 0 in CP mode. It reaches a
        positional bias inside attention (method.md 2); q and k get half of it each (:attr:`qk_factor`)."""
        return 0.5 if self.mode == "attnlrp" else 0.0

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


#: named rule configurations, usable as ``config="NAME"`` or ``mode="NAME"`` wherever the API takes a mode
PRESETS: dict[str, LRPConfig] = {
    "attnlrp": LRPConfig(mode="attnlrp"),
    "cp": LRPConfig(mode="cp"),
    # the PE-LRP paper's ViT rules (after Zennit / LXT): CP attention, Gamma on MLP + head and on the patch conv
    "vit-paper": LRPConfig(mode="cp", gamma_linear=0.05, gamma_conv=100.0),
    # issue 21: the attention normaliser a constant (identity softmax rule), eps 0.1: 3.5% of SmolLM2's logit
    # unexplained instead of 58%, non-zero rotary positions, but lower position-flip faithfulness than the
    # default (docs/results.md, "Where the unexplained logit goes: remedies"); an option, not the default
    "attnlrp-conservative": LRPConfig(softmax="identity", softmax_eps=0.1),
    # issue 20's best image rules (docs/results.md, "Vision rules"): the paper's Gamma values under AttnLRP,
    # no position relevance in the maps, the paper's positive read-out of the pixel and patch maps
    "vit-positive": LRPConfig(
        mode="attnlrp", positional=False, gamma_linear=0.05, gamma_conv=100.0, image_readout="positive"
    ),
}


def preset(name: str) -> LRPConfig:
    """The named rule configuration (see :data:`PRESETS`); raises ``ValueError`` naming the known ones."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown mode or preset {name!r}: modes are {', '.join(MODES)}; presets are {', '.join(PRESETS)}"
        ) from None


def resolve_config(config: LRPConfig | str | None, mode: str | None, positional: bool | None) -> LRPConfig:
    """Merge an optional config object (or preset name) with the ``mode`` / ``positional`` keywords.

    The one precedence rule (also :func:`resolve_rules`): an explicit ``config`` is taken as it is, and a
    ``mode`` or ``positional`` that contradicts it is an error, not a silent choice; without ``config``,
    ``mode`` (a rule mode or a preset name) and ``positional`` change the fields of the defaults.
    """
    from .errors import AttributionInputError

    if mode is not None and not isinstance(mode, str):
        raise AttributionInputError(f"mode must be a string ({', '.join(MODES)} or a preset), got {mode!r}")
    if positional is not None and not isinstance(positional, bool):
        raise AttributionInputError(f"positional must be True or False, got {positional!r}")
    if isinstance(config, str):
        config = preset(config)
    if config is not None and not isinstance(config, LRPConfig):
        raise AttributionInputError(
            f"config must be an LRPConfig or a preset name, got {type(config).__name__}"
        )
    if mode is not None and mode not in MODES:
        # a preset named through mode= is a starting point, like LRPConfig(): positional= may change it
        named = preset(mode)
        if config is not None and config != named:
            raise AttributionInputError(
                f"config= and the preset mode={mode!r} name different rules: give one of them"
            )
        return named.with_(positional=positional) if positional is not None else named
    if config is not None:
        if mode is not None and mode != config.mode:
            raise AttributionInputError(
                f"config= says mode {config.mode!r} but mode={mode!r} was passed as well: give one of them "
                "(or config.with_(mode=...))"
            )
        if positional is not None and positional != config.positional:
            raise AttributionInputError(
                f"config= says positional={config.positional} but positional={positional} was passed as well: "
                "give one of them (or config.with_(positional=...))"
            )
        return config
    base = LRPConfig()
    changes = {}
    if mode is not None:
        changes["mode"] = mode
    if positional is not None:
        changes["positional"] = positional
    return base.with_(**changes) if changes else base


def resolve_rules(
    model: object, config: LRPConfig | str | None, mode: str | None, positional: bool | None
) -> LRPConfig:
    """The rules of one attribution of ``model``: explicit ``config`` / ``mode`` / ``positional`` arguments
    (see :func:`resolve_config`) over the model's own default (:func:`set_model_default_config`, set by
    :func:`hf_pelrp.enable_attribution`), over ``LRPConfig()``."""
    if config is None:
        default = model_default_config(model)
        if default is not None:
            if mode is not None and mode not in MODES:
                return resolve_config(None, mode, positional)
            changes = {}
            if mode is not None:
                changes["mode"] = mode
            if positional is not None:
                if not isinstance(positional, bool):
                    resolve_config(None, None, positional)  # raises the type error
                changes["positional"] = positional
            return default.with_(**changes) if changes else default
    return resolve_config(config, mode, positional)
