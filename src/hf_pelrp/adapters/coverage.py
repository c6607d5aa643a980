"""Which of transformers' model types hf_pelrp explains, per head: read off the registry and transformers' own
auto maps, so the README's coverage table can be generated (``scripts/coverage.py``) and checked by a test.

A model type counts for a head when transformers' auto map for that head has a class for it. It is *declared*
when an adapter is registered for it and the adapter takes that head, *refused* when it is refused by name
(:func:`hf_pelrp.adapters.refused_model_types`), and otherwise *left to the inference*: an undeclared type is
inferred from its modules on first use where its parts are known (and proven by ``check_adapter``), else refused
naming the part. Which of those the inference explains is only known by building the model, so this table does
not claim them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..heads import CAUSAL_LM, IMAGE_CLASSIFICATION, MASKED_LM, SEQ2SEQ_LM, SEQUENCE_CLASSIFICATION
from .base import _REGISTRY, refused_model_types

#: each head kind and the name of transformers' auto map of its classes (``transformers.models.auto``)
HEAD_MAPS: dict[str, str] = {
    CAUSAL_LM: "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    MASKED_LM: "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    SEQUENCE_CLASSIFICATION: "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    IMAGE_CLASSIFICATION: "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    SEQ2SEQ_LM: "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}


@dataclass(frozen=True)
class HeadCoverage:
    """The model types of one head kind, by what hf_pelrp does with them."""

    head: str
    declared: tuple[str, ...]
    refused: tuple[str, ...]
    inference: tuple[str, ...]

    @property
    def total(self) -> int:
        return len(self.declared) + len(self.refused) + len(self.inference)


def coverage() -> list[HeadCoverage]:
    """Per head kind: the model types of transformers' auto map that are declared, refused by name, or left to
    the inference."""
    from transformers.models.auto import modeling_auto

    refused = refused_model_types()
    out = []
    for head, name in HEAD_MAPS.items():
        types = sorted(getattr(modeling_auto, name))
        declared = tuple(
            t for t in types if t in _REGISTRY and (_REGISTRY[t].heads is None or head in _REGISTRY[t].heads)
        )
        rest = [t for t in types if t not in declared]
        out.append(
            HeadCoverage(
                head,
                declared,
                tuple(t for t in rest if t in refused),
                tuple(t for t in rest if t not in refused),
            )
        )
    return out


def coverage_table() -> str:
    """The Markdown table of :func:`coverage` (counts, then the undeclared types), with the transformers version."""
    import transformers

    rows = coverage()
    lines = [
        f"Generated from the registry and transformers {transformers.__version__}'s auto maps by "
        "`python scripts/coverage.py --write` (a test fails when it is out of date).",
        "",
        "| head | model types in transformers | declared | refused by name | left to the inference |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.head} | {row.total} | {len(row.declared)} | {len(row.refused)} | {len(row.inference)} |"
        )
    every = {t for row in rows for t in (*row.declared, *row.refused, *row.inference)}
    declared = {t for row in rows for t in row.declared}
    refused = {t for row in rows for t in row.refused}
    lines.append(
        f"| any of these heads | {len(every)} | {len(declared)} | {len(refused - declared)} | "
        f"{len(every - declared - refused)} |"
    )
    lines += ["", "Left to the inference (explained if it can place every part, else refused naming it):", ""]
    for row in rows:
        if row.inference:
            lines.append(f"- {row.head}: " + ", ".join(f"`{t}`" for t in row.inference))
    return "\n".join(lines)
