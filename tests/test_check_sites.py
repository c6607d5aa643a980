"""check_adapter proves every rule site against an explicit float64 reference, and reports every failure.

The declarations below are wrong in ways the global checks (forward equivalence, CP conservation, padding,
batches) cannot see; only the per-site references of :mod:`hf_pelrp.check_sites` refuse them, naming the site.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import hf_pelrp
from hf_pelrp import AdapterCheckError
from hf_pelrp.adapters import register_adapter
from hf_pelrp.adapters.base import _REGISTRY, GatedProduct
from hf_pelrp.adapters.llama import llama_like
from hf_pelrp.check import _Checker
from hf_pelrp.hooks import OutputGradient

pytestmark = pytest.mark.usefixtures("single_thread")

SITE_CHECK = "gated product sites match the explicit float64 rule"


@pytest.fixture
def scratch_registry():
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def _failures(report):
    return {(r.name, r.detail) for r in report.failures}


def test_gated_factor_on_the_gate_projection_is_refused_naming_the_site(scratch_registry):
    """The 1/2 of ``act(gate) * up`` declared on gate_proj instead of up_proj: every global check is green
    (CP makes the gate a constant, nothing else is exact under AttnLRP); the site check refuses it in both
    modes, naming each layer's product."""
    register_adapter(
        llama_like(
            ("llama",), "Llama", name="wrong llama", gated=(GatedProduct("mlp.act_fn", "mlp.gate_proj"),)
        )
    )
    report = hf_pelrp.check_adapter("llama", classes=[LlamaForCausalLM], raise_on_failure=False)
    failed = {r.name for r in report.failures}
    assert failed == {f"{SITE_CHECK} (attnlrp)", f"{SITE_CHECK} (cp)"}, str(report)
    detail = report.failures[0].detail
    for layer in (0, 1):
        assert f"model.layers.{layer}.mlp.act_fn * model.layers.{layer}.mlp.gate_proj" in detail
    assert "no module consumes act(gate) * up" in detail
    with pytest.raises(
        AdapterCheckError, match=r"model\.layers\.0\.mlp\.act_fn \* model\.layers\.0\.mlp\.gate_proj"
    ):
        hf_pelrp.check_adapter("llama", classes=[LlamaForCausalLM])


def _halve_gate_projection(model, config, store):
    return [(layer.mlp.gate_proj, OutputGradient(0.5)) for layer in model.model.layers]


def test_an_extra_half_on_the_gate_is_measured_against_the_uniform_rule(scratch_registry):
    """The right structure, but the gate side gets 1/4 of the product under AttnLRP (a 1/2 too many): the
    relevance reference, not only the structural probe, refuses it; CP (gate constant) cannot tell."""
    register_adapter(llama_like(("llama",), "Llama", name="gate 1/4", extra_rules=_halve_gate_projection))
    report = hf_pelrp.check_adapter("llama", classes=[LlamaForCausalLM], raise_on_failure=False)
    assert {r.name for r in report.failures} == {f"{SITE_CHECK} (attnlrp)"}, str(report)
    detail = report.failures[0].detail
    assert "model.layers.1.mlp.act_fn * model.layers.1.mlp.up_proj" in detail
    assert "R_gate = 0.25 R_product, the rule says 0.5" in detail


def test_a_norm_rule_that_keeps_the_scale_in_the_backward_is_refused(monkeypatch):
    """A surrogate that reproduces RMSNorm's output but differentiates its scale (not the identity rule) is
    refused at each norm by the explicit reference ``R_x = x w s R_y / y``."""
    from hf_pelrp.adapters import norms

    def not_detached(x, eps):
        x = x.to(torch.float64)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    monkeypatch.setattr(norms, "rms_norm_identity", not_detached)
    report = hf_pelrp.check_adapter("llama", classes=[LlamaForCausalLM], raise_on_failure=False)
    norm_failures = [r for r in report.failures if r.name.startswith("norm sites")]
    assert {r.name for r in norm_failures} == {
        "norm sites match the explicit float64 rule (attnlrp)",
        "norm sites match the explicit float64 rule (cp)",
    }
    assert "model.layers.0.input_layernorm (LlamaRMSNorm)" in norm_failures[0].detail
    assert "model.norm (LlamaRMSNorm)" in norm_failures[0].detail


def test_a_layer_norm_rule_that_keeps_the_scale_in_the_backward_is_refused(monkeypatch):
    """The same for LayerNorm (GPT-2): the explicit reference ``R_x[i] = x[i] s (w[i] r[i] - mean_j w[j] r[j])``
    refuses a surrogate whose standard deviation is differentiated, at each LayerNorm."""
    from transformers import GPT2LMHeadModel

    from hf_pelrp.adapters import norms

    def not_detached(x, weight, bias, eps):
        centred = x - x.mean(-1, keepdim=True)
        return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight + bias

    monkeypatch.setattr(norms, "layer_norm_identity", not_detached)
    report = hf_pelrp.check_adapter("gpt2", classes=[GPT2LMHeadModel], raise_on_failure=False)
    norm_failures = [r for r in report.failures if r.name.startswith("norm sites")]
    assert len(norm_failures) == 2, str(report)
    for layer_norm in ("transformer.h.0.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"):
        assert f"{layer_norm} (LayerNorm)" in norm_failures[0].detail


def test_a_norm_surrogate_without_reference_is_reported_as_skipped(scratch_registry):
    """A user's own surrogate has no explicit reference here: the report says so instead of claiming it."""
    from hf_pelrp.adapters.norms import rms_norm

    def my_rms_norm(module, x):
        return rms_norm(module, x)

    register_adapter(llama_like(("llama",), "Llama", name="own", norms={"LlamaRMSNorm": my_rms_norm}))
    report = hf_pelrp.check_adapter("llama", classes=[LlamaForCausalLM])
    norms = [r for r in report.results if r.name.startswith("norm sites")]
    assert norms and all(
        r.detail == "5 sites; skipped: no explicit reference for surrogate my_rms_norm" for r in norms
    )


def test_every_failure_is_reported_not_only_the_first(monkeypatch):
    """A property that raises is recorded as a failure, and the properties after it still run."""

    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(_Checker, "conservation", broken)
    monkeypatch.setattr(_Checker, "position_relevance", broken)
    report = hf_pelrp.check_adapter("llama", classes=[LlamaForCausalLM], raise_on_failure=False)
    assert _failures(report) == {
        ("bias-free CP conservation runs", "RuntimeError: boom"),
        ("position relevance runs", "RuntimeError: boom"),
    }
    names = [r.name for r in report.results]
    assert any(n.startswith("batch invariance") for n in names)
    assert any(n.startswith(SITE_CHECK) for n in names)
    assert names[-1].startswith("model restored exactly")


def test_a_mode_that_raises_does_not_hide_the_other_mode(monkeypatch):
    """Inside a property too: the AttnLRP site check and left padding raise; the CP site check and right
    padding still run and are reported."""
    from hf_pelrp import check_sites as sites_module

    real_sites, real_pad = sites_module.check_sites, _Checker.pad

    def sites(model, adapter, inputs, mode, tol, seed):
        if mode == "attnlrp":
            raise RuntimeError("attnlrp broken")
        return real_sites(model, adapter, inputs, mode, tol, seed)

    def pad(self, inputs, row, keep, side):
        if side == "left":
            raise RuntimeError("left broken")
        return real_pad(self, inputs, row, keep, side)

    monkeypatch.setattr(sites_module, "check_sites", sites)
    monkeypatch.setattr(_Checker, "pad", pad)
    report = hf_pelrp.check_adapter("llama", classes=[LlamaForCausalLM], raise_on_failure=False)
    assert _failures(report) == {
        ("rule sites (attnlrp) runs", "RuntimeError: attnlrp broken"),
        ("padding and batch invariance (attnlrp, left padding) runs", "RuntimeError: left broken"),
        ("padding and batch invariance (cp, left padding) runs", "RuntimeError: left broken"),
    }
    passed = {r.name for r in report.results if r.passed}
    assert f"{SITE_CHECK} (cp)" in passed
    assert {"batch invariance (attnlrp, right padding)", "batch invariance (cp, right padding)"} <= passed


def test_the_right_declarations_pass_the_site_checks():
    """LLaMA (separate gate / up) and Phi-3 (fused gate_up_proj, up = second half): every site in both modes."""
    for model_type in ("llama", "phi3"):
        report = hf_pelrp.check_adapter(model_type)
        sites = [r for r in report.results if "explicit float64 rule" in r.name]
        assert {r.name.rsplit(" (", 1)[1] for r in sites} == {"attnlrp)", "cp)"}
        assert all(r.passed and not r.detail.startswith("0 ") for r in sites)
