"""The conservation ledger: where the part of the explained logit that the maps do not hold is lost (or created).

:func:`conservation_ledger` runs :func:`hf_pelrp.attribute` once with a few read-only tensor hooks and splits the
conservation gap ``target_value - relevance.sum(-1)`` into stages along the residual stream (docs/method.md,
"The conservation ledger"): the head (final norm and output layer), each block's attention module, its MLP (a
child named ``mlp``, where the block has one) and the rest of the block (norms, residual additions, projections
outside those modules), and the embeddings. The entries sum to the gap exactly (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .adapters import adapter_for
from .engine import attribute
from .errors import AttributionInputError, AttributionStateError
from .result import Attribution

HEAD = "head"
EMBEDDINGS = "embeddings"


@dataclass
class ConservationLedger:
    """The conservation gap of one attribution, split by stage.

    Attributes
    ----------
    stages : tuple[str, ...]
        Stage names from input to output: ``"embeddings"``, then per block ``"layer {l} attention"``,
        ``"layer {l} mlp"`` (blocks with an ``mlp`` child) and ``"layer {l} rest"``, then ``"head"``.
    values : FloatTensor [B, S] (float64)
        Relevance each stage does not conserve: what reaches the stage from above minus what it passes down
        (and, for attention, minus what it gives to that layer's positional leaves). Positive: absorbed;
        negative: created. ``values.sum(-1)`` equals ``attribution.conservation_gap``.
    stream : FloatTensor [B, L + 1] (float64)
        Relevance on the residual stream at the input of each block and at the output of the last block.
    attribution : Attribution
        The attribution the ledger was measured on (``attribute(...)`` with the same arguments).
    """

    stages: tuple[str, ...]
    values: torch.Tensor
    stream: torch.Tensor
    attribution: Attribution

    @property
    def target_value(self) -> torch.Tensor:
        """The explained logit per row, [B]."""
        return self.attribution.target_value

    @property
    def gap(self) -> torch.Tensor:
        """``target_value - relevance.sum(-1)`` per row, [B]: what ``values`` splits."""
        return self.attribution.conservation_gap

    def by_kind(self) -> dict[str, torch.Tensor]:
        """The entries summed over layers by kind (``embeddings``, ``attention``, ``mlp``, ``rest``, ``head``),
        {kind: [B]}."""
        totals: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.stages):
            kind = name.rsplit(" ", 1)[-1]
            totals[kind] = totals.get(kind, 0) + self.values[:, i]
        return totals

    def to_markdown(self, row: int = 0, by_kind: bool = False) -> str:
        """A markdown table of one row: each stage's entry in logit units and as a share of the gap and of the
        explained logit, then the gap and the explained logit."""
        value = float(self.target_value[row])
        gap = float(self.gap[row])
        if by_kind:
            entries = [(k, float(v[row])) for k, v in self.by_kind().items()]
        else:
            entries = [
                (name, float(v)) for name, v in zip(self.stages, self.values[row].tolist(), strict=True)
            ]

        def share(x: float, of: float) -> str:
            # a gap at float rounding (a conservative configuration) has no meaningful shares
            return f"{100 * x / of:+.1f}%" if abs(of) > 1e-6 * max(1.0, abs(value)) else "n/a"

        lines = ["| stage | lost (logit units) | share of gap | share of logit |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {x:+.4f} | {share(x, gap)} | {share(x, value)} |" for name, x in entries]
        lines.append(f"| **total gap** | {gap:+.4f} | 100.0% | {share(gap, value)} |")
        lines.append(f"| explained logit | {value:+.4f} | | |")
        return "\n".join(lines)

    def layer_table(self, row: int = 0) -> str:
        """A markdown table of one row with a line per block: relevance on the stream at the block's input,
        what its attention, MLP and the rest lose, and the relevance its positional leaves take (rotary)."""
        layers = self.stream.shape[1] - 1
        index = {name: i for i, name in enumerate(self.stages)}
        by_layer = self.attribution.position_by_layer
        values = self.values[row].tolist()

        def cell(name: str) -> str:
            return f"{values[index[name]]:+.4f}" if name in index else "—"

        lines = [
            "| layer | R(stream in) | attention | mlp | rest | to positions |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for layer in range(layers):
            pos = "—" if by_layer is None else f"{float(by_layer[row, layer].sum()):+.4f}"
            lines.append(
                f"| {layer} | {float(self.stream[row, layer]):+.4f} | {cell(f'layer {layer} attention')} | "
                f"{cell(f'layer {layer} mlp')} | {cell(f'layer {layer} rest')} | {pos} |"
            )
        lines.append(f"| out | {float(self.stream[row, layers]):+.4f} | | | | |")
        return "\n".join(lines)

    def to_html(self, path: Any = None, **kwargs: Any) -> str:
        """The attribution's HTML report (:func:`hf_pelrp.viz.to_html`) with this ledger as a table per row."""
        from .viz.html import to_html

        return to_html(self.attribution, path=path, ledger=self, **kwargs)

    def __str__(self) -> str:
        return self.to_markdown()


def _hidden_tensors(args: tuple, kwargs: dict, width: int) -> list[tuple[str, int | str]]:
    """Where the hidden-state inputs of a call are: top-level floating tensors of width ``width`` that carry a
    gradient (positional tuples such as rotary ``position_embeddings`` are not top level)."""
    found: list[tuple[str, int | str]] = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.requires_grad and a.shape[-1] == width:
            found.append(("arg", i))
    for k, a in kwargs.items():
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.requires_grad and a.shape[-1] == width:
            found.append(("kwarg", k))
    return found


class _Recorder:
    """Read-only hooks: each watched tensor gets a copy in the graph whose gradient hook adds ``x * grad``
    (summed per row, float64) to ``self.relevance[key]``; values and the rules are untouched."""

    def __init__(self) -> None:
        self.relevance: dict[tuple[str, int], torch.Tensor] = {}
        self.width = 0
        self.handles: list[Any] = []

    def watch(self, key: tuple[str, int], x: torch.Tensor) -> torch.Tensor:
        x = x.clone()  # its own node: the hook sees the total gradient of this use only

        def on_grad(grad: torch.Tensor, x: torch.Tensor = x) -> None:
            r = (x.detach().double() * grad.double()).flatten(1).sum(1)
            self.relevance[key] = self.relevance.get(key, 0) + r

        x.register_hook(on_grad)
        return x

    def inputs_hook(self, key: tuple[str, int], block: bool = False):
        def hook(_module, args, kwargs):
            if block:
                first = args[0] if args else kwargs.get("hidden_states")
                if not isinstance(first, torch.Tensor):
                    raise AttributionStateError("a block's hidden states could not be found among its inputs")
                self.width = first.shape[-1]
            places = _hidden_tensors(args, kwargs, self.width)
            if block:
                places = places[:1]
            args, kwargs = list(args), dict(kwargs)
            for where, i in places:
                if where == "arg":
                    args[i] = self.watch(key, args[i])
                else:
                    kwargs[i] = self.watch(key, kwargs[i])
            return tuple(args), kwargs

        return hook

    def output_hook(self, key: tuple[str, int]):
        def hook(_module, _args, output):
            first = output[0] if isinstance(output, tuple) else output
            if not isinstance(first, torch.Tensor):
                raise AttributionStateError(
                    f"the output of {key} is not a tensor or a tuple starting with one"
                )
            watched = self.watch(key, first)
            return (watched, *output[1:]) if isinstance(output, tuple) else watched

        return hook

    def attach(
        self, module: torch.nn.Module, key_in: tuple[str, int], key_out: tuple[str, int] | None, block=False
    ):
        self.handles.append(
            module.register_forward_pre_hook(self.inputs_hook(key_in, block), with_kwargs=True)
        )
        if key_out is not None:
            self.handles.append(module.register_forward_hook(self.output_hook(key_out)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def conservation_ledger(
    model: torch.nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    target: int | str | torch.Tensor | None = None,
    mode: str | None = None,
    positional: bool | None = None,
    *,
    tokenizer: Any = None,
    config: Any = None,
    **inputs: Any,
) -> ConservationLedger:
    """Explain one logit per row (as :func:`hf_pelrp.attribute` does) and split its conservation gap by stage.

    With ``R(x) = sum(x * x.grad)`` the relevance of a tensor after the LRP backward pass (docs/method.md):

    - ``head = target_value - R(output of the last block)`` (final norm, output layer, pooler, classifier);
    - per block ``l`` with input ``h_l`` and output ``h_{l+1}`` (the next block's input):
      ``attention = R(attention output) - R(attention inputs) - position_l`` (``position_l``: the relevance of
      that layer's positional leaves, rotary cos / sin, which leaves the stream explained, not lost),
      ``mlp = R(mlp output) - R(mlp input)`` for a block with an ``mlp`` child, and
      ``rest = R(h_{l+1}) - R(h_l) - position_l - attention - mlp`` (norms, residual additions, anything
      outside those two modules; exactly 0 for the pre-norm residual of a model whose norms conserve);
    - ``embeddings = R(h_0) - (token + segment + positions outside the layers)`` (additive positions, the
      embedding norm and dropout).

    The entries telescope, so they sum to the gap exactly; what each one says is where the rules absorbed
    relevance. Arguments as :func:`hf_pelrp.attribute` (``config``: an :class:`hf_pelrp.LRPConfig` or preset; one explained logit per row: no continuations).
    Gradient checkpointing is off for the call (recomputed blocks would be measured twice).
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise AttributionInputError(
            "conservation_ledger follows one residual stream; encoder-decoder models have two. Explain them with "
            "hf_pelrp.attribute and read attr.conservation_gap."
        )
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    attentions = adapter.attention_modules(model)
    mlps = [getattr(b, "mlp", None) for b in blocks]
    mlps = [
        m if isinstance(m, torch.nn.Module) and not isinstance(m, torch.nn.ModuleList) else None for m in mlps
    ]
    recorder = _Recorder()
    try:
        for layer, (block, attn, mlp) in enumerate(zip(blocks, attentions, mlps, strict=True)):
            recorder.attach(block, ("stream", layer), None, block=True)
            recorder.attach(attn, ("attention in", layer), ("attention out", layer))
            if mlp is not None:
                recorder.attach(mlp, ("mlp in", layer), ("mlp out", layer))
        # the last block's output is watched by a hook registered when the forward starts, i.e. after the
        # rules' own hooks (a rule may replace the block's output, as the residual rule does): the watch sees
        # the output the head reads
        late: list[Any] = []

        def watch_last_output(_model, _args):
            if not late:
                late.append(blocks[-1].register_forward_hook(recorder.output_hook(("stream", len(blocks)))))
                recorder.handles.append(late[0])

        recorder.handles.append(model.register_forward_pre_hook(watch_last_output))
        attr = attribute(
            model,
            input_ids,
            attention_mask,
            target,
            mode,
            positional,
            tokenizer=tokenizer,
            config=config,
            gradient_checkpointing=False,
            **inputs,
        )
    finally:
        recorder.remove()
    rel = recorder.relevance
    n = len(blocks)
    rows = attr.target_value.shape[0]

    def get(kind: str, layer: int) -> torch.Tensor:
        r = rel.get((kind, layer))
        if r is None:  # a point the explained logit does not depend on (or a rule replaced the tensor)
            raise AttributionStateError(
                f"no relevance reached the {kind} of layer {layer} of {type(model).__name__}: the ledger cannot "
                "follow this model's residual stream"
            )
        return r.cpu()

    stream = torch.stack([get("stream", layer) for layer in range(n + 1)], dim=1)
    if attr.position_by_layer is not None:
        per_layer = attr.position_by_layer.double().sum(-1).cpu()  # [B, L]
    else:
        per_layer = torch.zeros(rows, n, dtype=torch.float64)
    explained = attr.relevance.double().sum(-1).cpu()
    names: list[str] = [EMBEDDINGS]
    columns: list[torch.Tensor] = [stream[:, 0] - (explained - per_layer.sum(1))]
    for layer in range(n):
        attention = get("attention out", layer) - get("attention in", layer) - per_layer[:, layer]
        whole = stream[:, layer + 1] - stream[:, layer] - per_layer[:, layer]
        names.append(f"layer {layer} attention")
        columns.append(attention)
        rest = whole - attention
        if mlps[layer] is not None:
            mlp = get("mlp out", layer) - get("mlp in", layer)
            names.append(f"layer {layer} mlp")
            columns.append(mlp)
            rest = rest - mlp
        names.append(f"layer {layer} rest")
        columns.append(rest)
    names.append(HEAD)
    columns.append(attr.target_value.double().cpu() - stream[:, n])
    return ConservationLedger(tuple(names), torch.stack(columns, dim=1), stream, attr)
