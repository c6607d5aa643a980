"""The README says what the code does: the architecture table lists exactly the registered model types and the
refusal list names the refused ones. Its Python blocks (the "add an architecture" recipe among them) run as
written in tests/test_readme_blocks.py."""

from __future__ import annotations

import re
from pathlib import Path

import hf_pelrp
from hf_pelrp.adapters import refused_model_types

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _section(name: str) -> str:
    return README[README.index(f"<!-- section:{name} -->") : README.index(f"<!-- /section:{name} -->")]


def test_architecture_table_lists_exactly_the_supported_model_types():
    section = _section("architectures")
    table = section[
        section.index("| `model_type` |") : section.index("\n\n", section.index("| `model_type` |"))
    ]
    listed = set()
    for row in table.splitlines()[2:]:
        listed |= set(re.findall(r"`([a-z0-9_\-]+)`", row.split("|")[1]))
    assert listed == set(hf_pelrp.supported_model_types())
    assert f"{len(listed)} model types" in section


def test_refused_model_types_are_named_in_the_readme():
    section = _section("architectures")
    for model_type in refused_model_types():
        assert f"`{model_type}`" in section, model_type
