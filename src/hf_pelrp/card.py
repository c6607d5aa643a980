"""Model-card sections: whether hf_pelrp explains a model, with which rules, and how conservative it is.

:func:`attribution_section` inspects a model (adapter, head, positional encoding), runs one attribution on an
example and writes a Markdown section with the measured conservation gap; :func:`add_attribution_section`
puts that section into a ``huggingface_hub.ModelCard`` (or card text), replacing an earlier one, so that
running it again gives the same card.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .adapters import adapter_for
from .config import resolve_config
from .errors import AttributionInputError, UnsupportedModelError
from .heads import CAUSAL_LM, IMAGE_CLASSIFICATION, MASKED_LM, SEQ2SEQ_LM, head_kind

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

SECTION_BEGIN = "<!-- hf_pelrp:attribution:begin -->"
SECTION_END = "<!-- hf_pelrp:attribution:end -->"
DEFAULT_HEADING = "## Explaining predictions (hf_pelrp, PE-LRP)"
#: used when a tokenizer but no example is given
DEFAULT_TEXT = "The capital of France is"
_RANDOM_LENGTH = 8

_RULES = {
    "attnlrp": (
        "AttnLRP: epsilon rule on linear layers, identity rule on normalisations and element-wise activations, "
        "uniform rule on Q·Kᵀ, A·V and gated products, softmax rule on the attention"
    ),
    "cp": (
        "CP-LRP: attention probabilities (and MLP gates) are constants of the backward pass; epsilon and "
        "identity rules elsewhere"
    ),
}


def _code_span(text: str, limit: int = 200) -> str:
    """Inline Markdown code for arbitrary text (one line, a backtick fence longer than any run inside)."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    run, longest = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _default_inputs(model: torch.nn.Module, kind: str, seed: int) -> tuple[dict[str, Any], str]:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if kind == IMAGE_CLASSIFICATION:
        # CLIP / SigLIP classifiers keep their vision tower's settings in config.vision_config
        vision = getattr(config, "vision_config", None) or config
        size = vision.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (1, vision.num_channels, height, width)
        pixels = torch.randn(shape, generator=generator).to(device)
        return {"pixel_values": pixels}, f"a random image {list(shape[1:])} (standard normal, seed {seed})"
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise AttributionInputError(
            f"{type(model).__name__} has no vocab_size in its config: pass example= (model inputs) explicitly"
        )
    # skip the lowest ids, where special tokens (pad, bos, eos, unk) usually sit
    low = min(4, vocab - 1)
    ids = torch.randint(low, vocab, (1, _RANDOM_LENGTH), generator=generator).to(device)
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == MASKED_LM:
        inputs["position"] = _RANDOM_LENGTH // 2
    return inputs, f"{_RANDOM_LENGTH} random token ids (seed {seed}): {ids[0].tolist()}"


def _example_inputs(
    model: torch.nn.Module, kind: str, example: Any, tokenizer: Any, seed: int
) -> tuple[dict[str, Any], str]:
    """Model inputs for the measurement and a one-line Markdown description of them."""
    if example is None and tokenizer is not None and kind != IMAGE_CLASSIFICATION:
        example = DEFAULT_TEXT
    if example is None:
        return _default_inputs(model, kind, seed)
    device = next(model.parameters()).device
    if isinstance(example, str):
        if tokenizer is None:
            raise AttributionInputError("a text example needs tokenizer= to turn it into token ids")
        encoded = tokenizer(example, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in encoded.items() if isinstance(v, torch.Tensor)}
        if kind == MASKED_LM:
            mask_id = tokenizer.mask_token_id
            hits = (
                (inputs["input_ids"][0] == mask_id).nonzero().flatten().tolist()
                if mask_id is not None
                else []
            )
            if not hits:
                raise AttributionInputError(
                    f"a masked-LM example must contain the mask token {tokenizer.mask_token!r}, e.g. "
                    f"'Paris is the {tokenizer.mask_token} of France.'"
                )
            inputs.update(position=hits[0], mask_token_id=mask_id)
        return inputs, f"the text {_code_span(example)}"
    if isinstance(example, Mapping):
        return dict(example), "the given inputs (" + ", ".join(f"`{k}`" for k in example) + ")"
    if isinstance(example, torch.Tensor):
        if example.is_floating_point():
            pixels = example if example.dim() == 4 else example.unsqueeze(0)
            return {"pixel_values": pixels.to(device)}, f"the given image {list(pixels.shape[1:])}"
        ids = example if example.dim() == 2 else example.unsqueeze(0)
        return {"input_ids": ids.to(device)}, f"the given token ids {ids[0].tolist()[:32]}"
    raise AttributionInputError(
        "example must be None, a string (with tokenizer=), a dict of model inputs or a tensor of token ids / "
        f"pixel values, got {type(example).__name__}"
    )


def _unsupported(model: torch.nn.Module, heading: str, reason: str) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None) or "unknown"
    lines = [
        SECTION_BEGIN,
        heading,
        "",
        "| | |",
        "|---|---|",
        "| Supported by hf_pelrp | **no** |",
        f"| Model type | `{model_type}` ({type(model).__name__}) |",
        "",
        f"Reason: {reason}",
        SECTION_END,
    ]
    return "\n".join(lines)


def attribution_section(
    model: torch.nn.Module,
    mode: str = "attnlrp",
    example: Any = None,
    *,
    positional: bool = True,
    tokenizer: Any = None,
    target: int | None = None,
    heading: str = DEFAULT_HEADING,
    seed: int = 0,
) -> str:
    """A Markdown model-card section on explaining ``model`` with hf_pelrp, with a measured conservation gap.

    Parameters
    ----------
    model
        A transformers model. Unsupported models get a section that says so and why (nothing is run).
    mode
        The rules: ``"attnlrp"``, ``"cp"`` or a preset name.
    example
        What to measure on: a string (needs ``tokenizer``), a dict of model inputs (may include ``position``
        / ``mask_token_id`` for masked LMs), a tensor of token ids or pixel values, or ``None``: the text
        ``"The capital of France is"`` when a tokenizer is given, else 8 random token ids or a random image
        (fixed ``seed``).
    positional
        Positions as leaves (PE-LRP, default) or the classic baseline.
    tokenizer
        Turns a text example into ids (and finds the ``[MASK]`` of masked LMs).
    target
        The class / token id to explain (default: the predicted one).
    heading
        The Markdown heading of the section.

    Returns
    -------
    str
        The section, wrapped in ``<!-- hf_pelrp:attribution:begin/end -->`` markers (so it can be replaced).

    Raises
    ------
    AttributionInputError
        The example cannot be turned into inputs.
    hf_pelrp.errors.HfPelrpError
        A supported model fails on the example (the error is not hidden in the card).
    """
    from .engine import attribute
    from .version import package_version

    config = resolve_config(None, mode, positional)
    try:
        adapter = adapter_for(model)
        kind = head_kind(model)
        adapter.check_model(model)
    except (UnsupportedModelError, AttributionInputError) as err:
        return _unsupported(model, heading, str(err))
    inputs, described = _example_inputs(model, kind, example, tokenizer, seed)
    attr = attribute(model, **inputs, target=target, config=config)
    value = float(attr.target_value[0])
    gap = float(attr.conservation_gap[0])
    relative = f"{abs(gap) / abs(value):.2%} of the logit" if value != 0 else "the logit is 0"
    sums = [f"token {float(attr.token[0].sum()):.4g}", f"position {float(attr.position[0].sum()):.4g}"]
    if attr.segment is not None:
        sums.append(f"segment {float(attr.segment[0].sum()):.4g}")
    if "target_token" in attr.extras:  # encoder-decoder: the target prefix (decoder input) has its own maps
        sums.append(f"target-prefix token {float(attr.target_token[0].sum()):.4g}")
        sums.append(f"target-prefix position {float(attr.target_position[0].sum()):.4g}")
    target_id = int(attr.target[0])
    target_label = None
    if kind in (CAUSAL_LM, MASKED_LM, SEQ2SEQ_LM):  # vocabulary ids: a label only with a tokenizer
        if tokenizer is not None:
            from .tokens import display_token

            target_label = repr(
                display_token(tokenizer, target_id)
            )  # quoted: a token's leading space matters
    elif getattr(model.config, "id2label", None):
        target_label = model.config.id2label.get(target_id)
    target_text = f"{target_id}" + (f" ({_code_span(str(target_label))})" if target_label else "")
    rules = _RULES[config.mode]
    gammas = [
        f"{name} = {getattr(config, name)}"
        for name in ("gamma_linear", "gamma_conv")
        if getattr(config, name, None) is not None
    ]
    if gammas:
        rules += "; generalised Gamma rule: " + ", ".join(gammas)
    kind_text = adapter.positions.describe()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    lines = [
        SECTION_BEGIN,
        heading,
        "",
        "This model can be explained with positional-encoding-aware Layer-wise Relevance Propagation "
        "([hf_pelrp](https://arxiv.org/abs/2506.02138)): one forward and one backward pass give the relevance of "
        "every input token and of every position.",
        "",
        "| | |",
        "|---|---|",
        "| Supported by hf_pelrp | **yes** |",
        f"| Model type | `{model.config.model_type}` ({type(model).__name__}, head: {kind.replace('_', ' ')}) |",
        f"| Positional encoding | {kind_text} |",
        f"| Rule preset | `{mode}`: {rules} |",
        f"| Positions as leaves | {'yes (PE-LRP)' if config.positional else 'no (classic baseline)'} |",
        f"| Measured on | {described}, {dtype} |",
        f"| Explained target | {target_text}, logit {value:.4g} |",
        f"| Relevance sums | {', '.join(sums)} |",
        f"| Conservation gap | {gap:.4g} ({relative}) |",
        "",
        "The conservation gap is `logit - sum(relevance)`: the share the rules absorb (biases, the softmax rule "
        "of AttnLRP). It is measured, not assumed.",
        "",
        "```python",
        "import hf_pelrp",
        f'attr = hf_pelrp.attribute(model, **inputs, config="{mode}")  # inputs: the tokenizer / processor output',
        'attr.show()  # or attr.to_html(path="report.html")',
        "```",
        "",
        f"<sub>Generated by hf_pelrp {package_version()}.</sub>",
        SECTION_END,
    ]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """``text`` with its hf_pelrp section replaced by ``section`` (appended if there is none).

    Raises
    ------
    ValueError
        ``text`` has a begin marker without an end marker (a damaged section that cannot be replaced safely).
    """
    if not (section.startswith(SECTION_BEGIN) and section.rstrip().endswith(SECTION_END)):
        raise ValueError("section must be wrapped in the hf_pelrp markers (use attribution_section())")
    begin = text.find(SECTION_BEGIN)
    if begin == -1:
        return text.rstrip() + ("\n\n" if text.strip() else "") + section.rstrip() + "\n"
    end = text.find(SECTION_END, begin)
    if end == -1:
        raise ValueError(
            f"the card has {SECTION_BEGIN!r} but no {SECTION_END!r}: repair or remove the old section first"
        )
    return text[:begin] + section.rstrip() + text[end + len(SECTION_END) :]


def add_attribution_section(
    card: ModelCard | str, model: torch.nn.Module | None = None, *, section: str | None = None, **kwargs: Any
) -> ModelCard | str:
    """Put the hf_pelrp section into a model card, replacing an earlier one (idempotent).

    Parameters
    ----------
    card
        A ``huggingface_hub.ModelCard`` (changed in place and returned) or the text of a card (a new string
        is returned).
    model
        The model to describe (with ``**kwargs`` for :func:`attribution_section`), unless ``section`` is given.
    section
        A section made earlier by :func:`attribution_section`.
    """
    if section is None:
        if model is None:
            raise AttributionInputError(
                "add_attribution_section needs model= (to measure) or section= (made earlier)"
            )
        section = attribution_section(model, **kwargs)
    if isinstance(card, str):
        return replace_section(card, section)
    card.text = replace_section(card.text, section)
    return card
