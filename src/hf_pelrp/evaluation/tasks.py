"""Evaluation tasks: a model and the samples it explains, built from one entry of a YAML configuration.

A task entry has a ``model`` section (``tiny`` random model, a ``checkpoint`` folder, or ``smollm2``) and a
``data`` section (random tokens / images for smoke runs, the movie-review sentences, Fashion-MNIST).
Builders are registered by name, like the methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import data as datasets
from .samples import Sample

TEXT = "text"
VISION = "vision"


@dataclass
class Task:
    """A loaded task: the model (eval mode), its samples and how to perturb them."""

    name: str
    kind: str
    model: torch.nn.Module
    samples: list[Sample]
    replacement_id: int | None = None
    image_replacement: str = "zero"
    info: dict[str, Any] = field(default_factory=dict)
    paper_replacement_id: int | None = None

    def to(self, device: str | torch.device) -> Task:
        """Move the model and the samples' model inputs to ``device`` (in place; returns the task). The
        samples' ``allowed`` units and object masks stay on the CPU, where relevance is ranked and scored."""
        self.model.to(device)
        for sample in self.samples:
            sample.inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in sample.inputs.items()}
        return self


_MODELS: dict[str, Callable[..., tuple[torch.nn.Module, Any]]] = {}
_DATA: dict[str, Callable[..., list[Sample]]] = {}


def model_builder(name: str):
    def deco(fn):
        _MODELS[name] = fn
        return fn

    return deco


def data_builder(name: str):
    def deco(fn):
        _DATA[name] = fn
        return fn

    return deco


def _resolve(root: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


# -------------------------------------------------------------------------------------------------- models
#: per family: its head classes by head kind, and what the evaluation changes in check_adapter's tiny instance of
#: the family (the one source of tiny configurations, ``Adapter.tiny``): DistilBERT with fixed sinusoidal
#: positions, a one-channel ViT (the smoke images)
_TINY_FAMILIES: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "llama": (
        {"causal_lm": "LlamaForCausalLM", "sequence_classification": "LlamaForSequenceClassification"},
        {},
    ),
    "gpt2": (
        {"causal_lm": "GPT2LMHeadModel", "sequence_classification": "GPT2ForSequenceClassification"},
        {},
    ),
    "bert": ({"sequence_classification": "BertForSequenceClassification"}, {}),
    "distilbert": (
        {"sequence_classification": "DistilBertForSequenceClassification"},
        {"sinusoidal_pos_embds": True},
    ),
    "vit": ({"image_classification": "ViTForImageClassification"}, {"num_channels": 1}),
}


def tiny_model(
    family: str, head: str, seed: int = 0, num_labels: int = 2, **overrides: Any
) -> torch.nn.Module:
    """A tiny randomly initialised model of ``family`` (llama, gpt2, bert, distilbert with sinusoidal positions,
    vit) with a ``head``, for smoke runs: check_adapter's tiny configuration of the family
    (:func:`hf_pelrp.check.tiny_config`) with the changes of :data:`_TINY_FAMILIES`, ``num_labels`` and
    ``overrides``."""
    import transformers as tf

    from ..check import tiny_config

    if family not in _TINY_FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(_TINY_FAMILIES)}")
    heads, changes = _TINY_FAMILIES[family]
    if head not in heads:
        raise ValueError(f"tiny {family} models have heads {sorted(heads)}, not {head!r}")
    config = tiny_config(family, **{**changes, "num_labels": num_labels, **overrides})
    # seeded without touching the caller's random state (the suite does nothing global)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(tf, heads[head])(config)
        with torch.no_grad():
            # random-init norms are all-ones; perturb them so the norm rules matter
            for name, p in model.named_parameters():
                if "norm" in name.lower() and name.endswith("weight"):
                    p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@model_builder("tiny")
def _tiny(spec: dict, root: Path, seed: int):
    return tiny_model(
        spec["family"], spec["head"], seed=spec.get("seed", seed), num_labels=spec.get("num_labels", 2)
    ), None


@model_builder("checkpoint")
def _checkpoint(spec: dict, root: Path, seed: int):
    import transformers as tf

    path = _resolve(root, spec["path"])
    if not (path / "config.json").exists():
        script = spec.get("train_script", "the task's training script (scripts/train_*.py)")
        raise FileNotFoundError(f"no trained checkpoint at {path}: run {script} first")
    head = spec["head"]
    classes = {
        "sequence_classification": tf.AutoModelForSequenceClassification,
        "image_classification": tf.AutoModelForImageClassification,
        "causal_lm": tf.AutoModelForCausalLM,
    }
    model = classes[head].from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model, tokenizer


@model_builder("smollm2")
def _smollm2(spec: dict, root: Path, seed: int):
    from ..assets import load_smollm2

    model, tokenizer = load_smollm2()
    return model.float().eval(), tokenizer


# ---------------------------------------------------------------------------------------------------- data
def _readout(model: torch.nn.Module, length: int) -> int:
    """The row the classification head reads: CLS (0) for encoders, the last token for decoders."""
    return 0 if model.config.model_type in ("bert", "roberta", "distilbert", "vit", "deit") else length - 1


@data_builder("random_tokens")
def _random_tokens(spec: dict, model, tokenizer, seed: int, causal: bool) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    out = []
    for i in range(spec["num_samples"]):
        length = int(spec.get("length", 12))
        ids = torch.randint(2, vocab, (1, length), generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        out.append(
            Sample(
                i,
                inputs,
                torch.ones(length, dtype=torch.bool),
                position=length - 1 if causal else None,
                readout=length - 1 if causal else _readout(model, length),
            )
        )
    return out


@data_builder("random_images")
def _random_images(spec: dict, model, tokenizer, seed: int, causal: bool) -> list[Sample]:
    """Black images with one bright random rectangle: the rectangle is the object mask."""
    gen = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    patch = model.config.patch_size
    out = []
    for i in range(spec["num_samples"]):
        h0, w0 = torch.randint(0, size // 2, (2,), generator=gen).tolist()
        h1, w1 = h0 + size // 3, w0 + size // 3
        img = torch.zeros(1, model.config.num_channels, size, size)
        img[..., h0:h1, w0:w1] = 0.2 + 0.8 * torch.rand(
            1, model.config.num_channels, h1 - h0, w1 - w0, generator=gen
        )
        label = int(torch.randint(0, model.config.num_labels, (1,), generator=gen))
        n = (size // patch) ** 2
        out.append(
            Sample(
                i,
                {"pixel_values": img},
                torch.ones(n, dtype=torch.bool),
                label=label,
                mask=img[0].amax(0) > 0,
            )
        )
    return out


def _text_sample(i: int, tokenizer, text: str, max_length: int, model, causal: bool, label=None) -> Sample:
    enc = tokenizer(
        text, truncation=True, max_length=max_length, return_special_tokens_mask=True, return_tensors="pt"
    )
    ids = enc["input_ids"]
    special = enc["special_tokens_mask"][0].bool()
    length = ids.shape[-1]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return Sample(
        i,
        inputs,
        ~special,
        position=length - 1 if causal else None,
        readout=_readout(model, length) if not causal else length - 1,
        label=label,
        text=text,
    )


@data_builder("sentiment_test")
def _sentiment_test(spec: dict, model, tokenizer, seed: int, causal: bool) -> list[Sample]:
    """Held-out movie-review sentences (the test split of :func:`data.sentiment_splits`)."""
    test = datasets.sentiment_splits(seed=spec.get("split_seed", 0))["test"][: spec["num_samples"]]
    max_length = int(spec.get("max_length", 64))
    return [
        _text_sample(i, tokenizer, s.text, max_length, model, causal, s.label) for i, s in enumerate(test)
    ]


@data_builder("review_windows")
def _review_windows(spec: dict, model, tokenizer, seed: int, causal: bool) -> list[Sample]:
    """Windows of real text for next-token prediction: the first ``window`` tokens of held-out sentences that
    are longer than the window (so the next token is a real continuation)."""
    window = int(spec.get("window", 16))
    out = []
    for s in datasets.sentiment_splits(min_abs_score=0.0, seed=spec.get("split_seed", 0))["test"]:
        ids = tokenizer(s.text, add_special_tokens=False)["input_ids"]
        if len(ids) <= window:
            continue
        ids_t = torch.tensor([ids[:window]])
        inputs = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}
        out.append(
            Sample(
                len(out),
                inputs,
                torch.ones(window, dtype=torch.bool),
                position=window - 1,
                readout=window - 1,
                text=tokenizer.decode(ids[:window]),
            )
        )
        if len(out) == spec["num_samples"]:
            break
    return out


@data_builder("positional_task")
def _positional_task(spec: dict, model, tokenizer, seed: int, causal: bool) -> list[Sample]:
    """Held-out sequences of a task with known positional ground truth (:mod:`.ground_truth`); the allowed units
    are the content slots (not CLS / END)."""
    from .ground_truth import PositionalTask

    task = PositionalTask(**spec.get("task", {}))
    ids, labels, truth = task.generate(spec["num_samples"], seed=int(spec.get("test_seed", 1_000_001)))
    length = ids.shape[1]
    allowed = torch.zeros(length, dtype=torch.bool)
    allowed[1:-1] = True
    return [
        Sample(
            i,
            {"input_ids": ids[i : i + 1], "attention_mask": torch.ones_like(ids[i : i + 1])},
            allowed.clone(),
            readout=_readout(model, length),
            label=int(labels[i]),
            ground_truth=list(truth[i]),
        )
        for i in range(len(labels))
    ]


@data_builder("fashion_mnist_test")
def _fashion_mnist_test(spec: dict, model, tokenizer, seed: int, causal: bool) -> list[Sample]:
    """The first ``num_samples`` Fashion-MNIST test images; the object mask is ``pixel > 0``."""
    images, labels = datasets.fashion_mnist("test")
    n_patches = (model.config.image_size // model.config.patch_size) ** 2
    out = []
    for i in range(spec["num_samples"]):
        x = datasets.image_tensor(images[i : i + 1])
        out.append(
            Sample(
                i,
                {"pixel_values": x},
                torch.ones(n_patches, dtype=torch.bool),
                label=int(labels[i]),
                mask=images[i] > 0,
            )
        )
    return out


@data_builder("fashion_mnist_canvas")
def _fashion_mnist_canvas(spec: dict, model, tokenizer, seed: int, causal: bool) -> list[Sample]:
    """``num_samples`` Fashion-MNIST test garments from index ``start`` (default 0) placed on a canvas
    (:mod:`.canvas`: ``canvas``, ``background`` ``"black"`` / ``"noise"``, ``noise``, ``layout_seed``); the mask
    is the placed garment; sample ids are the test-set indices."""
    from .canvas import CanvasLayout, place_on_canvas

    layout = CanvasLayout(
        canvas=int(spec.get("canvas", 56)),
        background=spec.get("background", "black"),
        noise=float(spec.get("noise", 0.3)),
        seed=int(spec.get("layout_seed", 0)),
    )
    size = model.config.image_size
    if size != layout.canvas:
        raise ValueError(
            f"the model takes {size}x{size} images but the canvas is {layout.canvas}: set canvas: {size}"
        )
    images, labels = datasets.fashion_mnist("test")
    start, n = int(spec.get("start", 0)), int(spec["num_samples"])
    pixels, masks, _ = place_on_canvas(images, range(start, start + n), layout)
    n_patches = (size // model.config.patch_size) ** 2
    return [
        Sample(
            start + i,
            {"pixel_values": pixels[i : i + 1]},
            torch.ones(n_patches, dtype=torch.bool),
            label=int(labels[start + i]),
            mask=masks[i],
        )
        for i in range(n)
    ]


# ------------------------------------------------------------------------------------------------ building
def resolve_replacement(name: str | int, tokenizer, neutral: str | None = None) -> int:
    """The token id that replaces removed tokens: ``unk``, ``pad``, ``mask``, ``neutral`` (the single token of
    the ``neutral_token`` string) or an explicit id."""
    if isinstance(name, int):
        return name
    if tokenizer is None:
        raise ValueError(
            f"replacement {name!r} needs a tokenizer; give an explicit token id for tokenizer-less models"
        )
    if name == "neutral":
        if not neutral:
            raise ValueError(
                "replacement 'neutral' needs `neutral_token` (e.g. ' the') in the task configuration"
            )
        ids = tokenizer(neutral, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"neutral_token {neutral!r} is {len(ids)} tokens; choose a string that is one token"
            )
        return ids[0]
    attr = {"unk": "unk_token_id", "pad": "pad_token_id", "mask": "mask_token_id"}.get(name)
    if attr is None:
        raise ValueError(f"unknown replacement {name!r}; choose unk, pad, mask, neutral or a token id")
    token_id = getattr(tokenizer, attr, None)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {name} token; choose another replacement")
    return int(token_id)


def build_task(spec: dict, root: Path, seed: int = 0) -> Task:
    """Load the model and samples of one task entry of a configuration."""
    for key in ("name", "model", "data"):
        if key not in spec:
            raise ValueError(f"task entry {spec.get('name', spec)!r} lacks the `{key}` section")
    model_spec, data_spec = spec["model"], spec["data"]
    if model_spec.get("kind") not in _MODELS:
        raise ValueError(f"task {spec['name']}: model kind must be one of {sorted(_MODELS)}")
    if data_spec.get("kind") not in _DATA:
        raise ValueError(f"task {spec['name']}: data kind must be one of {sorted(_DATA)}")
    model, tokenizer = _MODELS[model_spec["kind"]](model_spec, root, seed)
    causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    samples = _DATA[data_spec["kind"]](data_spec, model, tokenizer, seed, causal)
    kind = VISION if samples and "pixel_values" in samples[0].inputs else TEXT
    replacement_id = paper_replacement = None
    if kind == TEXT:
        replacement_id = resolve_replacement(
            spec.get("replacement", "unk"), tokenizer, spec.get("neutral_token")
        )
        paper_replacement = spec.get("paper_replacement")
        if paper_replacement is None and tokenizer is not None:
            from .paper_protocol import paper_replacement_id

            paper_replacement = paper_replacement_id(tokenizer)
    info = dict(spec.get("info", {}))
    metrics_file = model_spec.get("metrics_file")
    if metrics_file and _resolve(root, metrics_file).exists():
        import json

        info["training"] = json.loads(_resolve(root, metrics_file).read_text())
    return Task(
        spec["name"],
        kind,
        model,
        samples,
        replacement_id,
        spec.get("image_replacement", "zero"),
        info,
        paper_replacement,
    )
