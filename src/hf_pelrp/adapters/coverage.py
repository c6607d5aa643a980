"""Which of transformers' model types hf_pelrp explains, per head: read off the registry, transformers' own auto
maps and a stored run of the inference, so the README's coverage table can be generated (``scripts/coverage.py``)
and checked by a test.

A model type counts for a head when transformers' auto map for that head has a class for it. It is

- *declared* when an adapter is registered for it and ``check_adapter`` proves that very class (the class is
  one of :func:`hf_pelrp.heads.classes_of_type` of one of the type's declarations);
- *refused by name* when it is refused with a reason (:func:`hf_pelrp.adapters.refused_model_types`);
- *declared, other heads*: an adapter is registered for it, but not for this head's class (attributing that
  class is refused);
- otherwise it is left to the inference, which either *infers* a declaration (proven by ``check_adapter`` on a
  tiny float64 instance), *refuses* it naming the part it cannot place, or was *not probed*: no tiny instance
  of the type's default configuration could be built by :func:`probe_inference` (its configuration does not
  shrink with the generic sizes, or the shrunk instance still has millions of parameters). What the inference
  does is only known by building the model, so it is probed by ``python scripts/coverage.py --write`` (about
  two minutes) and stored in :mod:`hf_pelrp.adapters._coverage_probes`; a test checks that the stored probes
  are those of the current registry and re-runs a sample of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ..heads import (
    CAUSAL_LM,
    IMAGE_CLASSIFICATION,
    MASKED_LM,
    SEQ2SEQ_LM,
    SEQUENCE_CLASSIFICATION,
    classes_of_type,
)
from .base import _REGISTRY, adapter_variants, refused_model_types

IMAGE_TEXT_TO_TEXT = "image_text_to_text"
SPEECH_SEQ2SEQ = "speech_seq2seq"

#: each head and the name of transformers' auto map of its classes (``transformers.models.auto``); the last two
#: are not head kinds of their own: hf_pelrp explains the vision-language ones on text as causal LMs
HEAD_MAPS: dict[str, str] = {
    CAUSAL_LM: "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    MASKED_LM: "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    SEQUENCE_CLASSIFICATION: "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    IMAGE_CLASSIFICATION: "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    SEQ2SEQ_LM: "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    IMAGE_TEXT_TO_TEXT: "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    SPEECH_SEQ2SEQ: "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
}

INFERRED, REFUSED, NOT_PROBED = "inferred", "refused", "not probed"
#: a probe instance above this many parameters is not built (the generic sizes did not shrink the config)
_MAX_PARAMETERS = 5_000_000


@dataclass(frozen=True)
class HeadCoverage:
    """The model types of one head, by what hf_pelrp does with them."""

    head: str
    declared: tuple[str, ...]
    refused: tuple[str, ...]
    other_heads: tuple[str, ...]
    inferred: tuple[str, ...]
    refused_by_inference: tuple[str, ...]
    not_probed: tuple[str, ...]

    @property
    def inference(self) -> tuple[str, ...]:
        """The types left to the inference (inferred, refused by it, or not probed)."""
        return (*self.inferred, *self.refused_by_inference, *self.not_probed)

    @property
    def total(self) -> int:
        return len(self.declared) + len(self.refused) + len(self.other_heads) + len(self.inference)


def head_class_name(head: str, model_type: str) -> str | None:
    """The class transformers' auto map of ``head`` gives ``model_type`` (None when it has none)."""
    from transformers.models.auto import modeling_auto

    name = getattr(modeling_auto, HEAD_MAPS[head]).get(model_type)
    return name[0] if isinstance(name, list | tuple) else name


def _declared_classes(model_type: str) -> set[str]:
    """Names of the classes check_adapter proves for ``model_type`` (every variant)."""
    return {
        cls.__name__ for a in adapter_variants(model_type) for cls in classes_of_type(model_type, a.heads)
    }


def left_to_inference() -> list[tuple[str, str]]:
    """``(head, model_type)`` of every type with no declaration and no refusal by name."""
    from transformers.models.auto import modeling_auto

    refused = refused_model_types()
    return [
        (head, t)
        for head, name in HEAD_MAPS.items()
        for t in sorted(getattr(modeling_auto, name))
        if t not in _REGISTRY and t not in refused
    ]


def coverage(probes: dict[str, tuple[str, str]] | None = None) -> list[HeadCoverage]:
    """Per head: the model types of transformers' auto map that are declared, refused by name, declared for other
    heads only, or left to the inference (split by ``probes``: ``"head:type" -> (status, detail)``, by default
    the stored ones of this transformers version; a type without a probe counts as not probed)."""
    from transformers.models.auto import modeling_auto

    probes = stored_probes() if probes is None else probes
    refused = refused_model_types()
    out = []
    for head, name in HEAD_MAPS.items():
        groups: dict[str, list[str]] = {
            k: [] for k in ("declared", "by name", "other", INFERRED, REFUSED, NOT_PROBED)
        }
        for t in sorted(getattr(modeling_auto, name)):
            if t in _REGISTRY:
                groups["declared" if head_class_name(head, t) in _declared_classes(t) else "other"].append(t)
            elif t in refused:
                groups["by name"].append(t)
            else:
                groups[probes.get(f"{head}:{t}", (NOT_PROBED, ""))[0]].append(t)
        out.append(
            HeadCoverage(
                head,
                *(tuple(groups[k]) for k in ("declared", "by name", "other", INFERRED, REFUSED, NOT_PROBED)),
            )
        )
    return out


def stored_probes() -> dict[str, tuple[str, str]]:
    """The probes ``scripts/coverage.py --write`` stored, if they are of the installed transformers (else none)."""
    import transformers

    from . import _coverage_probes

    if transformers.__version__ != _coverage_probes.TRANSFORMERS:
        return {}
    return dict(_coverage_probes.PROBES)


#: further sizes the probe caps (the inference keeps a user's own counts): experts, latent ranks, tower depths
_PROBE_CAPS = {
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_local_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 24,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "depth": 1,
}


def _shrunk(config):
    """``config`` and its sub-configs shrunk to the inference's tiny sizes (and :data:`_PROBE_CAPS`)."""
    from transformers import PretrainedConfig

    from .infer import _tiny_config

    tiny = _tiny_config(config)
    for name, cap in _PROBE_CAPS.items():
        value = getattr(tiny, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            try:
                setattr(tiny, name, cap)
            except (AttributeError, TypeError, ValueError):  # a read-only or validated field: left as it is
                continue
    for name, value in list(vars(tiny).items()):
        if isinstance(value, PretrainedConfig):
            setattr(tiny, name, _shrunk(value))
    return tiny


def probe_inference(head: str, model_type: str) -> tuple[str, str]:
    """What the inference does with ``model_type``'s class for ``head``, built from its default configuration
    shrunk to tiny sizes: ``("inferred", declaration name)`` once check_adapter proved it, ``("refused",
    reason)`` naming what it cannot place, or ``("not probed", why)`` when no tiny instance could be built."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..errors import UnsupportedModelError
    from .base import adapter_for

    cls = getattr(transformers, head_class_name(head, model_type) or "", None)
    if cls is None:
        return NOT_PROBED, f"transformers has no class {head_class_name(head, model_type)!r}"
    try:
        config = _shrunk(CONFIG_MAPPING[model_type]())
        with torch.device("meta"):
            size = sum(p.numel() for p in cls(copy.deepcopy(config)).parameters())
        if size > _MAX_PARAMETERS:
            return (
                NOT_PROBED,
                f"its default config shrunk with the generic sizes still has {size:,} parameters",
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls(config).eval()
    except Exception as err:  # noqa: BLE001 - a config the generic sizes break: reported, not probed
        return NOT_PROBED, f"no tiny instance from its default config ({type(err).__name__}: {err})"
    try:
        return INFERRED, adapter_for(model).name
    except UnsupportedModelError as err:
        text = str(err)
        marker = "No declaration could be inferred either: "
        return REFUSED, text.split(marker, 1)[1] if marker in text else text


def _short(reason: str) -> str:
    """The part of a refusal that says what the inference could not place (first sentence after the class)."""
    for marker in (" is not supported by hf_pelrp", "Declare the model type explicitly"):
        reason = reason.split(marker, 1)[0]
    head, _, tail = reason.partition(": ")
    return (tail or head).strip().rstrip(".")


def coverage_table() -> str:
    """The Markdown table of :func:`coverage` (counts, then the types left to the inference), with the
    transformers version."""
    import transformers

    probes = stored_probes()
    rows = coverage(probes)
    lines = [
        f"Generated from the registry and transformers {transformers.__version__}'s auto maps by "
        "`python scripts/coverage.py --write` (a test fails when it is out of date).",
        "",
        "| head | model types in transformers | declared | inferred | refused by name | declared for other "
        "heads only | refused by the inference | not probed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fields = ("declared", "inferred", "refused", "other_heads", "refused_by_inference", "not_probed")
    for row in rows:
        counts = " | ".join(str(len(getattr(row, f))) for f in fields)
        lines.append(f"| {row.head} | {row.total} | {counts} |")
    union = {f: {t for row in rows for t in getattr(row, f)} for f in fields}
    explained = union["declared"] | union["inferred"]
    every = {t for row in rows for t in (*row.declared, *row.refused, *row.other_heads, *row.inference)}
    lines.append(
        f"| any of these heads | {len(every)} | {len(union['declared'])} | "
        f"{len(union['inferred'] - union['declared'])} | {len(union['refused'])} | "
        f"{len(union['other_heads'] - explained)} | "
        f"{len(union['refused_by_inference'] - explained - union['other_heads'])} | "
        f"{len(union['not_probed'] - explained - union['other_heads'] - union['refused_by_inference'])} |"
    )
    lines += [
        "",
        f"**{len(explained)} model types explained** (declared or inferred, each proven by `check_adapter` on a "
        "tiny float64 instance). A type counts once in the last row, under the first of: explained, refused by "
        "name, declared for other heads, refused by the inference, not probed.",
        "",
        "The inference was run on every type left to it (its class built from the type's default configuration "
        "shrunk to tiny sizes, `hf_pelrp.adapters.coverage.probe_inference`); the types it inferred, and why it "
        "refused the others:",
        "",
    ]
    for row in rows:
        if row.inferred:
            lines.append(f"- {row.head}, inferred: " + ", ".join(f"`{t}`" for t in row.inferred))
    reasons: dict[str, list[str]] = {}
    for row in rows:
        for t in row.refused_by_inference:
            reasons.setdefault(_short(probes[f"{row.head}:{t}"][1]), []).append(f"`{t}` ({row.head})")
    for reason, where in sorted(reasons.items(), key=lambda item: (-len(item[1]), item[0])):
        lines.append(f"- refused, {reason}: " + ", ".join(where))
    for row in rows:
        if row.not_probed:
            lines.append(
                f"- {row.head}, not probed (no tiny instance of its default config could be built with the "
                "generic sizes): " + ", ".join(f"`{t}`" for t in row.not_probed)
            )
    for row in rows:
        if row.other_heads:
            lines.append(
                f"- {row.head}, declared for other heads only: "
                + ", ".join(f"`{t}`" for t in row.other_heads)
            )
    return "\n".join(lines)
