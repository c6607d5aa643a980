"""Train a small BLOOM (ALiBi positions) language model on the movie-review sentences and plot its recency
profile: how much of each next-token prediction the model takes from the ALiBi bias at each distance.

No BLOOM weights exist offline, so the model is trained here from scratch (GPT-2 tokenizer restricted to the
token ids the sentences use, 2 layers, a few minutes on 2 CPU cores with a fixed seed). Then, for 300 test sentences, PE-LRP (AttnLRP) explains the
predicted next token at every position of a 12-token prefix and sums ``position_by_distance`` (relevance of the
bias per signed distance ``j - i``, summed over heads, queries and layers) over the sentences.

Writes the checkpoint and ``metrics.json`` to ``.cache/models/bloom-alibi-lm``, the profile to
``docs/alibi_recency.json`` and the plot to ``docs/alibi_recency.png``.

Usage: ``nice -n 15 python scripts/train_alibi.py [--epochs 3] [--seed 0]`` (about 7 minutes of CPU)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import BloomConfig, BloomForCausalLM, GPT2TokenizerFast

import hf_pelrp
from hf_pelrp.assets import gpt2_tokenizer_files
from hf_pelrp.evaluation import training
from hf_pelrp.evaluation.data import sentiment_splits

ROOT = Path(__file__).resolve().parents[1]


class CompactVocabulary:
    """The GPT-2 tokenizer restricted to the ids a corpus uses (a vocabulary of ~15k instead of 50,257 makes the
    output layer, the cost of training on CPU, a few times cheaper). Id 0 is padding."""

    def __init__(self, tokenizer, texts):
        self.tokenizer = tokenizer
        used = sorted({i for text in texts for i in tokenizer(text)["input_ids"]})
        self.to_gpt2 = [tokenizer.eos_token_id, *used]
        self.from_gpt2 = {g: c for c, g in enumerate(self.to_gpt2)}

    def __len__(self) -> int:
        return len(self.to_gpt2)

    def encode(self, text: str) -> list[int]:
        return [self.from_gpt2.get(i, 0) for i in self.tokenizer(text)["input_ids"]]


def lm_batches(vocab, texts, max_length):
    rows = [vocab.encode(t)[:max_length] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def train(args, tokenizer, texts, gen) -> tuple[BloomForCausalLM, list[float]]:
    config = BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        n_layer=args.layers,
        n_head=4,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        hidden_dropout=0.1,
        attention_dropout=0.1,
    )
    model = BloomForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    steps = math.ceil(len(texts) / args.batch_size) * math.ceil(args.epochs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    losses = []
    model.train()
    step = 0
    for _epoch in range(math.ceil(args.epochs)):
        order = torch.randperm(len(texts), generator=gen).tolist()
        for start in range(0, len(order), args.batch_size):
            batch = [texts[i] for i in order[start : start + args.batch_size]]
            ids, mask = lm_batches(tokenizer, batch, args.max_length)
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 50 == 0:
                print(f"step {step}/{steps} loss {sum(losses[-50:]) / 50:.3f}", flush=True)
    return model.eval(), losses


@torch.no_grad()
def perplexity(model, tokenizer, texts, max_length) -> float:
    total, count = 0.0, 0
    for start in range(0, len(texts), 64):
        ids, mask = lm_batches(tokenizer, texts[start : start + 64], max_length)
        labels = ids.masked_fill(mask == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
        count += n
    return math.exp(total / count)


def main() -> None:
    out = ROOT / ".cache" / "models" / "bloom-alibi-lm"
    p = training.training_parser(__doc__, out, epochs=3.0, batch_size=32, lr=3e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--prefix", type=int, default=12)
    p.add_argument("--explain", type=int, default=300)
    p.add_argument(
        "--train-size", type=int, default=None, help="use the first N training sentences (smoke runs)"
    )
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = p.parse_args()

    gen = training.set_determinism(args.seed, args.threads)
    splits = sentiment_splits()
    files = gpt2_tokenizer_files()
    tokenizer = GPT2TokenizerFast(str(files.vocab), str(files.merges))
    train_texts = [s.text for s in splits["train"]][: args.train_size]
    test_texts = [s.text for s in splits["test"]]
    tokenizer = CompactVocabulary(tokenizer, train_texts + test_texts)
    with training.Timer() as t:
        model, losses = train(args, tokenizer, train_texts, gen)
    ppl = perplexity(model, tokenizer, test_texts, args.max_length)
    print(f"test perplexity {ppl:.1f} after {t.seconds:.0f} s")
    model.save_pretrained(args.out)
    (args.out / "vocabulary.json").write_text(json.dumps({"gpt2_ids": tokenizer.to_gpt2}))
    training.save_metrics(
        args.out,
        {
            "model": "bloom (ALiBi) causal LM",
            "test_perplexity": ppl,
            "train_size": len(train_texts),
            "epochs": args.epochs,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "seed": args.seed,
            "train_seconds": round(t.seconds, 1),
        },
    )
    write_profile(model, tokenizer, test_texts, args)


def write_profile(model, tokenizer, texts, args) -> None:
    """Explain the next token after a ``prefix``-token window of ``explain`` test sentences (AttnLRP, PE-LRP)."""
    prefix = args.prefix
    windows = []
    for text in texts:
        ids = tokenizer.encode(text)
        if len(ids) > prefix:
            windows.append(ids[: prefix + 1])
        if len(windows) == args.explain:
            break
    ids = torch.tensor(windows)
    by_distance = torch.zeros(2 * prefix - 1, dtype=torch.float64)
    by_key = torch.zeros(model.config.n_layer, prefix, dtype=torch.float64)
    token_abs = position_abs = 0.0
    for start in range(0, len(windows), 50):
        chunk = ids[start : start + 50]
        attr = hf_pelrp.attribute(model, chunk[:, :prefix], target=chunk[:, prefix])
        by_distance += attr.position_by_distance.sum(0).double()
        by_key += attr.position_by_layer.sum(0).double()
        token_abs += float(attr.token.abs().sum())
        position_abs += float(attr.position.abs().sum())
    profile = {
        "model": "bloom (ALiBi), 2 layers, trained here on movie-review sentences (scripts/train_alibi.py)",
        "sentences": len(windows),
        "prefix": prefix,
        "distances": list(range(-(prefix - 1), prefix)),
        "position_by_distance": (by_distance / len(windows)).tolist(),
        "position_by_layer_per_key": (by_key / len(windows)).tolist(),
        "position_share_of_abs_relevance": position_abs / (position_abs + token_abs),
    }
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "alibi_recency.json").write_text(json.dumps(profile, indent=1))
    plot(profile, args.docs / "alibi_recency.png")


def plot(profile: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = profile["prefix"]
    distances = torch.tensor(profile["distances"])
    keep = distances <= 0
    back = (-distances[keep]).tolist()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 3.6), dpi=120)
    left.bar(back, torch.tensor(profile["position_by_distance"])[keep].tolist(), color="tab:blue")
    left.axhline(0, color="grey", lw=0.5)
    left.set_xlabel("distance back, i - j (tokens)")
    left.set_ylabel("bias relevance (logit units)")
    left.set_title("position_by_distance: all queries, heads, layers", fontsize=9)
    for layer, row in enumerate(profile["position_by_layer_per_key"]):
        offset = list(range(prefix - 1, -1, -1))  # key j at prefix - 1 - j tokens before the explained token
        right.plot(offset, row, marker="o", ms=3, label=f"layer {layer}")
    right.axhline(0, color="grey", lw=0.5)
    right.set_xlabel("key position, tokens before the explained one")
    right.set_title("position_by_layer (per key)", fontsize=9)
    right.legend(fontsize=8)
    fig.suptitle(
        f"ALiBi recency profile of a 2-layer BLOOM trained on movie-review sentences (AttnLRP; mean over "
        f"{profile['sentences']} next-token predictions)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
