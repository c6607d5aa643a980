"""Loading models ready for attribution: the "lrp" attention by name, hf_pelrp.from_pretrained, clean saving."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp import LRPConfig, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.tensor([[5, 17, 3, 42, 8, 99, 23]])


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama_family().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain(lm_dir):
    return AutoModelForCausalLM.from_pretrained(lm_dir).eval()


def test_attn_implementation_lrp_by_name(lm_dir, plain):
    model = AutoModelForCausalLM.from_pretrained(lm_dir, attn_implementation="lrp")
    assert model.config._attn_implementation == "lrp"
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain(IDS).logits)
    a, b = hf_pelrp.attribute(model, IDS), hf_pelrp.attribute(plain, IDS)
    assert torch.equal(a.target, b.target)
    torch.testing.assert_close(a.relevance, b.relevance)
    # generation with a KV cache runs through the "lrp" attention too
    with torch.no_grad():
        out_lrp = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
        out_plain = plain.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out_lrp, out_plain)


def test_from_pretrained_stores_default_rules(lm_dir, plain):
    model = hf_pelrp.from_pretrained(AutoModelForCausalLM, lm_dir, mode="cp", positional=False)
    assert model.config._attn_implementation == "lrp"
    assert hf_pelrp.default_config(model) == LRPConfig(mode="cp", positional=False)
    assert hf_pelrp.default_config(plain) == LRPConfig()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, plain(IDS).logits)
    attr = hf_pelrp.attribute(model, IDS)
    assert attr.mode == "cp" and attr.positional is False
    torch.testing.assert_close(
        attr.relevance, hf_pelrp.attribute(plain, IDS, mode="cp", positional=False).relevance
    )
    # explicit arguments win over the stored defaults, field by field
    override = hf_pelrp.attribute(model, IDS, positional=True)
    assert override.mode == "cp" and override.positional is True
    assert hf_pelrp.attribute(model, IDS, config=LRPConfig()).mode == "attnlrp"
    with hf_pelrp.lrp(model) as ctx:
        assert ctx.config == LRPConfig(mode="cp", positional=False)
    # the defaults belong to this instance only
    assert hf_pelrp.attribute(plain, IDS).mode == "attnlrp"


def test_from_pretrained_other_heads_and_kwargs(tmp_path):
    tiny_llama_family(head="sequence_classification").save_pretrained(tmp_path)
    model = hf_pelrp.from_pretrained(
        AutoModelForSequenceClassification,
        tmp_path,
        mode="cp",
        dtype=torch.float32,
        attn_implementation="eager",
    )
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config._attn_implementation == "eager"  # an explicit choice is kept
    assert hf_pelrp.attribute(model, IDS).mode == "cp"
    assert model.config._attn_implementation == "eager"  # and restored after attribution
    with pytest.raises(TypeError, match="from_pretrained"):
        hf_pelrp.from_pretrained("AutoModel", tmp_path)


def test_enable_attribution_on_a_loaded_model():
    model = tiny_llama_family()
    assert hf_pelrp.enable_attribution(model, mode="cp") is model
    assert model.config._attn_implementation == "lrp"
    assert hf_pelrp.attribute(model, IDS).mode == "cp"
    with pytest.raises(ValueError, match="mode"):
        hf_pelrp.enable_attribution(model, mode="nonsense")


def test_unsupported_model_type_fails_at_load(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    assert "mamba" not in hf_pelrp.supported_model_types()
    config = MambaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=4, intermediate_size=32
    )
    MambaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'mamba'.*not supported"):
        hf_pelrp.from_pretrained(AutoModelForCausalLM, tmp_path)


def test_saved_model_loads_without_hf_pelrp(lm_dir, plain, tmp_path):
    model = hf_pelrp.from_pretrained(AutoModelForCausalLM, lm_dir, mode="cp")
    hf_pelrp.attribute(model, IDS)  # used for attribution before saving
    model.save_pretrained(tmp_path / "saved")
    config_text = (tmp_path / "saved" / "config.json").read_text()
    config = json.loads(config_text)
    assert "lrp" not in json.dumps(config.get("_attn_implementation", "")) and "hf_pelrp" not in config_text
    assert not any("attn_implementation" in key for key in config)
    with torch.no_grad():
        expected = plain(IDS).logits[0].numpy()
    np.save(tmp_path / "ids.npy", IDS.numpy())
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_pelrp"] = None  # any import of hf_pelrp now fails
        import numpy as np, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "saved")!r}).eval()
        assert model.config._attn_implementation != "lrp", model.config._attn_implementation
        ids = torch.from_numpy(np.load({str(tmp_path / "ids.npy")!r}))
        with torch.no_grad():
            np.save({str(tmp_path / "logits.npy")!r}, model(ids).logits[0].numpy())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-6)
