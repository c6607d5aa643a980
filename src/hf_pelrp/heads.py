"""Head kinds: which logits an attribution explains, for every kind of output head, in one place.

A head kind knows, for one family of model classes (``*ForCausalLM``, ``*ForMaskedLM``,
``*ForSequenceClassification``, ``*ForImageClassification``), which positions are explained, how the
logits there are read from the forward pass, and how targets, foils and positions given by the user are
checked. The engine, the pipeline, the card and the evaluation all ask this module; none of them looks at a
class name itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import AttributionInputError

CAUSAL_LM = "causal_lm"
MASKED_LM = "masked_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
IMAGE_CLASSIFICATION = "image_classification"
SEQ2SEQ_LM = "seq2seq_lm"


@dataclass(frozen=True)
class Selection:
    """What one forward pass gives the engine: ``logits`` [B, K, C] at ``positions`` [B, K] (LM heads) or at
    the head's own read-out (``positions`` None, K = 1)."""

    logits: torch.Tensor
    positions: torch.Tensor | None


@dataclass(frozen=True)
class HeadKind:
    """One kind of output head.

    Attributes
    ----------
    name
        ``"causal_lm"``, ``"masked_lm"``, ``"sequence_classification"``, ``"image_classification"``.
    suffixes
        Class-name endings that identify it (``"ForCausalLM"``, ``"LMHeadModel"``, ...).
    explains_positions
        Whether the user names a sequence position (LM heads) rather than the head reading out one itself.
    vocabulary_targets
        Whether targets are vocabulary ids (LMs) rather than class ids.
    """

    name: str
    suffixes: tuple[str, ...]
    explains_positions: bool
    vocabulary_targets: bool

    def matches(self, model: torch.nn.Module) -> bool:
        class_name = type(model).__name__
        return any(class_name.endswith(s) or s in class_name for s in self.suffixes)


@dataclass(frozen=True)
class EncoderDecoderHeadKind(HeadKind):
    """An encoder-decoder LM head (T5, BART ``*ForConditionalGeneration``): the logits of a target token read at
    a decoder position, explained over the source and the target prefix. Decoder-only models with the same class
    suffix (vision-language ``*ForConditionalGeneration``) are not this kind: ``config.is_encoder_decoder`` decides.
    """

    def matches(self, model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        return bool(getattr(config, "is_encoder_decoder", False)) and super().matches(model)


HEAD_KINDS: tuple[HeadKind, ...] = (
    EncoderDecoderHeadKind(SEQ2SEQ_LM, ("ForConditionalGeneration",), True, True),
    HeadKind(CAUSAL_LM, ("ForCausalLM", "LMHeadModel"), True, True),
    HeadKind(MASKED_LM, ("ForMaskedLM",), True, True),
    HeadKind(SEQUENCE_CLASSIFICATION, ("ForSequenceClassification",), False, False),
    HeadKind(IMAGE_CLASSIFICATION, ("ForImageClassification",), False, False),
)


def head_of(model: torch.nn.Module) -> HeadKind:
    """The head kind of ``model``; :class:`AttributionInputError` naming the supported kinds otherwise."""
    registered = _HEAD_CLASSES.get(type(model).__name__)
    if registered is not None:
        return next(kind for kind in HEAD_KINDS if kind.name == registered[1])
    for kind in HEAD_KINDS:
        if kind.matches(model):
            return kind
    raise AttributionInputError(
        f"{type(model).__name__} has no supported output head. hf_pelrp explains *ForCausalLM / *LMHeadModel, "
        "*ForSequenceClassification, *ForMaskedLM, *ForImageClassification and encoder-decoder "
        "*ForConditionalGeneration models; for a bare encoder, "
        "use hf_pelrp.lrp(model) and seed the backward pass yourself."
    )


def head_kind(model: torch.nn.Module) -> str:
    """The name of ``model``'s head kind (``"causal_lm"``, ...)."""
    return head_of(model).name


# ---- positions ---------------------------------------------------------------------------------------------


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row (works for left and right padding)."""
    steps = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (steps * (attention_mask != 0)).argmax(-1)


def _integer_index(value: Any, what: str) -> torch.Tensor:
    """``value`` as a long tensor, refusing bools and fractional numbers rather than rounding them."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise AttributionInputError(f"{what} must be an int or a LongTensor of indices, got a bool {value!r}")
    if isinstance(value, float) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        raise AttributionInputError(f"{what} must hold integer indices, got {value!r}")
    if not isinstance(value, int | torch.Tensor):
        raise AttributionInputError(f"{what} must be an int or a LongTensor, got {type(value).__name__}")
    return torch.as_tensor(value).long()


def explained_positions(
    position: int | torch.Tensor | None, attention_mask: torch.Tensor, batch: int
) -> torch.Tensor:
    """The sequence position whose next-token logit is explained, per row ([B] long)."""
    seq_len = attention_mask.shape[-1]
    if position is None:
        return last_token_positions(attention_mask)
    pos = _integer_index(position, "position").to(attention_mask.device)
    if pos.dim() == 0:
        pos = pos.expand(batch)
    if pos.shape != (batch,):
        raise AttributionInputError(
            f"position must be an int or a LongTensor of shape [{batch}], got {tuple(pos.shape)}"
        )
    pos = torch.where(pos < 0, pos + seq_len, pos)
    if (pos < 0).any() or (pos >= seq_len).any():
        raise AttributionInputError(f"position {position} is outside the sequence of length {seq_len}")
    if not attention_mask.gather(1, pos[:, None]).bool().all():
        raise AttributionInputError(f"position {position} points at a padding token; explain a real token")
    return pos


def masked_positions(
    position: int | torch.Tensor | None,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    mask_token_id: int | None,
) -> torch.Tensor:
    """The ``[MASK]`` position whose vocabulary logits a masked LM explains, per row ([B] long).

    ``position`` is required (an int or one index per row). With ``input_ids`` the token there must be
    ``mask_token_id`` (the tokenizer's ``mask_token_id``: model configs do not store it); with
    ``inputs_embeds`` there is no token to check and ``mask_token_id`` is not needed.
    """
    if position is None:
        raise AttributionInputError(
            "a masked language model explains the prediction at one [MASK] token: pass position= (an int, or one "
            "index per row), e.g. position=(input_ids == tokenizer.mask_token_id).nonzero()[:, 1]"
        )
    pos = explained_positions(position, attention_mask, attention_mask.shape[0])
    if input_ids is None:
        return pos
    if mask_token_id is None:
        raise AttributionInputError(
            "pass tokenizer= (its mask_token_id is used): the model config does not store the [MASK] id, and "
            "the explained position must be checked to hold a mask token"
        )
    tokens = input_ids.gather(1, pos[:, None].to(input_ids.device)).squeeze(1)
    wrong = (tokens != mask_token_id).nonzero().flatten().tolist()
    if wrong:
        row = wrong[0]
        raise AttributionInputError(
            f"position {pos[row].item()} of row {row} holds token id {tokens[row].item()}, not the mask token "
            f"{mask_token_id}: a masked LM predicts the token at a [MASK] position; name one (or mask that token)"
        )
    return pos


# ---- targets -----------------------------------------------------------------------------------------------


def resolve_target(target: Any, logits: torch.Tensor, what: str = "target") -> torch.Tensor:
    """Target ids [B] (or [B, K] for ``logits`` [B, K, C]) from ``target`` (None = arg-max).

    ``target`` is an int, or a LongTensor [B] / [B, K]; bools and fractional values are refused, as are ids
    outside the ``C`` outputs.
    """
    num = logits.shape[-1]
    lead = tuple(logits.shape[:-1])
    if target is None:
        return logits.detach().argmax(-1)
    if isinstance(target, str):
        raise AttributionInputError(
            f"{what} {target!r} is a string: pass tokenizer= so it can be turned into a token id (one token "
            "exactly), or give the id / class label as an int"
        )
    if isinstance(target, bool) or not isinstance(target, int | torch.Tensor | list | tuple):
        raise AttributionInputError(
            f"{what} must be None, an int or a LongTensor of shape {list(lead)}, got {target!r}"
        )
    t = torch.as_tensor(target, device=logits.device)
    if t.dtype == torch.bool:
        raise AttributionInputError(f"{what} must hold integer class / token ids, got a bool tensor")
    if t.is_floating_point():
        raise AttributionInputError(
            f"{what} must hold integer class / token ids, got a floating-point tensor"
        )
    t = t.long()
    if t.dim() == 0:
        t = t.expand(lead)
    elif len(lead) == 2 and t.shape == lead[:1] and lead[1] == 1:
        t = t[:, None]
    elif len(lead) == 2 and lead[0] == 1 and t.shape == lead[1:]:
        t = t[None]
    if tuple(t.shape) != lead:
        raise AttributionInputError(
            f"{what} has shape {tuple(t.shape)} but {lead[0]} row(s) are explained"
            + (f" at {lead[1]} position(s) each" if len(lead) == 2 and lead[1] > 1 else "")
            + "; pass one id per row or a single int"
        )
    if (t < 0).any() or (t >= num).any():
        bad = t[(t < 0) | (t >= num)][0].item()
        raise AttributionInputError(
            f"{what} id {bad} is out of range: the model has {num} outputs (ids 0..{num - 1})"
        )
    return t


def target_id_of(value: Any, model: torch.nn.Module, tokenizer: Any, what: str = "target") -> Any:
    """A string target / foil as an id: a label of a classifier, or exactly one token of an LM's vocabulary.

    Other values pass through unchanged (they are checked by :func:`resolve_target`).
    """
    if not isinstance(value, str):
        return value
    kind = head_of(model)
    if not kind.vocabulary_targets:
        return label_id_of(model.config, value, what)
    if tokenizer is None:
        raise AttributionInputError(
            f"{what} {value!r} is a string: pass tokenizer= so it can be turned into a token id (one token "
            "exactly), or give the token id"
        )
    return token_id_of(tokenizer, value, what)


def token_id_of(tokenizer: Any, text: str, what: str) -> int:
    """The vocabulary id of ``text``, which must be exactly one token (as the tokenizer encodes it)."""
    if text == "":
        raise AttributionInputError(f"{what} is an empty string: give one token (e.g. ' Paris') or its id")
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 1 and (ids[0] != unk or text == tokenizer.unk_token):
        return int(ids[0])
    # a raw vocabulary item ("ĠParis", "▁Paris") is accepted as written
    vocab_id = tokenizer.get_vocab().get(text)
    if vocab_id is not None:
        return int(vocab_id)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if len(ids) == 1:
        raise AttributionInputError(
            f"{what} {text!r} is not in the vocabulary (the tokenizer maps it to the unknown token {pieces[0]!r}); "
            "give a token of the vocabulary, or its id"
        )
    raise AttributionInputError(
        f"{what} {text!r} is not a single token: the tokenizer splits it into {len(ids)} tokens {pieces}. "
        "Give one token (mind the leading space, e.g. ' Paris'), or its id; to explain several tokens, explain "
        "a continuation"
    )


def label_id_of(config: Any, label: str, what: str) -> int:
    """The class id of a label name (``config.id2label``, then ``config.label2id``; case-insensitive when
    unambiguous). ``id2label`` comes first: it is what transformers shows for a class, and in transformers 5
    ``from_pretrained(..., id2label=...)`` or ``ViTConfig(id2label=...)`` leaves ``label2id`` stale or empty."""
    label2id = {str(v): int(k) for k, v in (getattr(config, "id2label", None) or {}).items()}
    for k, v in (getattr(config, "label2id", None) or {}).items():
        label2id.setdefault(str(k), int(v))
    if label in label2id:
        return label2id[label]
    folded = [v for k, v in label2id.items() if k.lower() == label.lower()]
    if len(folded) == 1:
        return folded[0]
    raise AttributionInputError(
        f"{what} {label!r} is not a label of this model; its labels are {sorted(label2id, key=label2id.get)} "
        "(or pass the class id as an int)"
    )


# ---- reading the logits ------------------------------------------------------------------------------------


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@dataclass(frozen=True)
class Request:
    """What the user asked of the head: ``position`` (causal LMs: the explained position, default the last
    token; masked LMs: the ``[MASK]`` position), ``positions`` [B, K] (several explained positions per row:
    continuations), ``mask_token_id`` (masked LMs)."""

    position: Any = None
    positions: torch.Tensor | None = None
    mask_token_id: int | None = None


def select(
    model: torch.nn.Module,
    kind: HeadKind,
    forward: Callable[..., Any],
    inputs: dict[str, Any],
    attention_mask: torch.Tensor,
    request: Request,
) -> Selection:
    """Run ``forward(**inputs)`` once and return the logits to explain (:class:`Selection`).

    Causal LMs pass only the explained positions through the (vocabulary-sized) LM head where the model
    accepts ``logits_to_keep``.
    """
    batch = attention_mask.shape[0]
    if kind.name == CAUSAL_LM:
        if request.positions is not None:
            positions = request.positions.to(attention_mask.device)
        else:
            positions = explained_positions(request.position, attention_mask, batch)[:, None]
        if accepts_logits_to_keep(model):
            # 1-D indices (the same positions for every row) mean the same in every transformers 5.x release;
            # per-row 2-D indices only since 5.25 (earlier ones index the sequence with the 2-D tensor as a
            # whole and return [B, B, K, C])
            kept, inverse = torch.unique(positions, return_inverse=True)
            logits = forward(**inputs, logits_to_keep=kept).logits
            logits = torch.take_along_dim(logits, inverse[..., None].to(logits.device), dim=1)
        else:
            full = forward(**inputs).logits
            logits = torch.take_along_dim(full, positions[..., None].to(full.device), dim=1)
        return Selection(logits, positions)
    if kind.name == SEQ2SEQ_LM:
        # ``attention_mask`` is the decoder's: the explained positions are target-prefix positions
        if request.positions is not None:
            positions = request.positions.to(attention_mask.device)
        else:
            positions = explained_positions(request.position, attention_mask, batch)[:, None]
        full = forward(**inputs).logits
        return Selection(torch.take_along_dim(full, positions[..., None].to(full.device), dim=1), positions)
    if kind.name == MASKED_LM:
        positions = masked_positions(
            request.position, inputs.get("input_ids"), attention_mask, request.mask_token_id
        )[:, None]
        full = forward(**inputs).logits
        return Selection(torch.take_along_dim(full, positions[..., None].to(full.device), dim=1), positions)
    if request.position is not None or request.positions is not None:
        raise AttributionInputError("position= is only meaningful for causal and masked language models")
    # DeiTForImageClassificationWithTeacher's logits are the mean of its two heads: a linear map, so the
    # seed's relevance splits between the heads by the epsilon rule with nothing else to do
    return Selection(forward(**inputs).logits[:, None], None)


def check_pooled_position(
    model: torch.nn.Module, inputs: dict[str, Any], attention_mask: torch.Tensor
) -> None:
    """Refuse a decoder sequence classifier that would read its logits at a padding position.

    Decoder classifiers (LLaMA, GPT-2, ...) read the last token that is not ``config.pad_token_id``. If the
    batch was padded with another id, or the model has no pad id but the batch is padded, that is a padding
    position and the explanation would describe padding.
    """
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    pad_id = getattr(get_text() if callable(get_text) else config, "pad_token_id", None)
    last = last_token_positions(attention_mask)
    ids = inputs.get("input_ids")
    seq_len = attention_mask.shape[-1]
    if pad_id is None or ids is None:
        read = torch.full_like(last, seq_len - 1)
    else:
        steps = torch.arange(seq_len, device=ids.device)
        read = (steps * (ids != pad_id)).argmax(-1).to(last.device)
    # reading an earlier real token is the model's own behaviour (a text ending in the pad id); reading
    # padding is not what the user asked
    on_padding = attention_mask.gather(1, read[:, None].to(attention_mask.device)).squeeze(1) == 0
    wrong = on_padding.nonzero().flatten().tolist()
    if wrong:
        row = wrong[0]
        how = (
            f"input_ids are padded with an id other than config.pad_token_id={pad_id}"
            if ids is not None and pad_id is not None
            else "the model cannot find padding in inputs_embeds (or has no pad_token_id) and reads the last position"
        )
        raise AttributionInputError(
            f"{type(model).__name__} reads its logits at the last token that is not padding, but in row {row} it "
            f"would read position {int(read[row])}, a padding position (the last real token is {int(last[row])}): "
            f"{how}. Pad "
            "with config.pad_token_id (tokenizer.pad_token_id should equal it), or pad on the left."
        )


# ---- head classes whose name does not tell their kind ----------------------------------------------------------

#: class name -> (model type, head kind name), see :func:`register_head_class`
_HEAD_CLASSES: dict[str, tuple[str, str]] = {}


def register_head_class(model_type: str, class_name: str, kind: str) -> None:
    """Explain instances of ``class_name`` (of ``model_type``) with the head kind ``kind``.

    For model classes whose name does not say what their head is: a vision-language model named
    ``*ForConditionalGeneration`` whose language model is a decoder explained on text-only inputs is a causal
    LM (``register_head_class("qwen2_vl", "Qwen2VLForConditionalGeneration", "causal_lm")``).
    :func:`hf_pelrp.check_adapter` checks the registered classes of a model type with the others.
    """
    if kind not in {k.name for k in HEAD_KINDS}:
        raise ValueError(f"unknown head kind {kind!r}; the kinds are {[k.name for k in HEAD_KINDS]}")
    _HEAD_CLASSES[class_name] = (model_type, kind)


def registered_head_classes(model_type: str) -> list[tuple[str, str]]:
    """``(class name, head kind)`` of the classes registered for ``model_type`` (:func:`register_head_class`)."""
    return [(name, kind) for name, (mt, kind) in _HEAD_CLASSES.items() if mt == model_type]


#: transformers' auto mappings of the head kinds hf_pelrp explains
HEAD_MAPPINGS = {
    CAUSAL_LM: "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    MASKED_LM: "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    SEQUENCE_CLASSIFICATION: "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    IMAGE_CLASSIFICATION: "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    SEQ2SEQ_LM: "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}


def classes_of_type(model_type: str, heads: tuple[str, ...] | None = None) -> list[type]:
    """The model classes transformers maps ``model_type`` to (its auto mappings and the classes registered with
    :func:`register_head_class`), for each head kind of ``heads`` (``None``: every kind hf_pelrp explains)."""
    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # (the lazy CONFIG_MAPPING's .get() answers None for every type: index it)
    type_config = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None  # noqa: SIM401

    def built_from_this_config(cls: type) -> bool:
        # an auto map may give a composite type the class of one of its sub-configs (Llama 4's causal-LM map:
        # Llama4ForCausalLM, built from a Llama4TextConfig, i.e. the llama4_text type): not built from this config
        wanted = getattr(cls, "config_class", None)
        subs = getattr(type_config, "sub_configs", None) or {}
        return not (
            isinstance(wanted, type) and wanted in subs.values() and not issubclass(type_config, wanted)
        )

    classes = []
    for kind, mapping_name in HEAD_MAPPINGS.items():
        if heads is not None and kind not in heads:
            continue
        name = getattr(modeling_auto, mapping_name).get(model_type)
        names = name if isinstance(name, list | tuple) else [name]
        for n in names:
            cls = getattr(transformers, n, None) if n else None
            if cls is not None and built_from_this_config(cls):
                classes.append(cls)
    for n, kind in registered_head_classes(model_type):
        cls = getattr(transformers, n, None)
        if cls is not None and cls not in classes and (heads is None or kind in heads):
            classes.append(cls)
    return classes
