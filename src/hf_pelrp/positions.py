"""Positional kinds: where a family's positions enter, how they become leaves, how their relevance is read.

Each kind is an object an adapter declares (``positions=Rotary()``, ``Additive({"wpe": "position"})``); the
engine never branches on a family's name. A kind

- attaches the rules that make its positional tensors leaves (:meth:`PositionalKind.rules`), only when the
  configuration asks for positions (``positional=True``); otherwise the tensors stay constants, which absorb
  their relevance (visible in the conservation gap) — the classic LRP baseline;
- changes the attention factors where positions act inside attention (:meth:`PositionalKind.attention_rule`:
  the rotary 1/2 on the rotated channels of q and k);
- reads the maps after the backward pass (:meth:`PositionalKind.read`): ``position`` [B, T] always,
  ``position_abs`` [B, T] (the sum of the absolute relevance of every positional leaf: the PE-LRP paper's
  aggregation, method.md 2 "Forming the maps"), ``position_by_layer`` [B, L, T] where every layer has its own
  leaves, and kind-specific extras.

method.md section 2 gives the rules; the formulas are repeated in each class.
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .attention import AttentionRule
from .config import LRPConfig
from .devices import execution_device
from .errors import UnsupportedModelError
from .hooks import EmbeddingLeaf, Handles, HookRule, LeafStore, make_leaf
from .modules import find_module
from .offsets import REQUESTED, LayerOffsets, OffsetRecorder, Rotation, bias_offsets, offset_maps
from .rules import relevance_dtype, relevance_of

Maps = dict[str, Any]


@dataclass(frozen=True)
class PositionalSite:
    """Where a model's positional tensors enter, as its adapter declares it (:func:`positional_site`).

    Attributes
    ----------
    kind
        The positional kind's name: ``"additive"``, ``"rotary"``, ``"alibi"`` / ``"relative-bias"``, ``"none"``.
    modules
        Additive kinds: the modules whose outputs are the position embedding (added to the token embedding).
    attention
        Kinds that act inside attention: the attention module of each layer (rotary: called with the
        ``keyword`` pair, in the order ``names``).
    keyword, names
        Rotary: the attention keyword carrying the pair, and the order of the pair (``("cos", "sin")``).
    attention_scaling
        Rotary: the factor of cos and sin (1 for plain RoPE): the identity rotation is ``(scaling, 0)``.
    """

    kind: str
    modules: tuple[torch.nn.Module, ...] = ()
    attention: tuple[torch.nn.Module, ...] = ()
    keyword: str = ""
    names: tuple[str, ...] = ()
    attention_scaling: float = 1.0


class PositionalKind(ABC):
    """Where positions enter one family. Subclasses are small declarations (see the module docstring)."""

    #: a short name for reports and the model card ("rotary", "additive", ...)
    name: str = ""
    #: positions act inside attention on q and k only: CP-LRP (q, k constant) gives them exactly 0
    inside_attention: bool = False

    def offsets_refusal(self, attention_interface: bool) -> str | None:
        """Why this kind cannot give relevance per offset (``LRPConfig(offsets=True)``), or ``None`` if it can."""
        return (
            f"its positions are {self.name or type(self).__name__}, not rotary or a per-pair attention bias"
        )

    def rules(
        self,
        model: torch.nn.Module,
        layers: list[torch.nn.Module],
        attention: list[torch.nn.Module],
        store: LeafStore,
    ) -> list[tuple[torch.nn.Module, HookRule]]:
        """The rules that make the positional tensors leaves of ``store`` (called only with positions on)."""
        return []

    def attention_rule(self, rule: AttentionRule, config: LRPConfig) -> AttentionRule:
        """The attention factors of one layer, given the kind (default: unchanged)."""
        return rule

    @abstractmethod
    def read(self, store: LeafStore, token: torch.Tensor, num_layers: int) -> Maps:
        """``position`` [B, T] (and kind-specific maps) of the latest backward pass; ``token`` gives B, T."""

    def describe(self) -> str:
        """One line for the model card and the README table."""
        return self.name


def _as_map(relevance: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B, T] (or broadcastable) relevance on the device and dtype of ``like``, expanded to its shape."""
    return relevance.to(device=like.device, dtype=like.dtype).expand_as(like)


class SharedRows(HookRule):
    """Give a positional table's [T, H] output (position ids without a batch axis, shared by every row) the
    batch axis [1, T, H] during the model's forward pass, before :class:`EmbeddingLeaf` (registered after it)
    expands it to one leaf per row. ``[1, T, H] + [B, T, H]`` broadcasts as ``[T, H] + [B, T, H]`` did: the
    forward pass is unchanged. Outputs of any other rank are left as they are."""

    def __init__(self, store: LeafStore):
        self.store = store

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        def hook(_module, _args, output):
            if (
                not self.store.aux.get("in_forward")
                or not isinstance(output, torch.Tensor)
                or output.dim() != 2
            ):
                return None
            return output.unsqueeze(0)

        handles.append(module.register_forward_hook(hook))


@dataclass(frozen=True)
class NoPositions(PositionalKind):
    """A family without positional encodings: the position map is exactly 0."""

    name: str = "none"

    def read(self, store: LeafStore, token: torch.Tensor, num_layers: int) -> Maps:
        return {"position": torch.zeros_like(token), "position_abs": torch.zeros_like(token)}


@dataclass(frozen=True)
class Additive(PositionalKind):
    """Learned absolute or fixed sinusoidal positions added to the token embedding (method.md 2).

    At ``e = t + p (+ s)`` relevance splits in proportion to each addend, which in Gradient x Input form only
    needs each addend to be a leaf: ``R_t = t * g``, ``R_p = p * g`` with ``g`` the gradient at ``e``.
    ``modules`` maps a base-model module path to the leaf name its output becomes (``"position"``); the map
    is read from the ``"position"`` leaf (vision families build it from their own embedding rule, with no
    module here). The leaf is a copy of the module's output, one per batch row; a sinusoidal table is never
    modified. A table that returns one [T, H] block for the whole batch (the sinusoidal and learned tables of
    Marian, Pegasus and Blenderbot index it with a 1-D ``arange``) gets a batch axis first
    (:class:`SharedRows`), so that it too becomes one leaf per batch row.
    """

    modules: Mapping[str, str] = field(default_factory=lambda: {"embeddings.position_embeddings": "position"})
    name: str = "additive"
    description: str = "learned absolute"

    def rules(self, model, layers, attention, store):
        base = model.base_model
        rules: list[tuple[torch.nn.Module, HookRule]] = []
        for path, leaf in self.modules.items():
            module = find_module(base, path)
            rules.append((module, SharedRows(store)))
            rules.append((module, EmbeddingLeaf(store, (leaf,))))
        return rules

    def read(self, store: LeafStore, token: torch.Tensor, num_layers: int) -> Maps:
        leaf = store.additive.get("position")
        if leaf is None:
            return {"position": torch.zeros_like(token), "position_abs": torch.zeros_like(token)}
        position = _as_map(relevance_of(leaf), token)
        return {"position": position, "position_abs": position.abs()}

    def describe(self) -> str:
        return f"{self.description}: additive `position` leaf"


class RotaryLeaves(HookRule):
    """Give one attention layer its own rotary leaves (PE-LRP, method.md section 2).

    A forward pre-hook replaces the ``keyword`` argument of the attention module (a tuple of two tensors, in
    the order ``names``) by fresh leaves stored under the layer index; re-running the same layer within one
    forward (gradient-checkpointing recomputation) reuses them, so no leaf is created twice. It also records,
    on the layer's :class:`AttentionRule`, how many channels of q and k rotate, so that the rotary 1/2 reaches
    the rotated channels only.
    """

    def __init__(
        self, kind: Rotary, store: LeafStore, layer: int, rule_of: Callable[[], AttentionRule | None]
    ):
        self.kind = kind
        self.store = store
        self.layer = layer
        self.rule_of = rule_of

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        kind, store, layer = self.kind, self.store, self.layer

        def hook(attention, args, kwargs):
            rule = self.rule_of()
            chunk = store.aux.get(REQUESTED)
            if rule is not None:  # set again below where this forward pass rotates with constants
                rule.rotary_leaves = None
            if rule is not None:  # a fresh recorder per forward pass, or none when the maps are not asked for
                rule.offsets = None if chunk is None else OffsetRecorder(store.aux, layer, chunk)
            pe = kwargs.get(kind.keyword)
            if pe is None or (kind.applies is not None and not kind.applies(attention)):
                return None
            first, second = pe
            batch = store.batch_size
            if batch is not None and first.shape[kind.batch_axis] == 1 and batch > 1:
                # shared position ids: give every row its own copy, so maps are per row
                first, second = (kind.expand(t, batch) for t in (first, second))
            # the leaves live where their layer computes (device_map models: each layer's own device)
            device = execution_device(attention) or first.device
            first, second = first.to(device), second.to(device)
            existing = store.layers.get(layer)
            if (
                existing is None
                or existing[kind.names[0]].shape != first.shape
                or existing[kind.names[0]].device != first.device
            ):
                existing = {kind.names[0]: make_leaf(first), kind.names[1]: make_leaf(second)}
                store.layers[layer] = existing
            cos, sin = (existing[kind.names[0]], existing[kind.names[1]])
            if kind.names[0] != "cos":  # GPT-J passes (sin, cos)
                cos, sin = sin, cos
            pair = (existing[kind.names[0]], existing[kind.names[1]])
            if rule is not None:
                rule.rotated = (kind.rotated_channels(first), kind.rotated)
                if rule.offsets is not None:
                    rule.offsets.rotation = Rotation(cos, sin, kind.layout, kind.rotated)
                if (
                    kind.gradient_at_attention(attention)
                    and kind.layout_matches(cos)
                    and not _handed_on(attention, own[0])
                    and not _has_cached_keys(attention, kwargs)
                ):
                    # the model rotates with constants (autograd keeps nothing for them); the "lrp" attention
                    # gives the leaves their gradient from q_rot, k_rot (hf_pelrp.offsets.rotary_leaf_gradient)
                    rule.rotary_leaves = Rotation(cos, sin, kind.layout, kind.rotated)
                    pair = (pair[0].detach(), pair[1].detach())
            kwargs = dict(kwargs)
            kwargs[kind.keyword] = pair
            return args, kwargs

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        own = [handle.id]
        handles.append(handle)


#: set by :func:`rotary_leaves_in_graph`
_IN_GRAPH: contextvars.ContextVar[bool] = contextvars.ContextVar("rotary_leaves_in_graph", default=False)


@contextlib.contextmanager
def rotary_leaves_in_graph() -> Iterator[None]:
    """Within the block, rotary leaves stay in the model's graph (the model rotates with the leaves themselves).

    The gradient computed at the attention (:func:`hf_pelrp.offsets.rotary_leaf_gradient`) follows the
    *declared* layout, so it is conservative even for a wrong declaration; the graph follows the model's own
    rotation. ``check_adapter``'s rotary split runs here, where a rotated slice declared at the wrong end
    breaks the split (and so proves the declaration the attention-side gradient relies on).
    """
    token = _IN_GRAPH.set(True)
    try:
        yield
    finally:
        _IN_GRAPH.reset(token)


def _has_cached_keys(module: torch.nn.Module, kwargs: dict) -> bool:
    """Whether the attention's keys will include cached ones (rotated in earlier passes, outside this layer's
    cos / sin): their rotation is not this pass's, so the leaves stay in the graph."""
    for name in ("past_key_values", "past_key_value", "layer_past"):
        cache = kwargs.get(name)
        if cache is None:
            continue
        try:
            return int(cache.get_seq_length(getattr(module, "layer_idx", 0) or 0)) > 0
        except Exception:  # an unknown cache object: assume it holds keys
            return True
    return False


def _handed_on(module: torch.nn.Module, own: int) -> bool:
    """Whether a forward pre-hook from outside the engine runs after the rotary leaves' hook ``own`` of
    ``module`` (an evaluation's position removal, a test's independent read): it sees and may replace the pair,
    so the leaves stay in the graph, where any change it makes reaches their gradient."""
    ids = list(module._forward_pre_hooks)
    later = ids[ids.index(own) + 1 :] if own in ids else ids
    for hook_id in later:
        where = getattr(module._forward_pre_hooks[hook_id], "__module__", "") or ""
        if not where.startswith("hf_pelrp.") or where.startswith("hf_pelrp.evaluation"):
            return True
    return False


@dataclass(frozen=True)
class Rotary(PositionalKind):
    """Rotary position embeddings (RoPE): per-layer ``(cos, sin)`` leaves (method.md 2, "Rotary variants").

    ``q_rot = q * cos + rotate(q) * sin`` (likewise k). The uniform rule at each product sends half of its
    relevance to q (k) and half to cos (sin): the gradient reaching the *rotated* channels of q and k is
    multiplied by 1/2 (``AttentionRule.rotary``), and cos / sin receive gradient. Per layer ``l`` and position
    ``i``: ``position_l[i] = sum_d (cos_l * cos_l.grad)[i, d] + sum_d (sin_l * sin_l.grad)[i, d]`` (q and k
    sides and all heads together), ``position[i] = sum_l position_l[i]``.

    Parameters
    ----------
    keyword
        The attention module's keyword argument carrying the pair (``position_embeddings``).
    names
        The order of the pair (GPT-J passes ``(sin, cos)``).
    layout
        ``"half"`` (LLaMA: a cos / sin width of ``rotary_dim``) or ``"interleaved"`` (GPT-J: pairs (0, 1),
        (2, 3), ...; cos / sin of width ``rotary_dim / 2``, repeated inside the model).
    rotated
        Whether the rotated channels are the ``"first"`` ``rotary_dim`` channels of each head (partial rotary:
        GPT-NeoX, Phi, StableLM) or the ``"last"`` (a decoupled rotary part after the content part).
    applies
        For models that switch rotary off in some layers (NoPE layers): whether an attention module applies it.
        Layers that do not have no leaf: their position relevance is exactly 0, and q, k keep the full factor.
    batch_axis
        The batch axis of the cos / sin tensors (1 for M-RoPE's ``[3, B, T, D]``).
    """

    keyword: str = "position_embeddings"
    names: tuple[str, str] = ("cos", "sin")
    layout: str = "half"
    rotated: str = "first"
    applies: Callable[[torch.nn.Module], bool] | None = None
    batch_axis: int = 0
    name: str = "rotary"
    inside_attention: bool = True
    #: keep the leaves in the model's graph (autograd then keeps q, rotate(q), k, rotate(k) of every layer);
    #: by default a plain ``Rotary`` running through the "lrp" attention gives them their gradient there instead
    in_graph: bool = False

    def layout_matches(self, cos: torch.Tensor) -> bool:
        """Whether ``cos`` has the form of the declared layout: ``"half"`` pairs channel ``d`` with ``d + w/2``
        under one angle, so its cos is two equal halves (Cohere's full-width cos repeats each frequency in
        place: its pairs are interleaved, and it keeps the in-graph leaves, which do not depend on the pairing).
        """
        if self.layout == "interleaved":
            return True
        half = cos.shape[-1] // 2
        return cos.shape[-1] % 2 == 0 and torch.equal(cos[..., :half], cos[..., half:])

    def gradient_at_attention(self, attention: torch.nn.Module) -> bool:
        """Whether ``attention``'s leaves get their gradient at the ``"lrp"`` attention from q_rot and k_rot
        (:func:`hf_pelrp.offsets.rotary_leaf_gradient`), the model rotating with detached ``(cos, sin)``.

        Only for this class itself (subclasses declare other rotations: M-RoPE, complex, inline), the two
        declared layouts, cos / sin with the batch first, and a module that dispatches to the ``"lrp"``
        attention (the same value is exact: only memory changes)."""
        from .attention import LRP_ATTENTION

        config = getattr(attention, "config", None)
        return (
            not self.in_graph
            and not _IN_GRAPH.get()
            and type(self) is Rotary
            and self.batch_axis == 0
            and self.layout in ("half", "interleaved")
            and getattr(config, "_attn_implementation", None) == LRP_ATTENTION
        )

    def rotated_channels(self, cos: torch.Tensor) -> int:
        return cos.shape[-1] * (2 if self.layout == "interleaved" else 1)

    def expand(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[self.batch_axis] = batch
        return t.expand(*shape)

    def rules(self, model, layers, attention, store):
        from .attention import attention_rule

        return [
            (module, RotaryLeaves(self, store, i, lambda m=module: attention_rule(m)))
            for i, module in enumerate(attention)
        ]

    def attention_rule(self, rule: AttentionRule, config: LRPConfig) -> AttentionRule:
        if config.positional:
            rule.rotary = 0.5
        return rule

    def leaf_relevance(self, leaf: torch.Tensor) -> torch.Tensor:
        """[B, T] relevance of one cos or sin leaf (summed over its trailing axis)."""
        r = relevance_of(leaf)
        if self.batch_axis != 0:
            r = r.sum(0)  # M-RoPE: the axes (temporal, height, width) of one position together
        return r

    def offsets_refusal(self, attention_interface: bool) -> str | None:
        if not attention_interface:
            return (
                "its attention is written inline (the 'lrp' attention, which records the scores, never runs)"
            )
        if self.batch_axis != 0 or self.layout not in ("half", "interleaved"):
            return f"its rotary layout ({self.name}, {self.layout}) is not one relevance per offset can undo"
        return None

    def read(self, store: LeafStore, token: torch.Tensor, num_layers: int) -> Maps:
        batch, seq = token.shape
        by_layer = torch.zeros(batch, num_layers, seq, device=token.device, dtype=token.dtype)
        # [B, L, 2, T]: each leaf of the pair (in the order of ``names``) separately
        by_leaf = torch.zeros(batch, num_layers, len(self.names), seq, device=token.device, dtype=token.dtype)
        absolute = torch.zeros_like(token)
        for layer, leaves in store.layers.items():
            for i, name in enumerate(self.names):
                if name not in leaves:
                    continue
                r = _as_map(self.leaf_relevance(leaves[name]), token)
                by_leaf[:, layer, i] = r
                by_layer[:, layer] += r
                absolute += r.abs()
        maps = {
            "position_by_layer": by_layer,
            "position": by_layer.sum(1),
            "position_abs": absolute,
            "position_by_leaf": by_leaf,
        }
        recorded = {key[1]: v for key, v in store.aux.items() if isinstance(v, LayerOffsets)}
        maps.update(offset_maps(recorded, token, num_layers))
        return maps

    def describe(self) -> str:
        parts = {"half": "rotary", "interleaved": "interleaved rotary"}[self.layout]
        return f"{parts}: per-layer `(cos, sin)` leaves (`attr.position_by_layer`)"


class _RecordAux(HookRule):
    """Record a value in ``store.aux`` at every forward pass (the store is cleared when a forward pass starts)."""

    def __init__(self, store: LeafStore, key: str, value: object):
        self.store, self.key, self.value = store, key, value

    def attach(self, module: torch.nn.Module, handles: Handles) -> None:
        def hook(_module, _args):
            self.store.aux[self.key] = self.value

        handles.append(module.register_forward_pre_hook(hook))


def offsets_request(store: LeafStore, chunk: int | None) -> HookRule:
    """The rule (on the model) that marks every forward pass as asking for relevance per offset, with the query
    block size of the rotary re-computation (``None``: one block)."""
    return _RecordAux(store, REQUESTED, chunk or 0)


@dataclass(frozen=True)
class MultimodalRotary(Rotary):
    """M-RoPE (Qwen2-VL, Qwen2.5-VL language models; method.md 2, "M-RoPE"): rotary leaves as :class:`Rotary`,
    plus the position relevance per axis.

    The rotary frequencies are split into sections (``mrope_section``, e.g. ``[16, 24, 24]`` of the ``D / 2``
    frequencies of a head): section ``i`` takes its angle from the position ids of axis ``i % 3`` (temporal,
    height, width), and the ``(cos, sin)`` pair the attention receives is ``cat(f, f)`` of the recomposed
    frequencies. The leaves and their rule are those of :class:`Rotary`; the map is additionally summed per
    axis over the channels of its sections (in both halves):
    ``position_by_axis[b, a, i] = sum_l sum_{d in axis a} (cos_l * cos_l.grad + sin_l * sin_l.grad)[b, i, d]``
    ([B, 3, T], in the result's extras), so that ``position_by_axis.sum(1) == position``.

    ``sections`` is the base-model path of the module holding ``mrope_section`` (the language model's rotary
    embedding): the split is read from the model instance when the rules are attached.
    """

    sections: str = "language_model.rotary_emb"
    axes: tuple[str, ...] = ("temporal", "height", "width")
    name: str = "mrope"

    def offsets_refusal(self, attention_interface: bool) -> str | None:
        return "M-RoPE rotates by three position axes at once: one offset per pair does not describe it"

    def section_sizes(self, model: torch.nn.Module) -> tuple[int, ...]:
        holder = find_module(model.base_model, self.sections)
        sizes = getattr(holder, "mrope_section", None)
        if not sizes:
            raise UnsupportedModelError(
                f"{type(holder).__name__} at {self.sections!r} has no mrope_section: not the M-RoPE layout the "
                "adapter declares"
            )
        return tuple(int(s) for s in sizes)

    def rules(self, model, layers, attention, store):
        sizes = self.section_sizes(model)
        return [
            *super().rules(model, layers, attention, store),
            *((module, _RecordAux(store, "mrope_section", sizes)) for module in attention),
        ]

    def axis_of_channels(self, sizes: tuple[int, ...], width: int) -> torch.Tensor:
        """The axis (0 temporal, 1 height, 2 width) of each of the ``width`` channels of a cos / sin leaf."""
        half = torch.cat([torch.full((size,), i % len(self.axes)) for i, size in enumerate(sizes)])
        if 2 * half.numel() != width:
            raise UnsupportedModelError(
                f"mrope_section {list(sizes)} covers {half.numel()} frequencies, but the rotary leaves have "
                f"{width} channels (expected twice as many)"
            )
        return torch.cat((half, half))

    def read(self, store: LeafStore, token: torch.Tensor, num_layers: int) -> Maps:
        maps = super().read(store, token, num_layers)
        batch, seq = token.shape
        by_axis = torch.zeros(batch, len(self.axes), seq, device=token.device, dtype=token.dtype)
        sizes = store.aux.get("mrope_section")
        for leaves in store.layers.values():
            for leaf in leaves.values():
                if leaf.grad is None or sizes is None:
                    continue
                axis = self.axis_of_channels(sizes, leaf.shape[-1]).to(leaf.device)
                per_channel = leaf.detach().to(by_axis.dtype) * leaf.grad.to(by_axis.dtype)
                for a in range(len(self.axes)):
                    by_axis[:, a] += _as_map(per_channel[..., axis == a].sum(-1), token)
        maps["position_by_axis"] = by_axis
        return maps

    def describe(self) -> str:
        return (
            "M-RoPE: per-layer `(cos, sin)` leaves (`attr.position_by_layer`), split by axis "
            "(`attr.position_by_axis`: temporal, height, width)"
        )


# ---- positions inside attention (method.md 2 "Positions inside attention") -----------------------------------

#: the per-layer leaf name of a positional attention bias, and the prefix of the maps read from it
BIAS_LEAF = "bias"


@dataclass(frozen=True)
class DistanceBins:
    """Which bin of ``position_by_distance`` each (query, key) pair of a bias leaf falls into.

    ``index`` [B or 1, Tq, Tk] long: the bin of each pair, ``-1`` for pairs that belong to no bin (padding);
    ``labels`` [bins]: what each bin is (the signed distance ``j - i``, a T5 bucket's smallest distance, a
    window offset's number); ``edges`` optional [bins, 2]: the distance range ``[low, high]`` each bin covers
    (T5 buckets); ``offsets`` optional [bins, 2]: the 2-D offset ``(dy, dx)`` of each bin (vision windows).
    """

    index: torch.Tensor
    labels: torch.Tensor
    edges: torch.Tensor | None = None
    offsets: torch.Tensor | None = None


def signed_distance_bins(attention_mask: torch.Tensor, length: int | None = None) -> DistanceBins:
    """Bins of the signed distance ``j - i`` between real tokens, counted over real tokens (a left-padded row
    has the distances of the row alone): bin ``d + T - 1`` for ``d`` in ``-(T-1) .. T-1``; pairs involving
    padding get ``-1``."""
    mask = attention_mask.long()
    seq = mask.shape[-1] if length is None else length
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    index = pos[:, None, :] - pos[:, :, None] + (seq - 1)
    real = mask.bool()
    index = torch.where(real[:, :, None] & real[:, None, :], index, torch.full_like(index, -1))
    labels = torch.arange(-(seq - 1), seq, device=mask.device)
    return DistanceBins(index, labels)


def bias_leaf(store: LeafStore, layer: int, value: torch.Tensor, name: str = BIAS_LEAF) -> torch.Tensor:
    """The leaf ``name`` of ``layer`` holding ``value`` ([B, H, Tq, Tk]); re-running the same layer within one
    forward pass (checkpoint recomputation) re-uses it, so no leaf is created twice."""
    existing = store.layers.get(layer, {}).get(name)
    if existing is not None and existing.shape == value.shape and existing.device == value.device:
        return existing
    leaf = make_leaf(value)
    store.layers.setdefault(layer, {})[name] = leaf
    return leaf


def canonical_alibi(
    bias: torch.Tensor, masked: torch.Tensor | None, factor: float, store: LeafStore, layer: int
) -> torch.Tensor:
    """``bias`` [B, H, T, T] as it enters the scores, backed by the canonical ALiBi leaf ``b_ij - b_ii``.

    Implementations add a per-query constant to ALiBi's ``m_h (j - i)`` (softmax ignores it: BLOOM and Falcon use
    ``m_h pos_j``, MPT ``m_h (j - T + 1)``); the leaf is the bias with distance 0 at 0 (method.md 2,
    "Shift invariance"), masked pairs (``masked`` True) are 0 in the leaf and keep the model's value. The
    returned tensor equals ``bias`` exactly (straight-through); its gradient reaches the leaf times ``factor``
    (the ``scores`` factor: 1/2 AttnLRP, 0 CP).
    """
    from .rules import scale_gradient, straight_through

    diagonal = bias.diagonal(dim1=-2, dim2=-1)[..., :, None].detach()
    canonical = bias.detach() - diagonal
    if masked is not None:
        canonical = canonical.masked_fill(masked, 0.0)
    leaf = bias_leaf(store, layer, canonical)
    surrogate = scale_gradient(leaf, factor) + diagonal
    if masked is not None:
        surrogate = torch.where(masked, bias.detach(), surrogate)
    return straight_through(bias, surrogate)


@dataclass(frozen=True)
class AttentionBias(PositionalKind):
    """Positions that enter attention as a bias on the scores (method.md 2, "Positions inside attention").

    ``s = c q k^T + b (+ mask)``: the epsilon rule at the sum gives ``R_b = b * g`` with ``g`` the gradient at the
    scores, so ``b`` (per layer, per row: [B, H, Tq, Tk]) is a leaf of ``store.layers[l]["bias"]`` with the
    ``scores`` factor of the attention rule (1/2 AttnLRP, 0 CP-LRP: exactly 0 relevance). The masking part stays
    out of the leaf.

    Maps (per leaf group: ``"bias"`` gives ``position*``; a group ``"<name>_bias"`` gives ``<name>_position*``,
    e.g. the target prefix of an encoder-decoder model):

    - ``position_by_layer`` [B, L, T]: ``sum_{h, i} R_l[b, h, i, j]``, relevance per key position;
    - ``position`` [B, T] (summed over layers), ``position_abs`` [B, T] (sum over layers of ``|.|``);
    - ``position_by_distance`` [B, bins] and ``position_distances`` [bins]: relevance per bin of
      :class:`DistanceBins` (``store.aux[("bins", group)]``, or per layer ``store.aux[("bins", group, l)]``;
      default: signed distance over real tokens of ``store.aux["attention_mask"]``); ``position_distances``
      [B, bins] labels the bins (a copy per row), ``position_distance_edges`` [B, bins, 2] gives their distance
      ranges where bins are ranges (T5 buckets).

    Windowed attention (Swin) stores its leaves as [B * windows, H, W^2, W^2] with
    ``store.aux[("windows", group, l)] = (windows, to_tokens)``: ``to_tokens`` maps the per-key relevance of each
    window [B, windows, W^2] back onto the tokens [B, T].

    Parameters
    ----------
    leaves
        ``f(model, layers, attention, store) -> [(module, rule)]`` making the leaves where the ``"lrp"``
        attention applies the factor (the bias reaches it as ``position_bias`` / a float mask). Families with
        attention written inline make their leaves with their own factor rules (``Adapter.extra_rules``).
    description
        One line for the model card.
    """

    leaves: Callable[..., list[tuple[torch.nn.Module, HookRule]]] | None = None
    description: str = "positional bias inside attention"
    name: str = "attention bias"
    inside_attention: bool = True
    #: the bias is one value per (query, key) pair of tokens (ALiBi): ``position_by_offset`` can be read from its
    #: leaves (``LRPConfig(offsets=True)``); 2-D, windowed and bucketed biases do not declare it
    per_pair_offsets: bool = False

    def offsets_refusal(self, attention_interface: bool) -> str | None:
        if self.per_pair_offsets:
            return None
        return f"its positional bias ({self.description}) is not declared as one bias per token offset"

    def rules(self, model, layers, attention, store):
        return [] if self.leaves is None else list(self.leaves(model, layers, attention, store))

    def read(self, store: LeafStore, token: torch.Tensor, num_layers: int) -> Maps:
        groups: dict[str, dict[int, torch.Tensor]] = {}
        for layer, named in store.layers.items():
            for leaf_name, leaf in named.items():
                if leaf_name == BIAS_LEAF or leaf_name.endswith("_" + BIAS_LEAF):
                    groups.setdefault(leaf_name, {})[layer] = leaf
        maps: Maps = {"position": torch.zeros_like(token), "position_abs": torch.zeros_like(token)}
        for group, leaves in groups.items():
            prefix = "position" if group == BIAS_LEAF else group[: -len(BIAS_LEAF)] + "position"
            keys = token if group == BIAS_LEAF else store.aux.get(("keys", group))
            maps.update(self._read_group(store, group, prefix, leaves, keys, num_layers))
        if self.per_pair_offsets and store.aux.get(REQUESTED) is not None and BIAS_LEAF in groups:
            # the bias leaf holds R_p = f b g_s per pair: the exact split of each score's relevance (s = c + b)
            layers = {
                layer: LayerOffsets(bias_offsets(leaf, token.dtype), None, causal=True)
                for layer, leaf in groups[BIAS_LEAF].items()
            }
            maps.update(offset_maps(layers, token, num_layers))
        return maps

    def _read_group(
        self,
        store: LeafStore,
        group: str,
        prefix: str,
        leaves: dict[int, torch.Tensor],
        like: torch.Tensor | None,
        num_layers: int,
    ) -> Maps:
        first = next(iter(leaves.values()))
        batch, keys = first.shape[0], first.shape[-1]
        if like is not None:  # windowed leaves ([B * windows, H, W^2, W^2]) are read back onto the tokens
            batch, keys = like.shape[0], like.shape[-1]
        dtype = relevance_dtype(first.dtype) if like is None else like.dtype
        device = first.device if like is None else like.device
        layers = max(num_layers, max(leaves) + 1) if group == BIAS_LEAF else max(leaves) + 1
        by_layer = torch.zeros(batch, layers, keys, dtype=dtype, device=device)
        absolute = torch.zeros(batch, keys, dtype=dtype, device=device)
        by_distance: torch.Tensor | None = None
        bins_out: DistanceBins | None = None
        for layer, leaf in sorted(leaves.items()):
            if leaf.grad is None:  # CP-LRP: nothing reaches the scores
                pairs = torch.zeros(leaf.shape[0], *leaf.shape[2:], dtype=dtype, device=device)
            else:
                pairs = relevance_of(leaf, (1,)).to(device=device, dtype=dtype)  # [B, Tq, Tk], heads summed
            windows = store.aux.get(("windows", group, layer))
            if windows is not None:
                # a windowed layer: per-key relevance of each window, put back on the tokens by the layer's map
                count, to_tokens = windows
                per_key = to_tokens(pairs.sum(1).reshape(batch, count, -1)).to(dtype)
            else:
                pairs = pairs.expand(batch, *pairs.shape[1:])
                per_key = pairs.sum(1)
            by_layer[:, layer] += per_key
            absolute += per_key.abs()
            bins = store.aux.get(("bins", group, layer), store.aux.get(("bins", group)))
            if bins is None:
                mask = store.aux.get("attention_mask")
                if mask is None or mask.shape[-1] != keys or pairs.shape[1] != keys:
                    mask = torch.ones(batch, keys, dtype=torch.long, device=device)
                bins = signed_distance_bins(mask.to(device))
            index = bins.index.to(device).expand(pairs.shape[0], *bins.index.shape[1:])
            nbins = bins.labels.numel()
            if by_distance is None:
                by_distance = torch.zeros(batch, nbins, dtype=dtype, device=device)
                bins_out = bins
            if by_distance.shape[1] != nbins:
                continue  # layers with other bins (e.g. other window sizes) only add to the per-key maps
            valid = index >= 0
            # windows of one image (rows of the leaf beyond the batch) add to the image's bins
            flat = torch.where(valid, index, torch.zeros_like(index)).reshape(batch, -1)
            by_distance.scatter_add_(1, flat, torch.where(valid, pairs, 0.0).reshape(batch, -1))
        maps: Maps = {
            f"{prefix}_by_layer": by_layer,
            prefix: by_layer.sum(1),
            f"{prefix}_abs": absolute,
        }
        if by_distance is not None and bins_out is not None:
            maps[f"{prefix}_by_distance"] = by_distance
            # one copy per row, so that rows of several backward passes stack like the other maps
            maps[f"{prefix}_distances"] = bins_out.labels.to(device).expand(batch, -1)
            if bins_out.edges is not None:
                maps[f"{prefix}_distance_edges"] = bins_out.edges.to(device).expand(batch, -1, -1)
            if bins_out.offsets is not None:
                maps[f"{prefix}_offsets"] = bins_out.offsets.to(device).expand(batch, -1, -1)
        return maps

    def describe(self) -> str:
        return f"{self.description}: per-layer bias leaves (`attr.position_by_layer`, `attr.position_by_distance`)"
