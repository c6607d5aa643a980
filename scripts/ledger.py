"""Measure the conservation ledger (hf_pelrp.conservation_ledger) on the offline real-weight models.

Usage: ``python scripts/ledger.py [--model smollm2|minilm|all] [--modes attnlrp cp] [--no-positional]
[--softmax gxi|identity|split] [--softmax-eps E] [--residual-gamma G]`` (the last three: the remedies of
docs/method.md, "The softmax rule and the conservation gap"; scripts/remedies.py measures them over many inputs).
Prints, per model and mode, the ledger by kind (summed over layers), then the per-layer table; the tables of
docs/results.md ("Where the unexplained logit goes") are this output. SmolLM2-135M-Instruct explains " Paris"
after "The capital of France is"; all-MiniLM-L6-v2 gets a classification head with seed 0 (as tests/test_minilm.py)
and explains its arg-max class on the first sentence pair of that test.
"""

from __future__ import annotations

import argparse

import torch

import hf_pelrp
from hf_pelrp import assets
from hf_pelrp.rules import SOFTMAX_RULES

PROMPT, TARGET = "The capital of France is", " Paris"
PAIR = ("The movie was surprisingly good.", "I liked it a lot.")


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = tokenizer(PROMPT, return_tensors="pt")
    return model, tokenizer, dict(encoded), TARGET


def minilm():
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = assets.minilm_dir()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = tokenizer(*PAIR, return_tensors="pt")
    return model, tokenizer, dict(encoded), None


MODELS = {"smollm2": smollm2, "minilm": minilm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--modes", nargs="+", default=["attnlrp", "cp"])
    parser.add_argument(
        "--no-positional", action="store_true", help="the classic baseline (positional=False)"
    )
    parser.add_argument("--softmax", choices=SOFTMAX_RULES, default="gxi", help="the softmax rule (attnlrp)")
    parser.add_argument("--softmax-eps", type=float, default=0.0)
    parser.add_argument("--residual-gamma", type=float, default=None, help="ResLRP's residual rule")
    args = parser.parse_args()
    for name in MODELS if args.model == "all" else [args.model]:
        model, tokenizer, inputs, target = MODELS[name]()
        for mode in args.modes:
            config = hf_pelrp.LRPConfig(
                mode=mode,
                positional=not args.no_positional,
                softmax=args.softmax if mode == "attnlrp" else "gxi",
                softmax_eps=args.softmax_eps,
                residual_gamma=args.residual_gamma,
            )
            try:
                ledger = hf_pelrp.conservation_ledger(
                    model, target=target, config=config, tokenizer=tokenizer, **inputs
                )
            except (
                hf_pelrp.UnsupportedModelError
            ) as error:  # e.g. the residual rule on BERT's post-norm blocks
                print(f"\n### {name}, mode={mode}: not measured ({error})")
                continue
            attr = ledger.attribution
            label = attr.labels.get(int(attr.target[0]), str(int(attr.target[0]))) if attr.labels else ""
            print(f"\n### {name}, {config}, target {label!r}\n")
            print(
                f"explained logit {float(attr.target_value[0]):.4f}, relevance sum "
                f"{float(attr.relevance.sum()):.4f}, gap {float(attr.conservation_gap[0]):.4f}, "
                f"entries sum {float(ledger.values.sum()):.4f}\n"
            )
            print(ledger.to_markdown(by_kind=True))
            print()
            print(ledger.layer_table())


if __name__ == "__main__":
    main()
