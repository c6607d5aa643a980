"""Attributions that last: :func:`save_attribution` and the reader behind :func:`hf_pelrp.load_attribution`, one safetensors file.

The tensors (every tensor field of the result and every tensor in ``extras``) are stored as safetensors;
everything else (the result class, mode, model type, token strings, labels, JSON-serialisable extras, the
declared shape and dtype of each tensor, a SHA-256 over the tensor bytes *and* the metadata) is one JSON
document in the file's header metadata. The result class is kept: a :class:`~hf_pelrp.Seq2SeqAttribution`
loads as one (its target-prefix maps count in ``conservation_gap``), a :class:`~hf_pelrp.GenerationAttribution`
(no ``extras``, one ``input_ids`` row) as one. Nothing is pickled, so loading a file cannot run code. Loading checks
the format name and version, the JSON, the type of every field, that the tensors are exactly the declared ones
with the declared shapes, that the shapes fit together, and the digest; anything else raises
:class:`~hf_pelrp.errors.AttributionFileError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MODES
from .errors import AttributionFileError
from .version import package_version

FORMAT_NAME = "hf_pelrp.attribution"
#: version 1: fields/<name> and extras/<key> tensors, JSON under the "hf_pelrp" metadata key, digest of the
#: tensors; version 2: the digest covers the JSON fields and extras too (an edited "mode" is detected);
#: version 3: the result class is stored (metadata "class", covered by the digest)
FORMAT_VERSION = 3
_READABLE_VERSIONS = (1, 2, 3)
#: the result classes a file can hold (names in hf_pelrp.result)
_RESULT_CLASSES = ("Attribution", "Seq2SeqAttribution", "GenerationAttribution")
METADATA_KEY = "hf_pelrp"
_FIELD_PREFIX = "fields/"
_EXTRA_PREFIX = "extras/"

#: expected shape of each known tensor field, in terms of B (batch), T (sequence) and L (layers)
_FIELD_SHAPES = {
    "token": ("B", "T"),
    "position": ("B", "T"),
    "target": ("B",),
    "target_value": ("B",),
    "position_by_layer": ("B", "L", "T"),
    "segment": ("B", "T"),
    "position_index": ("B",),
    "input_ids": ("B", "T"),
    "attention_mask": ("B", "T"),
    "foil": ("B",),
    "special_tokens_mask": ("B", "T"),
}
#: the same for a GenerationAttribution: R rows (S continuation tokens, or 1 with span_reduce), T positions of
#: the one input_ids row (prompt + continuation)
_GENERATION_SHAPES = {
    "token": ("R", "T"),
    "position": ("R", "T"),
    "target": ("S",),
    "target_value": ("R",),
    "position_by_layer": ("R", "L", "T"),
    "segment": ("R", "T"),
    "foil": ("S",),
    "input_ids": ("T",),
    "special_tokens_mask": ("T",),
}


def _shapes_of(class_name: str) -> dict[str, tuple[str, ...]]:
    return _GENERATION_SHAPES if class_name == "GenerationAttribution" else _FIELD_SHAPES


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors and, from format version 2 on, over the
    JSON ``fields`` and ``extras`` of ``meta`` (detects edited or swapped data and edited metadata)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if meta is not None:
        described = {"fields": meta.get("fields"), "extras": meta.get("extras")}
        version = meta.get("format_version")
        if isinstance(version, int) and version >= 3:
            described["class"] = meta.get("class")
        h.update(json.dumps(described, sort_keys=True, allow_nan=False).encode())
    return h.hexdigest()


def _check_shapes(shapes: dict[str, list[int]], where: str, class_name: str = "Attribution") -> None:
    """The known fields must agree on B, T and L (e.g. ``position`` has the shape of ``token``)."""
    sizes: dict[str, tuple[int, str]] = {}
    for field, dims in _shapes_of(class_name).items():
        if field not in shapes:
            continue
        shape = shapes[field]
        if len(shape) != len(dims):
            raise AttributionFileError(
                f"{where}: field {field!r} has shape {shape}, expected {len(dims)} dimensions {list(dims)}"
            )
        for dim, size in zip(dims, shape, strict=True):
            if dim in sizes and sizes[dim][0] != size:
                first, origin = sizes[dim]
                raise AttributionFileError(
                    f"{where}: shapes do not fit together: {dim} is {first} in {origin!r} but {size} in {field!r}"
                )
            sizes.setdefault(dim, (size, field))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def save_attribution(attr: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``attr`` to ``path`` (safetensors + JSON metadata); returns the path.

    Tensors are saved as they are (dtype kept, moved to CPU). ``extras`` may hold tensors, numpy arrays
    (restored as numpy arrays) and JSON-serialisable values.

    Raises
    ------
    AttributionFileError
        An extra (or a non-tensor field) cannot be stored without pickling.
    """
    class_name = type(attr).__name__
    if class_name not in _RESULT_CLASSES or not dataclasses.is_dataclass(attr):
        raise AttributionFileError(
            f"save_attribution saves {', '.join(_RESULT_CLASSES)} results, got a {class_name}"
        )
    tensors: dict[str, torch.Tensor] = {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(attr):
        if f.name == "extras":
            continue
        value = getattr(attr, f.name)
        if f.name == "labels":
            value = {str(int(k)): str(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor):
            tensors[_FIELD_PREFIX + f.name] = value.detach().cpu().clone()
        elif value is None or _jsonable(value):
            fields[f.name] = value
        else:
            raise AttributionFileError(
                f"field {f.name!r} holds a {type(value).__name__}, which cannot be saved without pickling"
            )
    extra_tensors: dict[str, str] = {}
    extra_values: dict[str, Any] = {}
    for key, value in getattr(attr, "extras", {}).items():  # a GenerationAttribution has no extras
        if not isinstance(key, str):
            raise AttributionFileError(f"extras keys must be strings to be saved, got {key!r}")
        if isinstance(value, torch.Tensor):
            tensors[_EXTRA_PREFIX + key] = value.detach().cpu().clone()
            extra_tensors[key] = "torch"
        elif isinstance(value, np.ndarray) and value.dtype != object:
            tensors[_EXTRA_PREFIX + key] = torch.from_numpy(np.ascontiguousarray(value).copy())
            extra_tensors[key] = "numpy"
        elif _jsonable(value):
            extra_values[key] = value
        else:
            raise AttributionFileError(
                f"extras[{key!r}] holds a {type(value).__name__}: only tensors, numpy arrays and JSON values "
                "(numbers, strings, lists, dicts) can be saved; convert it or drop it before saving"
            )
    shapes = {
        name.removeprefix(_FIELD_PREFIX): list(t.shape)
        for name, t in tensors.items()
        if name.startswith(_FIELD_PREFIX)
    }
    _check_shapes(shapes, "cannot save the attribution", class_name)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "class": class_name,
        "hf_pelrp_version": package_version(),
        "fields": fields,
        "extras": {"tensors": extra_tensors, "values": extra_values},
        "tensors": {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in tensors.items()
        },
    }
    _check_fields(
        fields,
        {n.removeprefix(_FIELD_PREFIX): list(t.shape) for n, t in tensors.items()},
        "cannot save",
        class_name,
    )
    meta["sha256"] = _digest(tensors, meta)
    path = Path(path)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta, allow_nan=False)})
    return path


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"no attribution file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as err:  # safetensors raises its own error type (and OSError) for broken files
        raise AttributionFileError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {err}"
        ) from err
    if METADATA_KEY not in header:
        raise AttributionFileError(
            f"{path} is a safetensors file but not an hf_pelrp attribution (no {METADATA_KEY!r} metadata); "
            "attributions are written by Attribution.save()"
        )
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise AttributionFileError(f"{path}: the attribution metadata is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise AttributionFileError(f"{path}: the attribution metadata must be a JSON object")
    return meta, tensors


def _validate(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise AttributionFileError(f"{where}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        hint = (
            "it was written by a newer hf_pelrp: upgrade hf_pelrp to read it"
            if isinstance(version, int) and version > FORMAT_VERSION
            else "the file is damaged or not written by hf_pelrp"
        )
        raise AttributionFileError(
            f"{where}: unsupported format version {version!r} (this hf_pelrp reads version {FORMAT_VERSION}); {hint}"
        )
    for key, kind in (("fields", dict), ("extras", dict), ("tensors", dict), ("sha256", str)):
        if not isinstance(meta.get(key), kind):
            raise AttributionFileError(f"{where}: metadata entry {key!r} is missing or not a {kind.__name__}")
    class_name = _saved_class(meta, where)
    extras = meta["extras"]
    if not isinstance(extras.get("tensors"), dict) or not isinstance(extras.get("values"), dict):
        raise AttributionFileError(
            f"{where}: metadata entry 'extras' must hold 'tensors' and 'values' objects"
        )
    declared = meta["tensors"]
    missing = sorted(set(declared) - set(tensors))
    unexpected = sorted(set(tensors) - set(declared))
    if missing:
        raise AttributionFileError(
            f"{where}: tensors declared in the metadata are missing from the file: {missing}"
        )
    if unexpected:
        raise AttributionFileError(
            f"{where}: the file holds tensors its metadata does not declare: {unexpected}"
        )
    for name, spec in declared.items():
        t = tensors[name]
        if not isinstance(spec, dict) or list(t.shape) != spec.get("shape"):
            raise AttributionFileError(
                f"{where}: tensor {name!r} has shape {list(t.shape)}, but the metadata declares {spec!r}"
            )
        if str(t.dtype).removeprefix("torch.") != spec.get("dtype"):
            raise AttributionFileError(
                f"{where}: tensor {name!r} has dtype {t.dtype}, but the metadata declares {spec.get('dtype')!r}"
            )
    for key, kind in extras["tensors"].items():
        if kind not in ("torch", "numpy"):
            raise AttributionFileError(f"{where}: extras tensor {key!r} has unknown kind {kind!r}")
        if _EXTRA_PREFIX + key not in tensors:
            raise AttributionFileError(f"{where}: extras tensor {key!r} is declared but not stored")
    stray = [n for n in tensors if not n.startswith((_FIELD_PREFIX, _EXTRA_PREFIX))]
    stray += [
        n
        for n in tensors
        if n.startswith(_EXTRA_PREFIX) and n.removeprefix(_EXTRA_PREFIX) not in extras["tensors"]
    ]
    if stray:
        raise AttributionFileError(f"{where}: tensors outside the format: {sorted(stray)}")
    shapes = {
        n.removeprefix(_FIELD_PREFIX): list(t.shape)
        for n, t in tensors.items()
        if n.startswith(_FIELD_PREFIX)
    }
    _check_shapes(shapes, where, class_name)
    fields = meta["fields"]
    doubled = sorted(n for n in fields if _FIELD_PREFIX + n in tensors)
    if doubled:
        raise AttributionFileError(f"{where}: fields {doubled} are stored both as JSON and as tensors")
    _check_fields(fields, shapes, where, class_name)
    expected = _digest(tensors, meta if version >= 2 else None)
    if expected != meta["sha256"]:
        raise AttributionFileError(
            f"{where}: the tensor data or the metadata does not match its SHA-256 digest (the file was modified)"
        )


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def _saved_class(meta: dict[str, Any], where: str) -> str:
    """The name of the result class a file holds. Files before format version 3 did not record it: only an
    :class:`Attribution` or a :class:`Seq2SeqAttribution` could be saved then, the latter recognised by its
    target-prefix maps (``extras["target_token"]``)."""
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        return "Attribution"  # _validate refuses the version with its own message
    if version >= 3:
        name = meta.get("class")
        if name not in _RESULT_CLASSES:
            raise AttributionFileError(
                f"{where}: metadata entry 'class' is {name!r}, not one of {_RESULT_CLASSES}"
            )
        return name
    extras = meta.get("extras")
    tensors = extras.get("tensors") if isinstance(extras, dict) else None
    return "Seq2SeqAttribution" if isinstance(tensors, dict) and "target_token" in tensors else "Attribution"


def _check_fields(
    fields: dict[str, Any], shapes: dict[str, list[int]], where: str, class_name: str = "Attribution"
) -> None:
    """Every JSON field has the type (and, for ``tokens``, the shape) the result class gives it."""
    if fields.get("mode") not in MODES:
        raise AttributionFileError(f"{where}: mode {fields.get('mode')!r} is not one of {MODES}")
    if not isinstance(fields.get("positional"), bool):
        raise AttributionFileError(
            f"{where}: 'positional' must be true or false, got {fields.get('positional')!r}"
        )
    if not isinstance(fields.get("model_type", ""), str):
        raise AttributionFileError(
            f"{where}: 'model_type' must be a string, got {fields.get('model_type')!r}"
        )
    gamma = fields.get("gamma", {})
    if not isinstance(gamma, dict) or not all(
        k in ("gamma_linear", "gamma_conv") and isinstance(v, int | float) and not isinstance(v, bool)
        for k, v in gamma.items()
    ):
        raise AttributionFileError(
            f"{where}: 'gamma' must map gamma_linear / gamma_conv to numbers, got {gamma!r}"
        )
    rules = fields.get("rules", {})
    if not isinstance(rules, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str | int | float | bool))
        for k, v in rules.items()
    ):
        raise AttributionFileError(f"{where}: 'rules' must map rule settings to plain values, got {rules!r}")
    labels = fields.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and k.lstrip("-").isdigit() and isinstance(v, str) for k, v in labels.items()
    ):
        raise AttributionFileError(f"{where}: 'labels' must map ids to strings, got {labels!r}")
    if class_name == "GenerationAttribution":
        _check_generation_fields(fields, shapes, where)
        return
    tokens = fields.get("tokens")
    if tokens is not None:
        token_shape = shapes.get("token")
        if (
            not isinstance(tokens, list)
            or not all(_is_str_list(row) for row in tokens)
            or (token_shape is not None and [len(tokens), *{len(r) for r in tokens}] != token_shape)
        ):
            raise AttributionFileError(
                f"{where}: 'tokens' must be one list of strings per row with one string per position "
                f"(shape {token_shape})"
            )


def _check_generation_fields(fields: dict[str, Any], shapes: dict[str, list[int]], where: str) -> None:
    """A :class:`GenerationAttribution`'s own fields: the prompt length, the span reduction, one token string
    per position, and rows that fit them."""
    length = (shapes.get("input_ids") or [0])[0]
    prompt = fields.get("prompt_length")
    if not isinstance(prompt, int) or isinstance(prompt, bool) or not 0 < prompt <= length:
        raise AttributionFileError(
            f"{where}: 'prompt_length' must be an integer in 1..{length} (the input_ids length), got {prompt!r}"
        )
    reduce = fields.get("span_reduce")
    if reduce not in (None, "sum"):
        raise AttributionFileError(f"{where}: 'span_reduce' must be null or 'sum', got {reduce!r}")
    steps = (shapes.get("target") or [0])[0]
    rows = (shapes.get("token") or [0])[0]
    if steps != length - prompt or rows != (1 if reduce else steps):
        raise AttributionFileError(
            f"{where}: {steps} targets and {rows} rows do not fit a continuation of {length - prompt} tokens "
            f"(span_reduce={reduce!r})"
        )
    tokens = fields.get("tokens")
    if tokens is not None and (not _is_str_list(tokens) or len(tokens) != length):
        raise AttributionFileError(f"{where}: 'tokens' must be a list of {length} strings, one per position")


def read_attribution(
    path: str | os.PathLike[str], accepted: tuple[type, ...], device: str | torch.device = "cpu"
) -> Any:
    """Read a file written by :func:`save_attribution` as the class it was saved from, which must be one of
    ``accepted`` or a subclass of one. :meth:`hf_pelrp.Attribution.load` (a saved
    :class:`hf_pelrp.Seq2SeqAttribution` loads as one) and :func:`hf_pelrp.load_attribution` (any result) are
    the public entry points; they pass the classes, so this module needs none of them.

    Raises
    ------
    FileNotFoundError
        There is no file at ``path``.
    AttributionFileError
        The file is truncated or corrupted, not an attribution, of an unsupported format version, its
        metadata and tensors do not agree (missing or extra tensors, shapes, types, digest), it names
        fields its class does not have, or it holds a result that is none of ``accepted``.
    """
    path = Path(path)
    meta, tensors = _read(path)
    where = str(path)
    name = _saved_class(meta, where)
    by_name = {c.__name__: c for a in accepted for c in (a, *_subclasses(a))}
    if name not in by_name:
        raise AttributionFileError(
            f"{where} holds a {name}, which is no {' or '.join(a.__name__ for a in accepted)}: read it with "
            "hf_pelrp.load_attribution(path), which returns the class it was saved from"
        )
    result_class = by_name[name]
    has_extras = any(f.name == "extras" for f in dataclasses.fields(result_class))
    known = {f.name for f in dataclasses.fields(result_class)} - {"extras"}
    unknown = sorted(set(meta.get("fields") or {}) - known) if isinstance(meta.get("fields"), dict) else []
    if unknown:
        raise AttributionFileError(
            f"{where}: fields {unknown} are unknown to this version of hf_pelrp's {result_class.__name__}; "
            "upgrade hf_pelrp"
        )
    _validate(meta, tensors, where)
    kwargs: dict[str, Any] = {}
    for name, value in meta["fields"].items():
        kwargs[name] = {int(k): v for k, v in value.items()} if name == "labels" else value
    for name, t in tensors.items():
        if name.startswith(_FIELD_PREFIX):
            kwargs[name.removeprefix(_FIELD_PREFIX)] = t.to(device)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise AttributionFileError(
            f"{where}: fields {unknown} are unknown to this version of hf_pelrp's {result_class.__name__}; "
            "upgrade hf_pelrp"
        )
    extras: dict[str, Any] = dict(meta["extras"]["values"])
    for key, kind in meta["extras"]["tensors"].items():
        t = tensors[_EXTRA_PREFIX + key]
        extras[key] = t.numpy() if kind == "numpy" else t.to(device)
    if not has_extras and extras:
        raise AttributionFileError(
            f"{where}: a {result_class.__name__} has no extras, but the file holds some"
        )
    try:
        return result_class(**kwargs, extras=extras) if has_extras else result_class(**kwargs)
    except TypeError as err:
        raise AttributionFileError(
            f"{where}: the file does not describe a complete attribution ({err})"
        ) from err
