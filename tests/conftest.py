"""Shared fixtures: tiny models built from configs with fixed seeds (no network)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_llama_family(
    model_type: str = "llama", head: str = "causal_lm", num_layers: int = 2, seed: int = 0, **overrides
):
    """A tiny LLaMA / Mistral / Qwen2 model (GQA: 4 query heads, 2 key-value heads), float32, eval mode."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        MistralConfig,
        MistralForCausalLM,
        MistralForSequenceClassification,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification),
        "mistral": (MistralConfig, MistralForCausalLM, MistralForSequenceClassification),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification),
    }
    config_cls, lm_cls, cls_cls = classes[model_type]
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=256,
        pad_token_id=0,
        num_labels=3,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    model = (lm_cls if head == "causal_lm" else cls_cls)(config)
    # random-init norms are all-ones; perturb them so the norm rules are exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one intra-op thread (use: ``pytestmark = pytest.mark.usefixtures("single_thread")``).

    Tiny models gain nothing from a second thread, and on a loaded 2-core machine the OpenMP threads wait on
    each other: a 2-layer forward pass took 0.2 s with 2 threads and 0.02 s with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_llama():
    return tiny_llama_family("llama")


@pytest.fixture
def input_ids():
    torch.manual_seed(1)
    return torch.randint(1, 101, (2, 9))


def tiny_word_tokenizer(
    vocab_size: int = 101, specials: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
):
    """A whitespace word-level fast tokenizer built offline: ``specials`` first (ids 0..), then ``w0``, ``w1``,
    ... up to ``vocab_size`` ids. ``[PAD]`` is id 0 (the tiny models' ``pad_token_id``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": len(specials) + i for i in range(vocab_size - len(specials))})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
