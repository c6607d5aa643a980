"""Explain a real model's next-token prediction in the terminal: ``python -m hf_pelrp.demo``.

SmolLM2-135M-Instruct (the pip-shipped GGUF weights, converted once into a local cache) predicts the next
token of a prompt ("The capital of France is" -> " Paris"); PE-LRP splits the explained logit into token and
position relevance per input token. A compact comparison with the other rule sets follows.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from .config import MODES, LRPConfig
from .engine import attribute
from .result import Attribution

DEFAULT_PROMPT = "The capital of France is"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the rule sets shown side by side: PE-LRP, the AttnLRP baseline without positions, CP-LRP with positions
COMPARED = (
    LRPConfig("attnlrp", positional=True),
    LRPConfig("attnlrp", positional=False),
    LRPConfig("cp", positional=True),
)


@dataclass
class Explanation:
    """One explained next-token prediction: the attribution and the strings needed to show it."""

    attribution: Attribution
    tokens: list[str]
    target_token: str

    @property
    def target_logit(self) -> float:
        return float(self.attribution.target_value[0])

    @property
    def conservation_gap(self) -> float:
        return float(self.attribution.conservation_gap[0])


def explain_next_token(model: torch.nn.Module, tokenizer, prompt: str, config: LRPConfig) -> Explanation:
    """Attribute the model's predicted next token after ``prompt`` under ``config``.

    Parameters
    ----------
    model, tokenizer
        A supported causal LM and its tokenizer.
    prompt
        The text whose continuation is explained (the arg-max next token is the target).
    config
        The rules (mode, positional).

    Returns
    -------
    Explanation
        The :class:`~hf_pelrp.result.Attribution` (batch of one) with the decoded input tokens and target.
    """
    if not prompt:
        raise ValueError("the prompt is empty: give some text whose next token is to be explained")
    encoded = tokenizer(prompt, return_tensors="pt")
    attribution = attribute(model, encoded["input_ids"], encoded["attention_mask"], config=config)
    ids = encoded["input_ids"][0].tolist()
    tokens = [tokenizer.decode([i]) for i in ids]
    return Explanation(attribution, tokens, tokenizer.decode([int(attribution.target[0])]))


def _coloured(value: float, scale: float) -> str:
    # red for evidence for the prediction, blue against it, as in LRP heatmaps; intensity by magnitude
    if scale == 0 or value == 0:
        return f"{value:+.4f}"
    strength = min(1.0, abs(value) / scale)
    style = "bold " if strength > 0.5 else ""
    style += "red" if value > 0 else "blue"
    return f"[{style}]{value:+.4f}[/]"


def relevance_table(explanation: Explanation) -> Table:
    """A rich table: one row per input token with token, position and total relevance."""
    attr = explanation.attribution
    token, position, total = attr.token[0].tolist(), attr.position[0].tolist(), attr.relevance[0].tolist()
    scale = max(abs(v) for v in token + position + total) or 1.0
    label = "PE-LRP" if attr.positional else "LRP"
    table = Table(title=f"{label} ({attr.mode}, positional={attr.positional}) for the next token")
    table.add_column("#", justify="right", style="dim")
    table.add_column("token")
    table.add_column("token rel.", justify="right")
    table.add_column("position rel.", justify="right")
    table.add_column("sum", justify="right")
    for i, text in enumerate(explanation.tokens):
        table.add_row(
            str(i),
            repr(text),
            _coloured(token[i], scale),
            _coloured(position[i], scale),
            _coloured(total[i], scale),
        )
    table.add_section()
    table.add_row("", "total", f"{sum(token):+.4f}", f"{sum(position):+.4f}", f"{sum(total):+.4f}")
    return table


def summary_line(explanation: Explanation) -> str:
    """One line: rules, token / position totals, conservation gap and the most relevant token."""
    attr = explanation.attribution
    relevance = attr.relevance[0]
    top = int(relevance.argmax())
    positions = "on " if attr.positional else "off"
    return (
        f"{attr.mode:>7} positions {positions}  tokens {float(attr.token.sum()):+8.4f}  "
        f"positions {float(attr.position.sum()):+8.4f}  gap {explanation.conservation_gap:+8.4f}  "
        f"top {explanation.tokens[top]!r}"
    )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hf_pelrp.demo",
        description="Explain SmolLM2-135M-Instruct's next-token prediction with PE-LRP.",
    )
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"text to continue (default: {DEFAULT_PROMPT!r})"
    )
    parser.add_argument("--mode", choices=MODES, default="attnlrp", help="LRP rule set (default: attnlrp)")
    parser.add_argument(
        "--no-positional", action="store_true", help="classic LRP: positions are constants, not leaves"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (default: float32)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit status."""
    args = _parse(argv)
    from .assets import load_smollm2

    console = Console()
    with console.status("loading SmolLM2-135M-Instruct (converting the GGUF file on first use)"):
        model, tokenizer = load_smollm2(dtype=DTYPES[args.dtype])
    config = LRPConfig(args.mode, positional=not args.no_positional)
    main_explanation = explain_next_token(model, tokenizer, args.prompt, config)

    console.print(f"Prompt: {args.prompt!r}   model: SmolLM2-135M-Instruct ({args.dtype})")
    console.print(relevance_table(main_explanation))
    attr = main_explanation.attribution
    console.print(
        f"Explained token: {main_explanation.target_token!r} (id {int(attr.target[0])}), "
        f"logit {main_explanation.target_logit:.4f}"
    )
    console.print(
        f"Relevance sum {float(attr.relevance.sum()):.4f}; conservation gap (logit - relevance sum) "
        f"{main_explanation.conservation_gap:+.4f}"
    )
    console.print("\nRule sets compared on the same prediction (gap = logit - relevance sum):")
    console.print(summary_line(main_explanation), markup=False, highlight=False)
    for other in COMPARED:
        if other != config:
            line = summary_line(explain_next_token(model, tokenizer, args.prompt, other))
            console.print(line, markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
