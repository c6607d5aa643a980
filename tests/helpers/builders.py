"""Tiny models and inputs built from configs with fixed seeds (no network), shared by the tests.

Every builder randomises the parameters that random initialisation leaves constant (biases, norm weights,
special tokens) so that each rule, and each bias's share, is exercised.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

# ---- LLaMA family --------------------------------------------------------------------------------------------


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


# ---- GPT-2 ----------------------------------------------------------------------------------------------------

GPT2_VOCAB = 60
GPT2_PAD = 0


def tiny_gpt2(head: str = "lm", num_layers: int = 2, seed: int = 0, biases: bool = True):
    """A tiny GPT-2 (hidden 32, 4 heads) with random biases and LayerNorm weights, float32, eval mode."""
    config = GPT2Config(
        n_embd=32,
        n_layer=num_layers,
        n_head=4,
        vocab_size=GPT2_VOCAB,
        n_positions=24,
        pad_token_id=GPT2_PAD,
        bos_token_id=1,
        eos_token_id=1,
        num_labels=3,
    )
    torch.manual_seed(seed)
    model = (GPT2LMHeadModel if head == "lm" else GPT2ForSequenceClassification)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p) if biases else torch.zeros_like(p))
            elif ".ln_" in name and name.endswith("weight"):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def padded_batch(side: str, lengths=(7, 4, 6), seed: int = 1):
    """Token ids (no pad id among real tokens) padded on ``side`` to the longest row, and the mask."""
    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.full((len(lengths), seq), GPT2_PAD)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        cols = slice(seq - n, seq) if side == "left" else slice(0, n)
        ids[b, cols] = torch.randint(2, GPT2_VOCAB, (n,), generator=gen)
        mask[b, cols] = 1
    return ids, mask


# ---- BERT family ---------------------------------------------------------------------------------------------

BERT_VOCAB = 60
MASK_ID = BERT_VOCAB - 1
BERT_PAD = {"bert": 0, "roberta": 1, "distilbert": 0, "distilbert-sinusoidal": 0}


def tiny_bert_family(family: str, head: str = "cls", num_layers: int = 2, seed: int = 0, biases: bool = True):
    """A tiny BERT / RoBERTa / DistilBERT (hidden 32, 4 heads), random biases and LayerNorm weights, eval mode.

    ``biases=False`` zeroes every bias, and RoBERTa's single token-type vector (a bias in all but name).
    """
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForMaskedLM,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForMaskedLM,
        RobertaForSequenceClassification,
    )

    common = dict(
        vocab_size=BERT_VOCAB, max_position_embeddings=24, num_labels=3, pad_token_id=BERT_PAD[family]
    )
    if family == "bert":
        config = BertConfig(
            hidden_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            intermediate_size=64,
            **common,
        )
        classes = (BertForSequenceClassification, BertForMaskedLM)
    elif family == "roberta":
        common["max_position_embeddings"] += BERT_PAD["roberta"] + 1
        config = RobertaConfig(
            hidden_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            intermediate_size=64,
            type_vocab_size=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
        classes = (RobertaForSequenceClassification, RobertaForMaskedLM)
    else:
        config = DistilBertConfig(
            dim=32,
            n_layers=num_layers,
            n_heads=4,
            hidden_dim=64,
            sinusoidal_pos_embds=family.endswith("sinusoidal"),
            **common,
        )
        classes = (DistilBertForSequenceClassification, DistilBertForMaskedLM)
    torch.manual_seed(seed)
    model = classes[0 if head == "cls" else 1](config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p) if biases else torch.zeros_like(p))
            elif "layer_norm" in name.lower() and name.endswith("weight"):
                p.add_(0.2 * torch.randn_like(p))
        if not biases and family == "roberta":
            model.roberta.embeddings.token_type_embeddings.weight.zero_()
    return model.eval()


def right_padded(family: str, lengths=(7, 4, 6), mask_at: int | None = None, seed: int = 1):
    """Token ids (real ids avoid the pad and mask ids) right-padded with the family's pad id, and the mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), BERT_PAD[family])
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, MASK_ID, (n,), generator=gen)
        mask[b, :n] = 1
    if mask_at is not None:
        ids[:, mask_at] = MASK_ID
    return ids, mask


# ---- ViT / DeiT ----------------------------------------------------------------------------------------------

IMAGE, PATCH, CHANNELS = 32, 8, 3


def tiny_vision(kind: str = "vit", num_layers: int = 2, seed: int = 0, bias_free: bool = False):
    """A tiny ViT / DeiT classifier (32x32 images, 8x8 patches, hidden 32), float32, eval mode.

    Random init leaves biases, CLS / distillation tokens, DeiT's position embeddings and the LayerNorm
    parameters at 0 / 1; they are randomised so that every rule (and every bias's share) is exercised.
    """
    from transformers import (
        DeiTConfig,
        DeiTForImageClassification,
        DeiTForImageClassificationWithTeacher,
        ViTConfig,
        ViTForImageClassification,
    )

    classes = {
        "vit": (ViTConfig, ViTForImageClassification),
        "deit": (DeiTConfig, DeiTForImageClassification),
        "deit-teacher": (DeiTConfig, DeiTForImageClassificationWithTeacher),
    }
    config_cls, model_cls = classes[kind]
    torch.manual_seed(seed)
    config = config_cls(
        image_size=IMAGE,
        patch_size=PATCH,
        num_channels=CHANNELS,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    )
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.0 if bias_free else 0.1 * torch.randn_like(p))
            elif "layernorm" in name and name.endswith("weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif any(k in name for k in ("cls_token", "distillation_token", "position_embeddings")):
                p.copy_(0.5 * torch.randn_like(p))
            elif "projection.weight" in name:
                # patch tokens of the same scale as the CLS token and the positions
                p.mul_(5.0)
    return model.eval()


def images(batch: int = 2, size: int = IMAGE, seed: int = 1, channels: int = CHANNELS) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, channels, size, size)
