"""One request, one result (issue 22): every entry point builds one ExplanationRequest (rules and adapter resolved
once), the engine runs it, and one function builds every result. The parameters ``attribute`` no longer names
still work for one release, with a FutureWarning naming the replacement, and give identical results."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

import hf_pelrp
import hf_pelrp.engine
import hf_pelrp.request
from conftest import tiny_llama_family
from helpers.builders import right_padded, tiny_bert_family, tiny_word_tokenizer
from hf_pelrp import LRPConfig

PACKAGE = Path(hf_pelrp.__file__).resolve().parent


@pytest.fixture(scope="module")
def lm():
    return tiny_llama_family("llama", "causal_lm", num_layers=2)


@pytest.fixture(scope="module")
def ids():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(1, 101, (2, 7), generator=gen)


def _same(a, b) -> None:
    assert type(a) is type(b)
    for name in ("token", "position", "target", "target_value"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    assert (a.mode, a.positional) == (b.mode, b.positional)


def _counting(monkeypatch, module, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# ---- built once ----------------------------------------------------------------------------------------------


def test_attribute_resolves_the_rules_and_the_adapter_once_per_call(lm, ids, monkeypatch):
    rules = _counting(monkeypatch, hf_pelrp.request, "resolve_rules")
    adapters = _counting(monkeypatch, hf_pelrp.request, "adapter_for")
    hf_pelrp.attribute(lm, ids, config="cp")
    assert (len(rules), len(adapters)) == (1, 1)
    hf_pelrp.explain_continuation(lm, ids[:1], torch.tensor([5, 6, 7]))
    assert (len(rules), len(adapters)) == (2, 2)
    # the engine itself never resolves rules or adapters: it reads them from the request
    assert not hasattr(hf_pelrp.engine, "resolve_rules")
    assert not hasattr(hf_pelrp.engine, "adapter_for")


def test_the_dataset_runner_resolves_once_for_the_whole_run(lm, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"input_ids": [[3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]]})
    rules = _counting(monkeypatch, hf_pelrp.request, "resolve_rules")
    hf_pelrp.attribute_dataset(lm, rows, tmp_path, batch_size=1, progress=False)
    assert len(rules) == 1  # three batches, one request


def test_the_request_is_frozen_and_holds_the_resolved_rules(lm, ids):
    request = hf_pelrp.request.single_request(lm, {"input_ids": ids}, mode="cp", positional=False, target=5)
    assert request.rules == LRPConfig(mode="cp", positional=False)
    assert request.kind.name == "causal_lm"
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.target = 6  # type: ignore[misc]
    _same(hf_pelrp.engine.explain(request), hf_pelrp.attribute(lm, ids, target=5, config=request.rules))


# ---- a small signature -------------------------------------------------------------------------------------


def test_attribute_names_at_most_eight_parameters():
    params = inspect.signature(hf_pelrp.attribute).parameters.values()
    named = [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert named == [
        "model",
        "input_ids",
        "attention_mask",
        "target",
        "config",
        "position",
        "foil",
        "tokenizer",
    ]
    assert inspect.signature(hf_pelrp.attribute).return_annotation in ("Attribution", hf_pelrp.Attribution)


# ---- deprecated parameters: a FutureWarning naming the replacement, identical results ---------------------------


def test_mode_and_positional_warn_and_equal_config(lm, ids):
    with pytest.warns(FutureWarning, match=r"mode=.*config="):
        old = hf_pelrp.attribute(lm, ids, mode="cp")
    _same(old, hf_pelrp.attribute(lm, ids, config="cp"))
    with pytest.warns(FutureWarning, match=r"positional=.*LRPConfig\(positional"):
        old = hf_pelrp.attribute(lm, ids, positional=False)
    _same(old, hf_pelrp.attribute(lm, ids, config=LRPConfig(positional=False)))
    with pytest.warns(FutureWarning, match="mode="):
        old = hf_pelrp.explain_continuation(lm, ids[:1], torch.tensor([5, 6]), mode="cp")
    _same(old, hf_pelrp.explain_continuation(lm, ids[:1], torch.tensor([5, 6]), config="cp"))


def test_mode_keeps_changing_the_models_own_default(lm, ids):
    """The deprecated keywords resolve exactly as before: over the model's default rules, not instead of them."""
    hf_pelrp.config.set_model_default_config(lm, LRPConfig(mode="cp", positional=False))
    try:
        with pytest.warns(FutureWarning):
            attr = hf_pelrp.attribute(lm, ids, positional=True)
        assert (attr.mode, attr.positional) == ("cp", True)
    finally:
        hf_pelrp.config.set_model_default_config(lm, None)


def test_continuation_arguments_warn_and_call_explain_continuation(lm, ids):
    cont = torch.tensor([5, 6, 7])
    with pytest.warns(FutureWarning, match="explain_continuation"):
        old = hf_pelrp.attribute(lm, ids[:1], continuation_ids=cont)
    _same(old, hf_pelrp.explain_continuation(lm, ids[:1], cont))
    with pytest.warns(FutureWarning, match="explain_continuation"):
        old = hf_pelrp.attribute(lm, ids[:1], generate=True, max_new_tokens=2)
    _same(old, hf_pelrp.explain_continuation(lm, ids[:1], generate=True, max_new_tokens=2))
    with pytest.warns(FutureWarning), pytest.raises(hf_pelrp.AttributionInputError, match="do not apply"):
        hf_pelrp.attribute(lm, ids[:1], target=3, continuation_ids=cont)


def test_gradient_checkpointing_warns_and_equals_the_models_own_setting(ids):
    model = tiny_llama_family("llama", "causal_lm", num_layers=2)
    with pytest.warns(FutureWarning, match="gradient_checkpointing_enable"):
        old = hf_pelrp.attribute(model, ids, gradient_checkpointing=True)
    model.gradient_checkpointing_enable()
    _same(old, hf_pelrp.attribute(model, ids))


def test_mask_token_id_warns_and_equals_the_tokenizers():
    model = tiny_bert_family("bert", "mlm")
    tokenizer = tiny_word_tokenizer(vocab_size=60)
    ids, mask = right_padded("bert")
    ids[:, 2] = tokenizer.mask_token_id
    with pytest.warns(FutureWarning, match=r"mask_token_id=.*tokenizer="):
        old = hf_pelrp.attribute(model, ids, mask, position=2, mask_token_id=tokenizer.mask_token_id)
    _same(old, hf_pelrp.attribute(model, ids, mask, position=2, tokenizer=tokenizer))


def test_no_warning_for_the_current_signature(lm, ids, recwarn):
    hf_pelrp.attribute(lm, ids, None, 5, config="cp", position=-1, foil=6)
    hf_pelrp.explain_continuation(lm, ids[:1], torch.tensor([5]), config="attnlrp")
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning | FutureWarning)]


# ---- one result builder ----------------------------------------------------------------------------------------

_RESULTS = {"Attribution", "GenerationAttribution", "Seq2SeqAttribution"}
#: modules that construct result objects from something other than an explanation pass: the result's own views
#: (rows, slices, ``.to``), and reading saved results back (safetensors files, Parquet shards)
_NOT_FROM_A_PASS = {"result.py", "io.py", "dataset.py:to_attribution"}


def _constructions() -> list[str]:
    """``file:function`` of every call of a result class in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in _RESULTS:
                    found.append(f"{path.relative_to(PACKAGE)}:{func.name}")
    return found


def test_the_result_is_built_in_one_place():
    from_a_pass = [
        where
        for where in _constructions()
        if where.split(":")[0] not in _NOT_FROM_A_PASS and where not in _NOT_FROM_A_PASS
    ]
    assert from_a_pass and set(from_a_pass) == {"engine.py:build_result"}


def test_every_entry_point_ends_in_engine_explain(lm, ids, monkeypatch):
    calls = _counting(monkeypatch, hf_pelrp.engine, "build_result")
    hf_pelrp.attribute(lm, ids)
    hf_pelrp.explain_continuation(lm, ids[:1], torch.tensor([5, 6]))
    hf_pelrp.conservation_ledger(lm, ids)
    assert len(calls) == 3


# ---- the package picture: no import circle ----------------------------------------------------------------------


def _top_level_imports(path: Path) -> set[str]:
    """Package modules ``path`` imports at module level (imports inside functions are lazy by design)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{a.name}" for a in node.names]
            out.add(target)
            out.update(names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_pelrp"):
            out.add(node.module)
    return out


def test_the_package_has_no_import_circle():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _top_level_imports(path) if m in modules and m != name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(f"import circle: {' -> '.join([*trail, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # the request sits above the adapters and below the engine: no lower layer imports it
    for lower in ("hf_pelrp.adapters.base", "hf_pelrp.context", "hf_pelrp.heads", "hf_pelrp.config"):
        assert "hf_pelrp.request" not in graph[lower] and "hf_pelrp.engine" not in graph[lower]
    assert graph["hf_pelrp.rules"] == set()
