"""Attribution.save / Attribution.load: safetensors + JSON metadata, exact round trips, clear errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hf_pelrp
from conftest import tiny_llama_family
from hf_pelrp import Attribution, AttributionFileError
from hf_pelrp.io import FORMAT_VERSION, METADATA_KEY, _digest


def _equal(a: Attribution, b: Attribution) -> None:
    for name in (
        "token",
        "position",
        "target",
        "target_value",
        "position_by_layer",
        "segment",
        "position_index",
        "input_ids",
        "attention_mask",
    ):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None, name
            continue
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
    assert (a.mode, a.positional, a.model_type, a.gamma) == (b.mode, b.positional, b.model_type, b.gamma)
    assert a.extras.keys() == b.extras.keys()
    for key, value in a.extras.items():
        other = b.extras[key]
        if isinstance(value, torch.Tensor):
            assert (
                isinstance(other, torch.Tensor) and other.dtype == value.dtype and torch.equal(value, other)
            ), key
        elif isinstance(value, np.ndarray):
            assert (
                isinstance(other, np.ndarray) and other.dtype == value.dtype and np.array_equal(value, other)
            ), key
        else:
            assert other == value, key


@pytest.fixture(scope="module")
def llama_attr():
    model = tiny_llama_family("llama")
    torch.manual_seed(2)
    ids = torch.randint(1, 101, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    attr = hf_pelrp.attribute(model, input_ids=ids, attention_mask=mask, mode="cp")
    attr.extras.update(
        {
            "foil": torch.tensor([5, 6]),
            "note": {"prompt": "The capital of </script> France", "k": [1, 2.5, None]},
            "tokens": [["a"] * 7, ["b"] * 7],
            "grid": np.arange(6, dtype=np.int16).reshape(2, 3),
            "half": torch.randn(2, 3).to(torch.bfloat16),
        }
    )
    return attr


def test_round_trip_is_exact(llama_attr, tmp_path):
    path = llama_attr.save(tmp_path / "attr.safetensors")
    loaded = Attribution.load(path)
    _equal(llama_attr, loaded)
    assert loaded.position_by_layer is not None and loaded.mode == "cp"
    torch.testing.assert_close(loaded.conservation_gap, llama_attr.conservation_gap, rtol=0, atol=0)
    # slicing and display still work on the loaded result; per-row extras are sliced with the rows
    row = loaded[1]
    assert row.token.shape == (1, 7)
    assert torch.equal(row.extras["foil"], torch.tensor([6]))
    assert np.array_equal(row.extras["grid"], np.array([[3, 4, 5]], dtype=np.int16))
    assert row.extras["note"] == llama_attr.extras["note"]  # not per-row: shared


def test_round_trip_of_a_hand_built_attribution_with_segments(tmp_path):
    attr = Attribution(
        token=torch.randn(1, 4),
        position=torch.randn(1, 4),
        segment=torch.randn(1, 4),
        target=torch.tensor([1]),
        target_value=torch.tensor([0.75]),
        model_type="bert",
        positional=False,
        gamma={"gamma_linear": 0.25},
        extras={"patch_map": torch.randn(1, 2, 2)},
    )
    _equal(attr, Attribution.load(attr.save(tmp_path / "a.st")))


def test_loading_never_unpickles(llama_attr, tmp_path, monkeypatch):
    path = llama_attr.save(tmp_path / "attr.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    _equal(llama_attr, Attribution.load(path))


def test_unsaveable_extras_are_refused(tmp_path):
    attr = Attribution(
        token=torch.ones(1, 2),
        position=torch.zeros(1, 2),
        target=torch.tensor([0]),
        target_value=torch.tensor([1.0]),
        extras={"model": torch.nn.Linear(2, 2)},
    )
    with pytest.raises(AttributionFileError, match=r"extras\['model'\] holds a Linear"):
        attr.save(tmp_path / "x.st")
    bad = Attribution(
        token=torch.ones(1, 2),
        position=torch.zeros(1, 3),
        target=torch.tensor([0]),
        target_value=torch.tensor([1.0]),
    )
    with pytest.raises(AttributionFileError, match="T is 2 in 'token' but 3 in 'position'"):
        bad.save(tmp_path / "y.st")


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _rewrite(path, meta=None, tensors=None, raw_meta=None):
    """Write a tampered copy: changed metadata JSON (dict or raw string) and/or changed tensors."""
    header, stored = _read(path)
    doc = json.loads(header[METADATA_KEY])
    if meta is not None:
        meta(doc)
    stored = tensors(stored) if tensors is not None else stored
    out = path.with_name("tampered.safetensors")
    save_file(
        stored, str(out), metadata={METADATA_KEY: raw_meta if raw_meta is not None else json.dumps(doc)}
    )
    return out


@pytest.fixture
def saved(llama_attr, tmp_path):
    return llama_attr.save(tmp_path / "attr.safetensors")


def test_bad_json_is_refused(saved):
    with pytest.raises(AttributionFileError, match="not valid JSON"):
        Attribution.load(_rewrite(saved, raw_meta='{"format": "hf_pelrp.attribution", '))


@pytest.mark.parametrize(
    ("version", "message"), [(FORMAT_VERSION + 1, "newer hf_pelrp"), (0, "damaged"), ("1", "damaged")]
)
def test_wrong_format_version_is_refused(saved, version, message):
    def change(doc):
        doc["format_version"] = version

    with pytest.raises(AttributionFileError, match=f"unsupported format version.*{message}"):
        Attribution.load(_rewrite(saved, meta=change))


def test_missing_tensor_is_refused(saved):
    def drop(tensors):
        return {k: v for k, v in tensors.items() if k != "fields/position"}

    with pytest.raises(AttributionFileError, match=r"missing from the file: \['fields/position'\]"):
        Attribution.load(_rewrite(saved, tensors=drop))


def test_undeclared_tensor_is_refused(saved):
    def add(tensors):
        return {**tensors, "fields/sneaky": torch.zeros(1)}

    with pytest.raises(AttributionFileError, match="does not declare"):
        Attribution.load(_rewrite(saved, tensors=add))


def test_shape_not_matching_its_declaration_is_refused(saved):
    def shrink(tensors):
        return {**tensors, "fields/token": tensors["fields/token"][:, :5].clone()}

    with pytest.raises(AttributionFileError, match="'fields/token' has shape \\[2, 5\\], but the metadata"):
        Attribution.load(_rewrite(saved, tensors=shrink))


def test_shapes_that_do_not_fit_together_are_refused(saved):
    def shrink(tensors):
        return {**tensors, "fields/position": tensors["fields/position"][:, :5].clone()}

    def declare(doc):
        doc["tensors"]["fields/position"]["shape"] = [2, 5]

    with pytest.raises(AttributionFileError, match="T is 7 in 'token' but 5 in 'position'"):
        Attribution.load(_rewrite(saved, meta=declare, tensors=shrink))


def test_edited_values_are_refused(saved):
    def edit(tensors):
        token = tensors["fields/token"].clone()
        token[0, 0] += 1.0
        return {**tensors, "fields/token": token}

    with pytest.raises(AttributionFileError, match="SHA-256"):
        Attribution.load(_rewrite(saved, tensors=edit))


def test_edited_values_with_a_recomputed_digest_still_load(saved):
    # the digest is an integrity check against accidents and naive edits, not a signature: document that
    def edit(tensors):
        token = tensors["fields/token"].clone()
        token[0, 0] += 1.0
        return {**tensors, "fields/token": token}

    header, stored = _read(saved)
    edited = edit(stored)

    def redigest(doc):
        doc["sha256"] = _digest(edited, doc)

    loaded = Attribution.load(_rewrite(saved, meta=redigest, tensors=lambda _: edited))
    assert torch.equal(loaded.token, edited["fields/token"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="something.else"), "format is 'something.else'"),
        (lambda d: d["fields"].update(mode="fast"), "mode 'fast' is not one of"),
        (lambda d: d["fields"].update(positional="yes"), "'positional' must be true or false"),
        (lambda d: d["fields"].update(colour="red"), r"fields \['colour'\] are unknown"),
        (lambda d: d.pop("tensors"), "'tensors' is missing"),
        (lambda d: d["extras"]["tensors"].update(foil="pickle"), "unknown kind 'pickle'"),
    ],
)
def test_tampered_metadata_is_refused(saved, change, message):
    with pytest.raises(AttributionFileError, match=message):
        Attribution.load(_rewrite(saved, meta=change))


@pytest.mark.parametrize("keep", [0.5, 0.98, 12, 4])
def test_truncated_file_is_refused(saved, keep):
    data = saved.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep
    saved.write_bytes(data[:size])
    with pytest.raises(AttributionFileError, match="truncated or corrupted"):
        Attribution.load(saved)


def test_other_files_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(AttributionFileError, match="not an hf_pelrp attribution"):
        Attribution.load(plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a tensor file")
    with pytest.raises(AttributionFileError, match="not a readable safetensors file"):
        Attribution.load(text)
    with pytest.raises(FileNotFoundError):
        Attribution.load(tmp_path / "missing.safetensors")


def test_to_moves_every_tensor_and_refuses_a_dtype(llama_attr):
    moved = llama_attr.to("cpu")
    _equal(llama_attr, moved)
    assert moved is not llama_attr and moved.extras is not llama_attr.extras
    assert moved.target.dtype == torch.long and moved.extras["note"] == llama_attr.extras["note"]
    with pytest.raises((TypeError, RuntimeError)):
        llama_attr.to(torch.float64)


def test_edited_metadata_is_refused(saved):
    # an edit of a JSON field (the rules that made the maps) is caught by the digest, like an edit of a tensor
    with pytest.raises(AttributionFileError, match="SHA-256"):
        Attribution.load(_rewrite(saved, meta=lambda d: d["fields"].update(mode="attnlrp")))
    with pytest.raises(AttributionFileError, match="SHA-256"):
        Attribution.load(_rewrite(saved, meta=lambda d: d["extras"]["values"]["note"].update(k=[0])))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["fields"].update(model_type=3), "'model_type' must be a string"),
        (lambda d: d["fields"].update(gamma={"gamma_linear": "big"}), "'gamma' must map"),
        (lambda d: d["fields"].update(labels={"x": "cat"}), "'labels' must map ids to strings"),
        (lambda d: d["fields"].update(tokens=[["a"] * 7]), "'tokens' must be one list of strings per row"),
        (lambda d: d["fields"].update(tokens=[["a"] * 7, ["b"] * 6]), "'tokens' must be one list"),
        (lambda d: d["fields"].update(tokens="abc"), "'tokens' must be one list"),
    ],
)
def test_field_types_are_validated(saved, change, message):
    with pytest.raises(AttributionFileError, match=message):
        Attribution.load(_rewrite(saved, meta=change))


def test_tokens_labels_and_special_mask_round_trip(llama_attr, tmp_path):
    attr = llama_attr.replace(
        tokens=[[f"t{i}" for i in range(7)], [" x"] * 7],
        labels={5: " Paris", 17: "<b>"},
        special_tokens_mask=torch.zeros(2, 7, dtype=torch.bool),
    )
    loaded = Attribution.load(attr.save(tmp_path / "labelled.safetensors"))
    assert loaded.tokens == attr.tokens and loaded.labels == {5: " Paris", 17: "<b>"}
    assert torch.equal(loaded.special_tokens_mask, attr.special_tokens_mask)
    assert loaded[1].tokens == [[" x"] * 7] and loaded.label_of(5) == " Paris"
