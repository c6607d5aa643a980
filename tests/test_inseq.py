"""hf_pelrp.inseq: the "pelrp" Inseq method gives hf_pelrp's numbers through Inseq's generation loop and outputs.

Needs the ``inseq`` extra (inseq 0.7.x); without it every test that uses Inseq is skipped.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

import hf_pelrp
from conftest import tiny_llama_family, tiny_word_tokenizer
from hf_pelrp import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("single_thread")
needs_inseq = pytest.mark.skipif(
    find_spec("inseq") is None, reason='inseq is not installed (pip install "hf_pelrp[inseq]")'
)
PROMPT = "w1 w2 w3 w4"
GREEDY = {"max_new_tokens": 3, "do_sample": False}


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, pad_token_id=0, bos_token_id=2)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


MODELS = {"llama": tiny_llama_family, "gpt2": tiny_gpt2}


def load(model, tokenizer=None, **options):
    import inseq

    import hf_pelrp.inseq  # noqa: F401  (registers "pelrp")

    return inseq.load_model(model, "pelrp", tokenizer=tokenizer or tiny_word_tokenizer(), **options)


def ids_of(sequence) -> torch.Tensor:
    return torch.tensor([[t.id for t in sequence.target]])


def test_plain_import_registers_nothing():
    code = "import sys, hf_pelrp; assert 'hf_pelrp.inseq' not in sys.modules and 'inseq' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(Path(hf_pelrp.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@needs_inseq
def test_registered_on_import():
    import inseq

    import hf_pelrp.inseq

    assert "pelrp" in inseq.list_feature_attribution_methods()
    assert inseq.attr.FeatureAttribution.available_classes()["pelrp"] is hf_pelrp.inseq.PELRPAttribution


@needs_inseq
@pytest.mark.parametrize("family", sorted(MODELS))
def test_generation_matches_attribute(family):
    """Each generated token's row equals hf_pelrp.attribute on its prefix with it as the target."""
    model = MODELS[family]()
    out = load(model).attribute(
        PROMPT,
        generation_args=GREEDY,
        show_progress=False,
        step_scores=["logit"],
        return_convergence_delta=True,
    )
    seq = out.sequence_attributions[0]
    from hf_pelrp.inseq import PELRPSequenceOutput

    assert isinstance(seq, PELRPSequenceOutput)
    ids = ids_of(seq)
    prompt_len = ids.shape[1] - GREEDY["max_new_tokens"]
    assert seq.target_attributions.shape == (ids.shape[1], GREEDY["max_new_tokens"], 2)
    for step in range(GREEDY["max_new_tokens"]):
        end = prompt_len + step
        ref = hf_pelrp.attribute(model, ids[:, :end], target=ids[:, end])
        got = seq.target_attributions[:end, step]
        torch.testing.assert_close(got[:, 0], ref.token[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[:, 1], ref.position[0], rtol=0, atol=1e-6)
        assert torch.isnan(
            seq.target_attributions[end:, step]
        ).all()  # Inseq's marker for "not yet generated"
        # the default attributed function is the logit, and the deltas are the conservation gap
        torch.testing.assert_close(seq.step_scores["logit"][step], ref.target_value[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(
            seq.step_scores["deltas"][step], ref.conservation_gap[0], rtol=0, atol=1e-5
        )


@needs_inseq
def test_left_padded_batch_matches_rows_alone():
    """Prompts of different lengths generate as a left-padded batch; positions count real tokens only."""
    model = tiny_llama_family()
    out = load(model).attribute(["w1 w2 w3 w4 w5 w6", "w7 w8"], generation_args=GREEDY, show_progress=False)
    for seq in out.sequence_attributions:
        ids = ids_of(seq)
        gen = hf_pelrp.attribute(model, ids[:, :-3], continuation_ids=ids[0, -3:])
        torch.testing.assert_close(
            seq.target_attributions[..., 0].T.nan_to_num(), gen.token, rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            seq.target_attributions[..., 1].T.nan_to_num(), gen.position, rtol=0, atol=1e-6
        )


@needs_inseq
def test_options_at_load_and_per_call():
    model = tiny_llama_family()
    ids = None
    for options, call in [({"mode": "cp"}, {}), ({}, {"positional": False})]:
        out = load(model, **options).attribute(PROMPT, generation_args=GREEDY, show_progress=False, **call)
        seq = out.sequence_attributions[0]
        ids = ids_of(seq) if ids is None else ids
        # rotary positions get exactly 0 in CP mode, and with positional=False
        assert torch.equal(seq.target_attributions[..., 1].nan_to_num(), torch.zeros(ids.shape[1], 3))
        ref = hf_pelrp.attribute(model, ids[:, :-3], continuation_ids=ids[0, -3:], **options, **call)
        torch.testing.assert_close(
            seq.target_attributions[..., 0].T.nan_to_num(), ref.token, rtol=0, atol=1e-6
        )


@needs_inseq
def test_other_attributed_functions_use_the_same_rules():
    """attributed_fn="probability": the backward pass starts at the softmax probability of the target."""
    model = tiny_llama_family()
    out = load(model).attribute(
        PROMPT,
        generation_args={"max_new_tokens": 1, "do_sample": False},
        attributed_fn="probability",
        show_progress=False,
        return_convergence_delta=True,
    )
    seq = out.sequence_attributions[0]
    ids = ids_of(seq)
    with hf_pelrp.lrp(model) as ctx, torch.enable_grad():
        prob = model(ids[:, :-1]).logits[0, -1].softmax(-1)[ids[0, -1]]
        prob.backward()
        maps = ctx.maps()
    torch.testing.assert_close(seq.target_attributions[:-1, 0, 0], maps["token"][0], rtol=0, atol=1e-7)
    torch.testing.assert_close(seq.target_attributions[:-1, 0, 1], maps["position"][0], rtol=0, atol=1e-7)
    gap = prob.detach() - maps["token"].sum() - maps["position"].sum()
    torch.testing.assert_close(seq.step_scores["deltas"][0], gap, rtol=0, atol=1e-6)


@needs_inseq
def test_show_aggregate_save_and_load(tmp_path):
    import inseq
    from inseq.data.aggregation_functions import DEFAULT_ATTRIBUTION_AGGREGATE_DICT

    defaults = copy.deepcopy(DEFAULT_ATTRIBUTION_AGGREGATE_DICT)
    model = tiny_llama_family()
    out = load(model).attribute(PROMPT, generation_args=GREEDY, show_progress=False)
    seq = out.sequence_attributions[0]
    raw = seq.target_attributions
    total = seq.aggregate(normalize=False).target_attributions  # default: sum of the two parts
    torch.testing.assert_close(total, raw.sum(-1), equal_nan=True)
    position = seq.aggregate(select_idx=1, normalize=False).target_attributions
    torch.testing.assert_close(position, raw[..., 1], equal_nan=True)
    assert "<html>" in out.show(display=False, return_html=True)
    assert "<html>" in out.show(display=False, return_html=True, select_idx=0)
    # building and aggregating PE-LRP outputs leaves Inseq's module-level defaults alone
    assert defaults == DEFAULT_ATTRIBUTION_AGGREGATE_DICT
    out.save(tmp_path / "out.json")
    back = inseq.FeatureAttributionOutput.load(tmp_path / "out.json")
    assert type(back.sequence_attributions[0]) is type(seq)
    torch.testing.assert_close(back.sequence_attributions[0].target_attributions, raw, equal_nan=True)


@needs_inseq
def test_default_attributed_fn_is_restored_on_unhook():
    model = load(tiny_llama_family())
    assert model.default_attributed_fn_id == "logit"
    model.attribution_method.unhook()
    assert model.default_attributed_fn_id == "probability"
    model.attribution_method.hook()
    assert model.default_attributed_fn_id == "logit"


@needs_inseq
def test_refusals():
    from transformers import MambaConfig, MambaForCausalLM

    # a state-space model: no attention, no adapter
    config = MambaConfig(
        vocab_size=101, hidden_size=16, num_hidden_layers=1, state_size=4, intermediate_size=32
    )
    with pytest.raises(UnsupportedModelError, match="mamba"):
        load(MambaForCausalLM(config).eval())


@needs_inseq
def test_contrastive_attribution_is_a_foil():
    """Inseq's contrast_logits_diff with a contrast target sharing the prefix is hf_pelrp's foil= explanation."""
    model = tiny_llama_family()
    inseq_model = load(model)
    out = inseq_model.attribute(
        PROMPT,
        PROMPT + " w9",
        attributed_fn="contrast_logits_diff",
        contrast_targets=PROMPT + " w11",
        show_progress=False,
        return_convergence_delta=True,
    )
    seq = out.sequence_attributions[0]
    tokenizer = tiny_word_tokenizer()
    ids = tokenizer(PROMPT + " w9", return_tensors="pt").input_ids  # Inseq marks the target "w9 → w11", id -1
    foil = tokenizer.convert_tokens_to_ids("w11")
    ref = hf_pelrp.attribute(model, ids[:, :-1], target=ids[:, -1], foil=foil)
    torch.testing.assert_close(seq.target_attributions[:-1, 0, 0], ref.token[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(seq.target_attributions[:-1, 0, 1], ref.position[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(seq.step_scores["deltas"][0], ref.conservation_gap[0], rtol=0, atol=1e-5)
    # forcing the contrast inputs runs the model twice per step: refused, not silently wrong
    with pytest.raises(hf_pelrp.AttributionStateError, match="model 2 times"):
        inseq_model.attribute(
            PROMPT,
            PROMPT + " w9",
            attributed_fn="contrast_logits_diff",
            contrast_targets="w5 w6 w7 w8 w11",
            contrast_force_inputs=True,
            show_progress=False,
        )


@needs_inseq
@pytest.mark.slow
def test_smollm2_readme_example():
    """The README example: SmolLM2-135M-Instruct continues "The capital of France is" with " Paris"."""
    from hf_pelrp.assets import load_smollm2

    model, tokenizer = load_smollm2()
    out = load(model, tokenizer).attribute(
        "The capital of France is",
        generation_args={"max_new_tokens": 2, "do_sample": False},
        show_progress=False,
        return_convergence_delta=True,
    )
    seq = out.sequence_attributions[0]
    ids = ids_of(seq)
    assert tokenizer.decode(ids[0, -2]) == " Paris"
    gen = hf_pelrp.attribute(model, ids[:, :-2], continuation_ids=ids[0, -2:])
    torch.testing.assert_close(seq.target_attributions[..., 0].T.nan_to_num(), gen.token, rtol=0, atol=1e-4)
    torch.testing.assert_close(
        seq.target_attributions[..., 1].T.nan_to_num(), gen.position, rtol=0, atol=1e-4
    )
    torch.testing.assert_close(seq.step_scores["deltas"], gen.conservation_gap, rtol=0, atol=1e-3)
