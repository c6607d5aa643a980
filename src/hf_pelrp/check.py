"""``check_adapter``: prove an adapter declaration on a tiny random instance of every head it explains.

The declaration says which rule each module gets; this check shows that the result is what method.md
promises, for every mode: forward outputs unchanged, exact conservation in the bias-free CP configuration,
non-zero position relevance under AttnLRP, exactly zero relevance at padding, the same maps for a row alone
and inside a padded batch (left and right padding), for rotary families the exact split at the rotation in
one layer, every gated product and norm against its explicit float64 rule in every mode
(:mod:`hf_pelrp.check_sites`: the only check that sees a gated product's 1/2 on the wrong factor, which CP
conservation cannot, the gate being a constant there), and the model restored exactly afterwards. Each property
runs on its own: one that raises is reported and the others still run, so the report lists every failure. It
runs in the test suite for every registered model type; users who register their own adapter run it the same
way.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from .adapters import infer as _infer
from .adapters.base import Adapter, adapter_for_config, adapter_for_type, adapter_variants
from .errors import HfPelrpError
from .heads import (
    MASKED_LM,
    SEQ2SEQ_LM,
    SEQUENCE_CLASSIFICATION,
    classes_of_type,
)
from .positions import Rotary, rotary_leaves_in_graph

MODES = ("attnlrp", "cp")


class AdapterCheckError(HfPelrpError, AssertionError):
    """An adapter declaration failed :func:`check_adapter`; the message lists every failed check."""


@dataclass
class CheckResult:
    """One property checked on one head class."""

    head: str
    name: str
    passed: bool
    detail: str = ""


@dataclass
class AdapterReport:
    """What :func:`check_adapter` found: one :class:`CheckResult` per (head class, property)."""

    model_type: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    @property
    def heads(self) -> list[str]:
        return list(dict.fromkeys(r.head for r in self.results))

    def __str__(self) -> str:
        lines = [f"check_adapter({self.model_type!r}): {'passed' if self.passed else 'FAILED'}"]
        for r in self.results:
            lines.append(
                f"  [{'ok' if r.passed else 'FAIL'}] {r.head}: {r.name}{' - ' + r.detail if r.detail else ''}"
            )
        return "\n".join(lines)


def head_classes(model_type: str, adapter: Adapter) -> list[type]:
    """The model classes transformers maps ``model_type`` to, for each head kind the adapter explains
    (:func:`hf_pelrp.heads.classes_of_type`)."""
    return classes_of_type(model_type, adapter.heads)


def tiny_config(
    config_or_model_type: PretrainedConfig | str, adapter: Adapter | None = None, **changes: Any
) -> PretrainedConfig:
    """The configuration of the tiny instance: the adapter's ``tiny`` overrides for a model type name, or a
    copy of a given config (float64 is set by the check itself); ``changes`` are applied on top (a model type
    name only)."""
    if isinstance(config_or_model_type, PretrainedConfig):
        if changes:
            raise TypeError("tiny_config takes changes with a model type name, not with a configuration")
        return copy.deepcopy(config_or_model_type)
    adapter = adapter or adapter_for_type(config_or_model_type)
    return AutoConfig.for_model(config_or_model_type, **{**dict(adapter.tiny), **changes})


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Give constant parameters (zero biases, unit norm weights, zero-initialised tables) random values, so
    that a rule that ignores them cannot pass by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.1
                p.add_(noise)


def _zero_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.split(".")[-1].endswith("_bias"):
                p.zero_()


def _snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": {
            name: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(m._backward_pre_hooks),
            )
            for name, m in model.named_modules()
        },
        "configs": {name: id(m.__dict__.get("config")) for name, m in model.named_modules()},
        "attn": getattr(model.config, "_attn_implementation", None),
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        # instance forwards by identity (hub-kernel bindings must come back as the same bound methods)
        "forwards": {
            (name, key, id(own[key]))
            for name, m in model.named_modules()
            for own in (m.__dict__, *(f.__dict__ for f in m.__dict__.get("_kernel_funcs", {}).values()))
            for key in ("forward", "_old_forward")
            if key in own
        },
        "kernels": (getattr(model, "use_kernels", None), getattr(model, "kernels_mode", None)),
    }


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("hooks", "configs", "attn", "training", "requires_grad", "forwards", "kernels"):
        if before[key] != after[key]:
            problems.append(key)
    if before["state"].keys() != after["state"].keys() or any(
        not torch.equal(before["state"][k], after["state"][k]) for k in before["state"]
    ):
        problems.append("weights")
    return problems


def _per_layer(config: PretrainedConfig) -> dict[str, list | tuple]:
    """The config's per-layer lists (layer types, NoPE flags, ...): one entry per hidden layer."""
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 2:
        return {}
    return {k: v for k, v in vars(config).items() if isinstance(v, list | tuple) and len(v) == layers}


def _layer_kinds(config: PretrainedConfig) -> list[int]:
    """The first layer of each kind: layers whose per-layer entries (global / sliding, rotary / NoPE, ...) all
    agree are of one kind."""
    config = _layered(config)
    lists = _per_layer(config)
    first: dict[tuple, int] = {}
    for index in range(getattr(config, "num_hidden_layers", 1) if lists else 1):
        first.setdefault(tuple(repr(v[index]) for v in lists.values()), index)
    return sorted(first.values())


def _layered(config: PretrainedConfig) -> PretrainedConfig:
    """The config that counts the layers: ``config``, or the text config of a wrapper that has none itself (a
    vision-language model explained on text)."""
    if isinstance(getattr(config, "num_hidden_layers", None), int):
        return config
    text = config.get_text_config()
    return text if text is not config else config


def _one_layer(config: PretrainedConfig, index: int = 0) -> PretrainedConfig | None:
    """``config`` with one layer: per-layer lists (layer types, NoPE flags, ...) cut to their ``index``-th entry
    (in its text config, for a wrapper whose text config counts the layers)."""
    text = _layered(config)
    if text is not config:
        names = [k for k, v in vars(config).items() if v is text]
        one_text = _one_layer(text, index)
        if not names or one_text is None:
            return None
        wrapper = copy.deepcopy(config)
        setattr(wrapper, names[0], one_text)
        return wrapper
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        return None
    one = copy.deepcopy(config)
    for name, value in _per_layer(config).items():
        setattr(one, name, type(value)(value[index : index + 1]))
    one.num_hidden_layers = 1
    return one


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return (
        a.shape == b.shape and float((a - b).abs().max()) <= tol * scale if a.numel() else a.shape == b.shape
    )


class _Checker:
    def __init__(
        self, model: torch.nn.Module, adapter: Adapter, report: AdapterReport, tol: float, seed: int
    ):
        self.model = model
        self.adapter = adapter
        self.report = report
        self.tol = tol
        self.seed = seed
        self.head = adapter.head(model)
        self.kind = self.head.name
        self.name = type(model).__name__

    def record(self, name: str, passed: bool, detail: str = "") -> None:
        self.report.results.append(CheckResult(self.name, name, bool(passed), detail))

    @contextlib.contextmanager
    def attempt(self, name: str) -> Iterator[None]:
        """Run the block; an exception is recorded as the failure ``"<name> runs"`` and the caller goes on (one
        mode that raises must not hide the others)."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - a failing declaration is reported, not hidden
            self.record(f"{name} runs", False, f"{type(err).__name__}: {err}")

    # ---- inputs ---------------------------------------------------------------------------------------

    def inputs(self, batch: int = 2, length: int = 6) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed + 1)
        if self.adapter.inputs.kind == "image":
            # a vision tower inside a two-tower config (CLIP, SigLIP) reads its own vision config
            layout = getattr(self.adapter.inputs, "layout", None)
            config = layout.config_of(self.model) if layout is not None else self.model.config
            size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
            dtype = next(self.model.parameters()).dtype
            return {
                "pixel_values": torch.randn(batch, config.num_channels, size, size, generator=gen).to(dtype)
            }
        vocab = self.model.get_input_embeddings().num_embeddings
        pad = getattr(self.model.config, "pad_token_id", None)
        low = 1 if pad in (None, 0) else 0
        ids = torch.randint(low, vocab, (batch, length), generator=gen)
        if pad is not None:
            ids[ids == pad] = (pad + 1) % vocab if (pad + 1) % vocab != 0 else pad + 2
        # a VLM's image / video placeholders inside the vocabulary are not text (they would need images)
        config = self.model.config
        avoid = {getattr(config, n, None) for n in ("image_token_id", "image_token_index", "video_token_id")}
        avoid = {v for v in avoid if v is not None and v < vocab}
        if avoid:
            plain = next(i for i in range(low, vocab) if i not in avoid and i != pad)
            ids[torch.isin(ids, torch.tensor(sorted(avoid)))] = plain
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.kind == MASKED_LM:
            out["input_ids"][:, 2] = self.mask_id
            out["position"] = 2
            out["mask_token_id"] = self.mask_id
        if self.kind == SEQ2SEQ_LM:
            out.update(self.target_prefix(batch, gen))
        return self.with_eos(out)

    @property
    def reads_eos(self) -> bool:
        """Encoder-decoder classifiers read the last end-of-sequence token of each row."""
        return self.kind == SEQUENCE_CLASSIFICATION and bool(
            getattr(self.model.config, "is_encoder_decoder", False)
        )

    def with_eos(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` whose rows end (their last real token) with the one end-of-sequence token a reader needs."""
        if not self.reads_eos:
            return inputs
        eos = self.model.config.eos_token_id
        ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"]
        ids[ids == eos] = eos + 1
        last = (torch.arange(ids.shape[1]) * mask).argmax(-1)
        ids[torch.arange(ids.shape[0]), last] = eos
        return {**inputs, "input_ids": ids}

    def target_prefix(self, batch: int, gen: torch.Generator) -> dict[str, Any]:
        """Encoder-decoder heads: a random target prefix of 4 tokens after the decoder start token."""
        from .adapters.seq2seq import decoder_start_id, decoder_vocabulary

        vocab = decoder_vocabulary(self.model)  # Marian can have a smaller decoder vocabulary of its own
        pad = getattr(self.model.config, "pad_token_id", None)
        ids = torch.randint(3, vocab, (batch, 4), generator=gen)
        if pad is not None:
            ids[ids == pad] = pad + 1
        ids[:, 0] = decoder_start_id(self.model)
        return {"decoder_input_ids": ids, "decoder_attention_mask": torch.ones_like(ids)}

    @property
    def mask_id(self) -> int:
        return 3 if getattr(self.model.config, "pad_token_id", None) != 3 else 4

    def pad(self, inputs: dict[str, Any], row: int, keep: int, side: str) -> dict[str, Any]:
        """``inputs`` with row ``row`` cut to ``keep`` real tokens and padded on ``side``."""
        ids = inputs["input_ids"].clone()
        mask = inputs["attention_mask"].clone()
        pad = getattr(self.model.config, "pad_token_id", None)
        pad = 0 if pad is None else pad
        length = ids.shape[1]
        real = ids[row].clone()
        mask[row] = 0
        if side == "right":
            ids[row, :keep] = real[:keep]
            ids[row, keep:] = pad
            mask[row, :keep] = 1
        else:
            ids[row, length - keep :] = real[:keep]
            ids[row, : length - keep] = pad
            mask[row, length - keep :] = 1
        out = {**inputs, "input_ids": ids, "attention_mask": mask}
        if self.kind == MASKED_LM:
            position = torch.full((ids.shape[0],), 2)
            if side == "left":
                position[row] = length - keep + 2
            out["position"] = position
        return self.with_eos(out)

    def attribute(self, inputs: dict[str, Any], mode: str, positional: bool = True):
        from .engine import explain
        from .request import single_request

        model_inputs = {k: v for k, v in inputs.items() if k not in ("position", "mask_token_id")}
        request = single_request(
            self.model,
            model_inputs,
            mode=mode,
            positional=positional,
            position=inputs.get("position"),
            mask_token_id=inputs.get("mask_token_id"),
        )
        return explain(request)

    # ---- the properties -----------------------------------------------------------------------------------

    def forward_equivalence(self) -> None:
        from .engine import lrp

        inputs = self.inputs()
        model_inputs = {k: v for k, v in inputs.items() if k not in ("position", "mask_token_id")}
        with torch.no_grad():
            plain = self.model(**model_inputs).logits
        for mode in MODES:
            for positional in (True, False):
                name = f"forward equivalence ({mode}, positional={positional})"
                with self.attempt(name):
                    with lrp(self.model, mode=mode, positional=positional), torch.enable_grad():
                        patched = self.model(**model_inputs).logits
                    ok = _close(patched.detach(), plain, 1e-12)
                    self.record(
                        name, ok, "" if ok else f"max diff {float((patched - plain).abs().max()):.3g}"
                    )

    def conservation(self) -> None:
        """Bias-free CP: token + position (+ segment) = explained logit, to float64 precision."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:
            _zero_biases(self.model)
            attr = self.attribute(self.inputs(), "cp")
            gap = attr.conservation_gap.abs()
            scale = attr.target_value.abs().clamp(min=1.0)
            worst = float((gap / scale).max())
            self.record("bias-free CP conservation", worst <= self.tol, f"relative gap {worst:.2e}")
            if self.adapter.positions.inside_attention:
                zero = float(attr.position.abs().max())
                self.record(
                    "CP gives positions inside attention exactly 0", zero == 0.0, f"max |position| {zero:.2e}"
                )
        finally:
            self.model.load_state_dict(saved)

    def position_relevance(self) -> None:
        attr = self.attribute(self.inputs(), "attnlrp")
        share = float(attr.position.abs().sum() / attr.relevance.abs().sum().clamp(min=1e-30))
        self.record(
            "AttnLRP position relevance is non-zero",
            share > 1e-6,
            f"position share of |relevance| {share:.3g}",
        )
        finite = all(bool(torch.isfinite(m).all()) for m in (attr.token, attr.position))
        self.record("maps are finite", finite)

    def images(self) -> None:
        """Vision-language models (issue 19), on prompts with one image per row: forward equivalence, bias-free
        CP conservation over text and image maps together, non-zero image positions under AttnLRP, exactly 0
        token relevance at the image placeholders (their embeddings are overwritten), and a row's maps alone
        equal to its maps inside the batch."""
        if getattr(self.adapter, "vision", None) is None:
            return
        from .engine import lrp

        gen = torch.Generator().manual_seed(self.seed + 2)
        inputs = self.adapter.inputs.example(self.model, 2, 6, gen)
        with torch.no_grad():
            plain = self.model(**inputs).logits
        for mode in MODES:
            with self.attempt(f"forward equivalence with images ({mode})"):
                with lrp(self.model, mode=mode), torch.enable_grad():
                    patched = self.model(**inputs).logits
                self.record(
                    f"forward equivalence with images ({mode})", _close(patched.detach(), plain, 1e-12)
                )
        with self.attempt("bias-free CP conservation with images"):
            saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            try:
                _zero_biases(self.model)
                attr = self.attribute(inputs, "cp")
            finally:
                self.model.load_state_dict(saved)
            worst = float((attr.conservation_gap.abs() / attr.target_value.abs().clamp(min=1.0)).max())
            share = float(attr.image_total.abs().sum() / attr.target_value.abs().sum().clamp(min=1e-30))
            self.record(
                "bias-free CP conservation with images (text + image maps)",
                worst <= self.tol and share > 1e-6,
                f"relative gap {worst:.2e}, image share {share:.3g}",
            )
        for mode in MODES:
            with self.attempt(f"image maps ({mode})"):
                attr = self.attribute(inputs, mode)
                placeholders = inputs["input_ids"] == _image_token(self.model)
                zero = float(attr.token[placeholders.to(attr.token.device)].abs().max())
                self.record(
                    f"image placeholders get 0 token relevance ({mode})", zero == 0.0, f"max {zero:.2e}"
                )
                finite = all(bool(torch.isfinite(m).all()) for m in (attr.image, attr.image_position))
                self.record(f"image maps are finite ({mode})", finite)
                alone = self.attribute({k: v[1:] for k, v in inputs.items()}, mode)
                same = all(
                    _close(getattr(attr, name)[1:], getattr(alone, name), 1e-9)
                    for name in ("token", "position", "image", "image_position", "image_special")
                )
                self.record(f"image batch invariance ({mode})", same)
                if mode == "attnlrp":
                    share = float(attr.image_position.abs().sum() / attr.image.abs().sum().clamp(min=1e-30))
                    self.record(
                        "AttnLRP image position relevance is non-zero", share > 1e-6, f"share {share:.3g}"
                    )

    def padding_and_batches(self) -> None:
        inputs = self.inputs()
        if self.adapter.inputs.kind == "image":
            for mode in MODES:
                with self.attempt(f"batch invariance ({mode})"):
                    both = self.attribute(inputs, mode)
                    alone = self.attribute({"pixel_values": inputs["pixel_values"][1:]}, mode)
                    ok = _close(both.relevance[1:], alone.relevance, 1e-9) and _close(
                        both.position[1:], alone.position, 1e-9
                    )
                    self.record(f"batch invariance ({mode})", ok)
            return
        for mode in MODES:
            for side in ("left", "right"):
                with self.attempt(f"padding and batch invariance ({mode}, {side} padding)"):
                    self.padded_row(inputs, mode, side)

    def padded_row(self, inputs: dict[str, Any], mode: str, side: str) -> None:
        """Row 1 cut by two tokens and padded on ``side``: its padding gets exactly 0, and its maps equal those of
        the row alone."""
        keep = inputs["input_ids"].shape[1] - 2
        padded = self.pad(inputs, 1, keep, side)
        attr = self.attribute(padded, mode)
        pad_positions = padded["attention_mask"][1] == 0
        maps = [attr.token, attr.position] + [m for m in (attr.segment,) if m is not None]
        zero = all(float(m[1][pad_positions.to(m.device)].abs().max()) == 0.0 for m in maps)
        if attr.position_by_layer is not None:
            zero = zero and float(attr.position_by_layer[1][:, pad_positions].abs().max()) == 0.0
        self.record(f"padding gets exactly 0 ({mode}, {side} padding)", zero)
        alone_inputs = {
            "input_ids": padded["input_ids"][1:, ~pad_positions],
            "attention_mask": torch.ones(1, keep, dtype=torch.long),
        }
        if self.kind == MASKED_LM:
            alone_inputs.update(position=2, mask_token_id=self.mask_id)
        if self.kind == SEQ2SEQ_LM:
            alone_inputs.update(
                decoder_input_ids=padded["decoder_input_ids"][1:],
                decoder_attention_mask=padded["decoder_attention_mask"][1:],
            )
        alone = self.attribute(alone_inputs, mode)
        row = attr[1].unpad()
        ok = _close(row.relevance, alone.relevance, 1e-9) and _close(row.position, alone.position, 1e-9)
        ok = ok and _close(row.target_value, alone.target_value, 1e-9)
        self.record(f"batch invariance ({mode}, {side} padding)", ok)

    def rotary_split(self, config: PretrainedConfig) -> None:
        """One layer, bias-free, AttnLRP: ``token(positions on) + position = token(positions off)`` per position.

        At ``q_rot = q cos + rotate(q) sin`` the uniform rule sends half of each product to the rotary leaves;
        with positions off, q and k get it all. In one layer nothing but per-position maps (norm, projections)
        lies between the token leaf and q, k, so the split must be exact position by position (method.md 3.2).
        It tells a rotated slice declared at the wrong end, or a whole-head 1/2 on a partially rotary head,
        from the right declaration — which CP conservation (q, k constant there) cannot.
        """
        if not isinstance(self.adapter.positions, Rotary):
            return
        kinds = _layer_kinds(config)
        for (
            index
        ) in kinds:  # one layer of each kind: a NoPE or global layer declared as rotating is caught too
            one = _one_layer(config, index)
            if one is None:
                self.record("rotary split in one layer", True, "skipped: no one-layer variant of this config")
                return
            torch.manual_seed(self.seed)
            model = type(self.model)(one).to(torch.float64).eval()
            _randomise(model, self.seed)
            _zero_biases(model)
            checker = _Checker(model, self.adapter, AdapterReport(""), self.tol, self.seed)
            inputs = checker.inputs()
            with rotary_leaves_in_graph():  # the model's own rotation, not the declared one, gives the leaves
                on = checker.attribute(inputs, "attnlrp", positional=True)
            off = checker.attribute(inputs, "attnlrp", positional=False)
            # a token-type (segment) leaf beside the token leaf shares the embedding sum's relevance with it, and
            # that share moves with the positions too (rotary encoders with token types: GTE, NomicBERT, Jina v3)
            total = on.relevance
            scale = float(off.relevance.abs().max().clamp(min=1e-30))
            worst = float((total - off.relevance).abs().max()) / scale
            which = f", a layer like layer {index}" if len(kinds) > 1 else ""
            self.record(
                f"rotary split in one layer (token + position = token without positions{which})",
                worst <= self.tol,
                f"relative difference {worst:.2e}",
            )

    def rule_sites(self) -> None:
        """Every gated product and norm, in every mode, against its explicit float64 rule
        (:mod:`hf_pelrp.check_sites`): the only check that sees a factor on the wrong side of a gated product."""
        from .check_sites import check_sites

        inputs = self.inputs()
        model_inputs = {k: v for k, v in inputs.items() if k not in ("position", "mask_token_id")}
        for mode in MODES:
            with self.attempt(f"rule sites ({mode})"):
                sites = check_sites(self.model, self.adapter, model_inputs, mode, self.tol, self.seed)
                for kind in dict.fromkeys(s.kind for s in sites):
                    mine = [s for s in sites if s.kind == kind]
                    failed = [s for s in mine if not s.passed]
                    skipped = sorted({s.detail for s in mine if s.passed and s.detail.startswith("skipped")})
                    detail = "; ".join(f"{s.site}: {s.detail}" for s in failed) or "; ".join(
                        [f"{len(mine)} sites", *skipped]
                    )
                    self.record(f"{kind} sites match the explicit float64 rule ({mode})", not failed, detail)

    def restoration(self, before: dict[str, Any]) -> None:
        problems = _differences(before, _snapshot(self.model))
        self.record(
            "model restored exactly (weights, hooks, configs, attention, flags)",
            not problems,
            ", ".join(problems),
        )


def check_adapter(
    config_or_model_type: PretrainedConfig | str,
    *,
    classes: Iterable[type] | None = None,
    seed: int = 0,
    tol: float = 1e-6,
    raise_on_failure: bool = True,
) -> AdapterReport:
    """Check the adapter of a model type on tiny random float64 instances of every head it explains.

    Parameters
    ----------
    config_or_model_type
        A ``config.model_type`` (a tiny configuration is built from the adapter's ``tiny`` overrides), or a
        (small) configuration.
    classes
        The model classes to check (default: every head class transformers maps the type to, for the head
        kinds the adapter explains).
    seed
        Seed of the random weights and inputs.
    tol
        Relative tolerance of the conservation check. The instances run in float64, but transformers computes
        the statistics of its norms in float32 even there, so "exact" means exact up to float32 rounding
        (a relative gap of about 1e-8); a rule that does not match its module leaves gaps of percents.
    raise_on_failure
        Raise :class:`AdapterCheckError` listing the failed checks (default) instead of returning them.

    Returns
    -------
    AdapterReport
        Every check of every head class, with details (e.g. the relative conservation gap).
    """
    if isinstance(config_or_model_type, PretrainedConfig):
        model_type = config_or_model_type.model_type
    else:
        model_type = str(config_or_model_type)
    report = AdapterReport(model_type)
    if isinstance(config_or_model_type, PretrainedConfig):
        variants: tuple[Adapter, ...] = (adapter_for_config(model_type, config_or_model_type),)
    else:
        variants = adapter_variants(model_type)  # a config-aware type: every variant on its own tiny config
    classes = list(classes) if classes is not None else None  # iterated once per variant
    for adapter in variants:
        _check_variant(config_or_model_type, adapter, report, classes, seed, tol, len(variants) > 1)
    if raise_on_failure and not report.passed:
        raise AdapterCheckError(str(report))
    return report


def _image_token(model: torch.nn.Module) -> int:
    config = model.config
    value = getattr(config, "image_token_id", None)
    return int(value if value is not None else config.image_token_index)


def _check_variant(
    config_or_model_type: PretrainedConfig | str,
    adapter: Adapter,
    report: AdapterReport,
    classes: Iterable[type] | None,
    seed: int,
    tol: float,
    named: bool,
) -> None:
    model_type = report.model_type
    config = tiny_config(config_or_model_type, adapter)
    classes = list(classes) if classes is not None else head_classes(model_type, adapter)
    if not classes:
        report.results.append(
            CheckResult(
                "-",
                "the adapter explains at least one head class",
                False,
                f"no head class of {model_type!r} matches the adapter's heads {adapter.heads}",
            )
        )
    for cls in classes:
        torch.manual_seed(seed)
        model = cls(copy.deepcopy(config)).to(torch.float64).eval()
        _randomise(model, seed)
        checker = _Checker(model, adapter, report, tol, seed)
        if named:  # results of a config-aware type's variants are told apart by the declaration's name
            checker.name = f"{checker.name} [{adapter.label}]"
        if getattr(adapter, "vision", None) is not None:
            # transformers records a vision tower's hidden states with forward hooks it installs at the first
            # forward pass that asks for them, and keeps: installed here, they are the model's "as it went in"
            with torch.no_grad():
                model(**adapter.inputs.example(model, 1, 2, torch.Generator().manual_seed(seed)))
        before = _snapshot(model)
        try:
            adapter.check_model(model)
        except Exception as err:  # noqa: BLE001 - a failing declaration is reported, not hidden
            # every property below attributes, and every attribution would refuse the same way
            checker.record("the declaration covers the model", False, f"{type(err).__name__}: {err}")
        else:
            properties = (
                ("forward equivalence", checker.forward_equivalence),
                ("bias-free CP conservation", checker.conservation),
                ("position relevance", checker.position_relevance),
                ("padding and batches", checker.padding_and_batches),
                ("rotary split", functools.partial(checker.rotary_split, config)),
                ("rule sites", checker.rule_sites),
                ("images", checker.images),
            )
            for name, check in properties:  # each one runs: the report lists every failure, not the first
                try:
                    check()
                except Exception as err:  # noqa: BLE001 - a failing declaration is reported, not hidden
                    checker.record(f"{name} runs", False, f"{type(err).__name__}: {err}")
        checker.restoration(before)


# the inference of declarations (adapters/infer.py) proves what it infers with check_adapter; it sits below this
# module, so the proof is handed down here rather than imported up there
_infer.PROOF.update(check_adapter=check_adapter, randomise=_randomise)
