"""The README says what the code does: the architecture table lists exactly the registered model types and the
refusal list names the refused ones. Its Python blocks (the "add an architecture" recipe among them) run as
written in tests/test_readme_blocks.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


def test_the_readme_names_the_locked_versions_and_the_lower_bounds():
    """The overview's "Versions" paragraph says what constraints/lock.txt pins and what make test-oldest
    installs (pyproject's lower bounds): a refreshed lock or a raised bound must update it."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    section = " ".join(_section("overview").split())
    lock = dict(
        line.split("==")
        for line in (root / "constraints" / "lock.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    lock = {k.lower().replace("_", "-"): v for k, v in lock.items()}
    for package in ("transformers", "tokenizers", "huggingface-hub", "kernels", "accelerate", "datasets"):
        assert f"{package} {lock[package]}," in section, package
    assert f"torch {lock['torch']} (CPU build)" in section
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    bounds = {re.split(r"[<>=]", d)[0]: d for d in project["dependencies"]}
    lower = re.search(r"transformers>=([\d.]+)", bounds["transformers"])[1]
    assert f"transformers >= {lower} and < 6" in section
    assert f"`make test-oldest`: transformers {lower}.0," in section


def test_the_coverage_table_is_up_to_date():
    """The README's coverage table is what scripts/coverage.py generates from the registry and the installed
    transformers' auto maps (compared where transformers is the version the table names: the drift
    environments run other versions)."""
    import transformers

    from hf_pelrp.adapters.coverage import coverage_table

    section = _section("architectures")
    table = section[section.index("<!-- coverage:table -->") : section.index("<!-- /coverage:table -->")]
    named = re.search(r"transformers ([\w.]+)'s auto maps", table)
    assert named, "the coverage table names no transformers version"
    if named[1] != transformers.__version__:
        pytest.skip(f"the table is for transformers {named[1]}, this is {transformers.__version__}")
    assert table.removeprefix("<!-- coverage:table -->").strip() == coverage_table().strip(), (
        "out of date: run python scripts/coverage.py --write"
    )
