"""The ``lrp-attribution`` pipeline: ``pipeline("lrp-attribution", model=...)`` explains predictions with PE-LRP.

Registered with transformers' ``PIPELINE_REGISTRY`` when :mod:`hf_pelrp` is imported (transformers offers
no entry point for third-party pipelines, so the import is the registration). Works for sequence
classifiers, causal and masked language models, image classifiers and vision-language models (an image with
text, or chat messages with images, as transformers' ``image-text-to-text`` pipeline takes them); the
tokenizer, image processor or processor is found the usual way (from the model's folder, or passed
explicitly).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .adapters import adapter_for
from .engine import explain
from .errors import AttributionInputError
from .heads import (
    CAUSAL_LM,
    IMAGE_CLASSIFICATION,
    MASKED_LM,
    SEQ2SEQ_LM,
    SEQUENCE_CLASSIFICATION,
    head_of,
    target_id_of,
)
from .request import continuation_request, single_request
from .result import Attribution, GenerationAttribution, Seq2SeqAttribution
from .tokens import display_token, display_tokens

TASK = "lrp-attribution"

#: keys of the padded model inputs, with the value padding positions get
_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0, "special_tokens_mask": 1}
_DEFAULT_BATCH_SIZE = 8


class LRPAttributionPipeline(Pipeline):
    """Explain the predictions of a text classifier, a causal / masked LM or an image classifier with PE-LRP.

    >>> explain = pipeline("lrp-attribution", model="path/to/model")                 # doctest: +SKIP
    >>> out = explain("The capital of France is", target=" Paris")                   # doctest: +SKIP
    >>> out["tokens"], out["relevance"], out["score"], out["conservation_gap"]       # doctest: +SKIP
    >>> vlm = pipeline("lrp-attribution", model="path/to/llava")                      # doctest: +SKIP
    >>> out = vlm(images=image, text="<image>What is shown?")                         # doctest: +SKIP
    >>> out["image_relevance"], out["image_grid"], out["image"]                       # doctest: +SKIP

    Call parameters
    ---------------
    target : int or str, optional
        Class id or label (``"POSITIVE"``) for classifiers; vocabulary id or a one-token string (``" Paris"``)
        for language models. Default: the predicted class / token.
    foil : int or str, optional
        Contrastive explanation of ``score(target) - score(foil)``.
    mode : {"attnlrp", "cp"}, optional; positional : bool, optional
        The rules (default: the model's own defaults, see :func:`hf_pelrp.from_pretrained`, else AttnLRP with
        positions).
    position : int, optional
        Causal LMs: the token (index in the unpadded input, negative from the end) whose next-token logit is
        explained (default the last). Masked LMs: the masked position (default the first mask token).
    top_k : int, optional
        How many of the most relevant tokens ``top_tokens`` lists (default 5).
    continuation : str, optional; max_new_tokens : int, optional
        Causal LMs: explain each token of ``continuation`` after the input, or of ``max_new_tokens`` tokens
        generated greedily; the relevance entries are then matrices [continuation tokens x all tokens].
    span_reduce : {"sum"}, optional
        With a continuation: explain the sum of its logits in one backward pass (one row).
    return_attribution : bool, optional
        Also return the :class:`hf_pelrp.Attribution` (detached) under ``"attribution"``.
    batch_size : int, optional
        Inputs per padded batch (default 8); results are the same as one input at a time.

    Returns
    -------
    dict (or a list of dicts for a list of inputs)
        ``tokens`` (strings), ``token_relevance``, ``position_relevance``, ``relevance`` (float32 numpy
        arrays over the tokens, without padding), ``position_relevance_by_layer`` [L, T] for rotary models,
        ``segment_relevance`` where the model has token types, ``target`` ({``id``, ``label``}), ``score``
        (the explained logit), ``conservation_gap``, ``top_tokens``; for images ``patch_map`` /
        ``pixel_map`` (numpy) and ``tokens`` naming the CLS / patch positions. Vision-language models with an
        image add ``image_relevance`` and ``image_position_relevance`` [P] (one value per patch, raster order;
        [S, P] for a continuation), ``image_special`` (the tower's class token), ``image_grid`` (rows,
        columns) and ``image``: the image as the model saw it (resized and cropped by the processor, a PIL
        image), to draw the maps on (``out["attribution"].to_html(image=out["image"])``).
    """

    _load_tokenizer = None
    _load_image_processor = None
    _load_feature_extractor = False
    _load_processor = False
    _load_video_processor = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        adapter_for(self.model)  # an unsupported architecture fails here, not at the first call
        self.head = head_of(self.model)
        self.kind = self.head.name
        self.takes_images = getattr(adapter_for(self.model), "vision", None) is not None
        self._processor_error: str | None = (
            None  # why the model's processor could not be loaded, if it failed
        )
        self._find_components()
        # a tokenizer may produce token_type_ids for a model that has no segment embedding (DistilBERT, LLaMA)
        forward_params = inspect.signature(self.model.forward).parameters
        self._text_keys = ("input_ids", "attention_mask") + (
            ("token_type_ids",) if "token_type_ids" in forward_params else ()
        )
        if self._batch_size is None:
            self._batch_size = _DEFAULT_BATCH_SIZE

    # ---- set-up -------------------------------------------------------------------------------------------

    def _find_components(self) -> None:
        """Load the tokenizer / image processor from the model's own folder when the caller passed a model
        object (``pipeline()`` only looks where a model *path* points)."""
        source = getattr(self.model, "name_or_path", None) or getattr(
            self.model.config, "_name_or_path", None
        )
        local = isinstance(source, str) and os.path.isdir(source)
        if self.takes_images:  # a vision-language model: its processor expands the image placeholder
            if self.processor is None and local:
                from transformers import AutoProcessor

                try:
                    self.processor = AutoProcessor.from_pretrained(source)
                except ImportError as exc:
                    # a library the processor needs is missing (transformers 5 loads Qwen2-VL's processor with a
                    # torchvision-only video processor): text still works; an image is refused naming the cause
                    self._processor_error = str(exc).strip().split(". ")[0].replace("\n", " ")
            if self.processor is not None and not hasattr(self.processor, "image_processor"):
                self.processor = None  # a tokenizer found as "the processor": text only
            if self.tokenizer is None and self.processor is not None:
                self.tokenizer = self.processor.tokenizer
            # without a processor, text-only prompts still work; an image is refused when it comes
        if self.kind == IMAGE_CLASSIFICATION:
            if self.image_processor is None and local:
                from transformers import AutoImageProcessor

                self.image_processor = AutoImageProcessor.from_pretrained(source)
            if self.image_processor is None:
                raise AttributionInputError(
                    f"no image processor for {type(self.model).__name__}: pass image_processor=... to pipeline()"
                )
            return
        if self.tokenizer is None and local:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer is None:
            raise AttributionInputError(
                f"no tokenizer for {type(self.model).__name__}: pass tokenizer=... to pipeline()"
            )

    def get_inference_context(self):
        # relevance is a gradient: transformers' default (torch.no_grad) would leave nothing to read
        return torch.enable_grad

    def _sanitize_parameters(
        self,
        target: int | str | None = None,
        foil: int | str | None = None,
        mode: str | None = None,
        positional: bool | None = None,
        position: int | None = None,
        top_k: int | None = None,
        continuation: str | None = None,
        max_new_tokens: int | None = None,
        span_reduce: str | None = None,
        return_attribution: bool | None = None,
        truncation: bool | None = None,
        **unknown: Any,
    ) -> tuple[dict, dict, dict]:
        if unknown:
            raise AttributionInputError(
                f"unknown parameter(s) {sorted(unknown)} for the {TASK} pipeline; it takes target, foil, mode, "
                "positional, position, top_k, continuation, max_new_tokens, span_reduce, return_attribution, "
                "truncation, batch_size"
            )
        preprocess: dict[str, Any] = {}
        forward: dict[str, Any] = {}
        post: dict[str, Any] = {}
        if truncation is not None:
            preprocess["truncation"] = truncation
        if continuation is not None:
            preprocess["continuation"] = continuation
        for name, value in (
            ("target", target),
            ("foil", foil),
            ("mode", mode),
            ("positional", positional),
            ("position", position),
            ("max_new_tokens", max_new_tokens),
            ("span_reduce", span_reduce),
        ):
            if value is not None:
                forward[name] = value
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
                raise AttributionInputError(f"top_k must be a non-negative int, got {top_k!r}")
            post["top_k"] = top_k
        if return_attribution is not None:
            post["return_attribution"] = bool(return_attribution)
        return preprocess, forward, post

    # ---- batching -----------------------------------------------------------------------------------------

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad a list of preprocessed inputs into one batch; the per-input metadata becomes a list."""
        batch: dict[str, Any] = {"meta": [m for item in items for m in item["meta"]]}
        if any(set(item) != set(items[0]) for item in items):
            raise AttributionInputError(
                "a batch mixes inputs with and without images: explain prompts with an image and text-only "
                "prompts in separate calls (or with batch_size=1)"
            )
        side = getattr(self.tokenizer, "padding_side", "right") if self.tokenizer is not None else "right"
        pad_id = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        for key in items[0]:
            if key == "meta":
                continue
            tensors = [item[key] for item in items]
            if key == "pixel_values" or tensors[0].dim() != 2:
                batch[key] = torch.cat(tensors)
                continue
            # padding ids are masked out: any id will do when the tokenizer defines no pad token
            value = _PAD_VALUES.get(key, pad_id if pad_id is not None else 0)
            length = max(t.shape[1] for t in tensors)
            out = torch.full((len(tensors), length), value, dtype=tensors[0].dtype)
            for i, t in enumerate(tensors):
                if side == "left":
                    out[i, length - t.shape[1] :] = t[0]
                else:
                    out[i, : t.shape[1]] = t[0]
            batch[key] = out
        return batch

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        # our own collate: padding needs no pad token (padding is masked out) and metadata travels as a list
        from torch.utils.data import DataLoader

        if not hasattr(inputs, "__len__"):
            inputs = list(inputs)
        dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=self._collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    # ---- the three steps ----------------------------------------------------------------------------------

    def preprocess(
        self, inputs: Any, truncation: bool | None = None, continuation: str | None = None
    ) -> dict[str, Any]:
        if self.kind == IMAGE_CLASSIFICATION:
            if isinstance(inputs, ImagePrompt | Chat):
                raise AttributionInputError(
                    f"{type(self.model).__name__} is an image classifier: give the image alone, not with text"
                )
            return self._preprocess_image(inputs)
        if isinstance(inputs, ImagePrompt) or (isinstance(inputs, Chat) and inputs.has_images):
            return self._preprocess_image_text(inputs, continuation)
        if _looks_like_image(inputs):
            raise AttributionInputError(
                f"an image alone cannot be explained with {type(self.model).__name__}: "
                + (
                    "give it with text, pipe(images=image, text='<image> ...'), or as chat messages"
                    if self.takes_images
                    else "it is a text model (it takes no images); give text"
                )
            )
        if isinstance(inputs, Chat):
            encoded = self._encode_chat(inputs.messages)
            text: Any = inputs.messages
        elif isinstance(inputs, dict):
            encoded = self._encode_pair(inputs, truncation)
            text = dict(inputs)
        elif isinstance(inputs, str):
            if not inputs:
                raise AttributionInputError("empty text: give at least one character to explain")
            encoded = self.tokenizer(inputs, return_tensors="pt", truncation=bool(truncation))
            text = inputs
        else:
            raise AttributionInputError(
                f"the {TASK} pipeline takes a string, a sentence pair {{'text': ..., 'text_pair': ...}}, chat "
                f"messages [{{'role': ..., 'content': ...}}, ...] (or a list of these) for "
                f"{type(self.model).__name__}, got {type(inputs).__name__}"
            )
        model_inputs = {k: v for k, v in encoded.items() if k in self._text_keys}
        meta: dict[str, Any] = {"text": text, "continuation_ids": None}
        self._continuation_meta(meta, continuation)
        return {**model_inputs, "meta": [meta]}

    def _continuation_meta(self, meta: dict[str, Any], continuation: str | None) -> None:
        """``meta["continuation_ids"]``: the ids of ``continuation=`` (checked), for the forward step."""
        if continuation is not None:
            if self.kind not in (CAUSAL_LM, SEQ2SEQ_LM):
                raise AttributionInputError(
                    "continuation= is only meaningful for causal and encoder-decoder language models"
                )
            if not isinstance(continuation, str) or not continuation:
                raise AttributionInputError(f"continuation must be a non-empty string, got {continuation!r}")
            ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not ids:
                raise AttributionInputError(f"continuation {continuation!r} tokenizes to no tokens")
            meta["continuation_ids"] = torch.tensor(ids, dtype=torch.long)

    def _preprocess_image_text(self, inputs: ImagePrompt | Chat, continuation: str | None) -> dict[str, Any]:
        """An image with text, or chat messages with images, through the model's processor: ``input_ids`` with
        the image placeholder expanded to one token per image feature, and ``pixel_values``."""
        if not self.takes_images:
            raise AttributionInputError(
                f"{type(self.model).__name__} is a text model here (no vision tower hf_pelrp explains): it takes "
                "no images. Give text only, or use a vision-language model (LLaVA, ...)."
            )
        processor = self.processor
        if processor is None:
            cause = self._processor_error
            raise AttributionInputError(
                f"no processor for {type(self.model).__name__}"
                + (f" (loading it from the model's folder failed: {cause})" if cause else "")
                + ": pass processor=AutoProcessor.from_pretrained(...) to pipeline() (it turns an image and text "
                "into pixel_values and input_ids with one placeholder token per image feature)"
            )
        if isinstance(inputs, ImagePrompt):
            self._check_placeholder(inputs.text)
        try:
            if isinstance(inputs, Chat):
                if getattr(processor, "chat_template", None) is None:
                    raise AttributionInputError(
                        "the processor has no chat template (processor.chat_template is None): pass the image "
                        "with text instead, pipe(images=image, text=...)"
                    )
                encoded = processor.apply_chat_template(
                    inputs.messages,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                )
                image = _first_chat_image(inputs.messages)
                text: Any = inputs.messages
            else:
                from transformers.image_utils import load_image

                image = load_image(_as_pil(inputs.image))
                encoded = processor(images=image, text=inputs.text, return_tensors="pt")
                text = inputs.text
        except (ValueError, TypeError) as exc:  # the processor's own refusal, as one input error
            raise AttributionInputError(
                f"the processor of {type(self.model).__name__} refused the input: {exc}"
            ) from exc
        keys = (*self._text_keys, "pixel_values", *getattr(adapter_for(self.model).inputs, "image_keys", ()))
        model_inputs = {k: v for k, v in encoded.items() if k in keys}
        if "pixel_values" not in model_inputs:
            raise AttributionInputError("the processor made no pixel_values: the input holds no image")
        meta: dict[str, Any] = {
            "text": text,
            "continuation_ids": None,
            "image": self._model_view(model_inputs, image),
            "inputs": {k: v for k, v in model_inputs.items()},  # this row alone, unpadded (continuations)
        }
        self._continuation_meta(meta, continuation)
        return {**model_inputs, "meta": [meta]}

    def _check_placeholder(self, text: Any) -> None:
        token = getattr(self.processor, "image_token", None)
        if not isinstance(text, str) or not text:
            raise AttributionInputError(
                f"an image comes with text: pipe(images=image, text='...'), got text={text!r}"
            )
        if isinstance(token, str) and token not in text:
            raise AttributionInputError(
                f"the text holds no image token {token!r}: put {token!r} where the image goes "
                f"(e.g. text='{token}What is shown?'), or pass chat messages with an image entry"
            )

    def _model_view(self, model_inputs: dict[str, torch.Tensor], original: Any) -> Any:
        """The image as the model saw it (after the processor's resizing and cropping), as a PIL image: the
        patch grid lies exactly on it. ``pixel_values`` [1, C, H, W] are un-normalised with the image
        processor's mean and std; flattened patches with ``image_grid_thw`` (Qwen2-VL's layout) are put back
        together first. Other layouts give the original image."""
        from PIL import Image

        ip = self.processor.image_processor
        mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        pixels = model_inputs["pixel_values"]
        grid = model_inputs.get("image_grid_thw")
        if pixels.dim() == 2 and grid is not None:
            pixels = _unpatchify(pixels, grid, ip)
            if pixels is None:
                return original
        if pixels.dim() != 4 or pixels.shape[0] != 1 or mean is None or std is None:
            return original
        pixels = pixels[0].detach().float().cpu()
        if pixels.shape[0] != len(mean):
            return original
        if not getattr(ip, "do_rescale", True):  # pixels kept in 0..255 units: no un-normalising known here
            return original
        pixels = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        rescale = float(getattr(ip, "rescale_factor", 1 / 255))
        array = (pixels / (rescale * 255.0)).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array)

    def _encode_chat(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        """The conversation in the model's chat template, with the generation prompt: the explained token is
        the model's next token (its answer's first token)."""
        if self.kind != CAUSAL_LM:
            raise AttributionInputError(
                f"chat messages are explained with causal language models, not {type(self.model).__name__}"
            )
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise AttributionInputError(
                "the tokenizer has no chat template (tokenizer.chat_template is None): pass the prompt as a string, "
                "or a tokenizer with a template"
            )
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return {k: v for k, v in encoded.items()}

    def _encode_pair(self, pair: dict[str, Any], truncation: bool | None) -> dict[str, Any]:
        """A sentence pair ``{"text": ..., "text_pair": ...}`` for a classifier (token types mark the second
        sentence: its relevance is ``segment_relevance``)."""
        unknown = sorted(set(pair) - {"text", "text_pair"})
        if unknown or not isinstance(pair.get("text"), str) or not isinstance(pair.get("text_pair"), str):
            raise AttributionInputError(
                "a sentence pair is a dict {'text': str, 'text_pair': str}"
                + (f"; unknown keys {unknown}" if unknown else "")
            )
        if self.kind not in (SEQUENCE_CLASSIFICATION,):
            raise AttributionInputError(
                f"sentence pairs are explained with sequence classifiers, not {type(self.model).__name__}"
            )
        if not pair["text"] or not pair["text_pair"]:
            raise AttributionInputError("a sentence of the pair is empty")
        return self.tokenizer(
            pair["text"], pair["text_pair"], return_tensors="pt", truncation=bool(truncation)
        )

    def __call__(self, inputs: Any = None, *, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        """Explain ``inputs``: a string, a sentence pair, chat messages, an image, or a list of any of these.

        Vision-language models take ``images=`` with ``text=`` (one image per text: an image and a string, or
        lists of equal length), or chat messages whose contents hold ``{"type": "image", "image": ...}``
        entries (``text=messages`` or positionally), as transformers' ``image-text-to-text`` pipeline does.

        Raises
        ------
        AttributionInputError
            ``inputs`` is an empty list (transformers would fail on it with an IndexError); ``inputs`` together
            with ``images=`` / ``text=``; images and texts that do not pair up.
        """
        if images is not None or text is not None:
            if inputs is not None:
                raise AttributionInputError(
                    "pass the input either positionally or as images= / text=, not both"
                )
            inputs = _image_text_inputs(images, text)
        if inputs is None:
            raise AttributionInputError("no inputs: give text, chat messages, or images= with text=")
        if isinstance(inputs, list | tuple) and len(inputs) == 0:
            raise AttributionInputError(
                "no inputs: give a string, a sentence pair, chat messages or an image, or a non-empty list of them"
            )
        return super().__call__(_normalise_inputs(inputs), **kwargs)

    def _preprocess_image(self, image: Any) -> dict[str, Any]:
        from transformers.image_utils import load_image

        if isinstance(image, np.ndarray | torch.Tensor):
            from PIL import Image

            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
            image = Image.fromarray(array)
        if not isinstance(image, str) and not hasattr(image, "convert"):
            raise AttributionInputError(
                f"the {TASK} pipeline takes a PIL image, an image path or a HxW(xC) uint8 array for "
                f"{type(self.model).__name__}, got {type(image).__name__}"
            )
        image = load_image(image)
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "meta": [{"image_size": image.size}]}

    def _resolve_id(self, value: int | str | None, what: str) -> int | None:
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if not isinstance(value, str):
            raise AttributionInputError(f"{what} must be an int or a string, got {type(value).__name__}")
        return target_id_of(value, self.model, self.tokenizer, what)

    def _label_of(self, target_id: int) -> str:
        if not self.head.vocabulary_targets:
            id2label = getattr(self.model.config, "id2label", None) or {}
            return str(id2label.get(target_id, id2label.get(str(target_id), target_id)))
        return display_token(self.tokenizer, target_id)

    def _explained_position(self, position: int | None, mask: torch.Tensor, ids: torch.Tensor | None) -> Any:
        """Per-row padded index of the explained position, from an index into the unpadded input."""
        if self.kind == MASKED_LM and position is None:
            mask_id = getattr(self.tokenizer, "mask_token_id", None)
            found = (
                (ids == mask_id) & mask.bool() if mask_id is not None else torch.zeros_like(mask, dtype=bool)
            )
            if not found.any(-1).all():
                raise AttributionInputError(
                    f"no mask token ({getattr(self.tokenizer, 'mask_token', None)!r}) in the input: put one where "
                    "the prediction should be explained, or pass position="
                )
            return found.long().argmax(-1)
        if position is None:
            return None
        if self.kind not in (CAUSAL_LM, MASKED_LM):
            raise AttributionInputError("position= is only meaningful for causal and masked language models")
        if isinstance(position, bool) or not isinstance(position, int):
            raise AttributionInputError(f"position must be an int, got {position!r}")
        rows = []
        for row in mask.bool():
            real = row.nonzero().flatten()
            if not -len(real) <= position < len(real):
                raise AttributionInputError(f"position {position} is outside an input of {len(real)} tokens")
            rows.append(real[position])
        return torch.stack(rows)

    def _forward(self, model_inputs: dict[str, Any], **params: Any) -> dict[str, Any]:
        meta = model_inputs.pop("meta")
        target = self._resolve_id(params.get("target"), "target")
        foil = self._resolve_id(params.get("foil"), "foil")
        rules = {"mode": params.get("mode"), "positional": params.get("positional")}
        continuations = [m.get("continuation_ids") for m in meta]
        max_new_tokens = params.get("max_new_tokens")
        if max_new_tokens is not None or any(c is not None for c in continuations):
            return {"rows": self._forward_continuations(model_inputs, meta, foil, rules, params)}
        if params.get("span_reduce") is not None:
            raise AttributionInputError("span_reduce= needs continuation= or max_new_tokens=")
        if self.kind == IMAGE_CLASSIFICATION:
            attr = explain(single_request(self.model, model_inputs, target=target, foil=foil, **rules))
            return {"rows": [{"attribution": attr[i], "meta": m} for i, m in enumerate(meta)]}
        if _image_shapes_differ(meta):
            # images the processor sized differently (Qwen2-VL keeps the aspect ratio: a patch grid per image) do
            # not share a pass: each prompt is explained alone, with its own unpadded inputs
            rows = []
            for m in meta:
                rows += self._forward(dict(m["inputs"], meta=[m]), **params)["rows"]
            return {"rows": rows}
        mask = model_inputs["attention_mask"]
        position = self._explained_position(params.get("position"), mask, model_inputs.get("input_ids"))
        # a masked LM's [MASK] id comes from the tokenizer (single_request)
        request = single_request(
            self.model,
            model_inputs,
            target=target,
            foil=foil,
            position=position,
            tokenizer=self.tokenizer,
            **rules,
        )
        attr = explain(request)
        return {
            "rows": [
                {"attribution": row.unpad(), "meta": m} for row, m in zip(attr.rows(), meta, strict=True)
            ]
        }

    def _forward_continuations(
        self, model_inputs: dict[str, Any], meta: list[dict], foil: int | None, rules: dict, params: dict
    ) -> list[dict[str, Any]]:
        if self.kind not in (CAUSAL_LM, SEQ2SEQ_LM):
            raise AttributionInputError(
                "continuation= / max_new_tokens= are only meaningful for causal and encoder-decoder LMs"
            )
        if params.get("target") is not None or params.get("position") is not None:
            raise AttributionInputError(
                "target= and position= do not apply to a continuation: each of its tokens is explained"
            )
        max_new_tokens = params.get("max_new_tokens")
        rows = []
        for i, m in enumerate(meta):
            cont = m.get("continuation_ids")
            if cont is not None and max_new_tokens is not None:
                raise AttributionInputError("pass either continuation= or max_new_tokens=, not both")
            # a prompt with an image: its own unpadded inputs (pixels and the keywords that come with them are
            # not cut per row of a padded batch, whatever their layout)
            own = m.get("inputs")
            row_inputs = (
                dict(own)
                if own is not None
                else {
                    "input_ids": model_inputs["input_ids"][i : i + 1],
                    "attention_mask": model_inputs["attention_mask"][i : i + 1],
                }
            )
            request = continuation_request(
                self.model,
                row_inputs.pop("input_ids"),
                cont,
                attention_mask=row_inputs.pop("attention_mask", None),
                generate=cont is None,
                max_new_tokens=max_new_tokens,
                foil=foil,
                span_reduce=params.get("span_reduce"),
                tokenizer=self.tokenizer,
                **rules,
                **row_inputs,
            )
            rows.append({"attribution": explain(request), "meta": m})
        return rows

    def postprocess(
        self, model_outputs: dict[str, Any], top_k: int = 5, return_attribution: bool = False
    ) -> dict[str, Any]:
        rows = model_outputs["rows"]
        # unbatched by transformers' iterator: a list element; run singly: the list of one
        row = rows[0] if isinstance(rows, list) else rows
        attr, meta = row["attribution"], row["meta"]
        if isinstance(attr, GenerationAttribution):
            out = self._generation_dict(attr)
            _add_image_maps(out, attr, meta, row=None)
        elif isinstance(attr, Seq2SeqAttribution) and (
            meta.get("continuation_ids") is not None or attr.batch_size > 1
        ):
            out = self._seq2seq_continuation_dict(attr)
        else:
            out = self._attribution_dict(attr, meta)
            _add_image_maps(out, attr, meta, row=0)
        relevance = out["relevance"] if out["relevance"].ndim == 1 else out["relevance"].sum(0)
        order = np.argsort(-relevance, kind="stable")[:top_k]
        out["top_tokens"] = [
            {"index": int(i), "token": out["tokens"][i], "relevance": float(relevance[i])} for i in order
        ]
        if return_attribution:
            out["attribution"] = attr
        return out

    def _attribution_dict(self, attr: Attribution, meta: dict[str, Any]) -> dict[str, Any]:
        target_id = int(attr.target[0])
        out: dict[str, Any] = {
            "tokens": self._tokens(attr),
            "token_relevance": _np(attr.token[0]),
            "position_relevance": _np(attr.position[0]),
            "relevance": _np(attr.relevance[0]),
            "target": {"id": target_id, "label": self._label_of(target_id)},
            "score": float(attr.target_value[0]),
            "conservation_gap": float(attr.conservation_gap[0]),
            "mode": attr.mode,
            "positional": attr.positional,
        }
        if attr.position_by_layer is not None:
            out["position_relevance_by_layer"] = _np(attr.position_by_layer[0])
        if attr.segment is not None:
            out["segment_relevance"] = _np(attr.segment[0])
        if attr.position_index is not None:
            out["position"] = int(attr.position_index[0])
        foil = attr.foil
        if foil is not None:
            out["foil"] = {"id": int(foil[0]), "label": self._label_of(int(foil[0]))}
        for name, value in attr.extras.items():
            if isinstance(value, torch.Tensor):
                out[name] = _np(value[0])
        if isinstance(attr, Seq2SeqAttribution) and self.tokenizer is not None:
            out["target_tokens"] = display_tokens(self.tokenizer, attr.target_input_ids[0].tolist())
        return out

    def _seq2seq_continuation_dict(self, attr: Seq2SeqAttribution) -> dict[str, Any]:
        """An encoder-decoder continuation: one row per target token, over the source and the target prefix."""
        out: dict[str, Any] = {
            "tokens": self._tokens(attr),
            "target_tokens": display_tokens(self.tokenizer, attr.target_input_ids[0].tolist()),
            "generated_text": self.tokenizer.decode(attr.target.tolist()),
            "token_relevance": _np(attr.token),
            "position_relevance": _np(attr.position),
            "relevance": _np(attr.relevance),
            "target_token_relevance": _np(attr.target_token),
            "target_position_relevance": _np(attr.target_position),
            "target": [{"id": int(t), "label": self._label_of(int(t))} for t in attr.target],
            "score": [float(v) for v in attr.target_value],
            "conservation_gap": [float(v) for v in attr.conservation_gap],
            "mode": attr.mode,
            "positional": attr.positional,
        }
        if attr.position_by_layer is not None:
            out["position_relevance_by_layer"] = _np(attr.position_by_layer)
        if attr.foil is not None:
            out["foil"] = [{"id": int(f), "label": self._label_of(int(f))} for f in attr.foil]
        return out

    def _generation_dict(self, gen: GenerationAttribution) -> dict[str, Any]:
        ids = gen.input_ids.tolist()
        out: dict[str, Any] = {
            "tokens": display_tokens(self.tokenizer, ids),
            "prompt_length": gen.prompt_length,
            "generated_text": self.tokenizer.decode(gen.generated_ids.tolist()),
            "token_relevance": _np(gen.token),
            "position_relevance": _np(gen.position),
            "relevance": _np(gen.relevance),
            "target": [{"id": int(t), "label": self._label_of(int(t))} for t in gen.target],
            "score": [float(v) for v in gen.target_value],
            "conservation_gap": [float(v) for v in gen.conservation_gap],
            "mode": gen.mode,
            "positional": gen.positional,
            "span_reduce": gen.span_reduce,
        }
        if gen.position_by_layer is not None:
            out["position_relevance_by_layer"] = _np(gen.position_by_layer)
        if gen.foil is not None:
            out["foil"] = [{"id": int(f), "label": self._label_of(int(f))} for f in gen.foil]
        return out

    def _tokens(self, attr: Attribution) -> list[str]:
        if attr.tokens is not None:
            return list(attr.tokens[0])
        if attr.input_ids is not None and self.tokenizer is not None:
            return display_tokens(self.tokenizer, attr.input_ids[0].tolist())
        # vision: the sequence is [CLS] (+ [DIST]) followed by the patches in raster order
        length = attr.token.shape[-1]
        grid = getattr(attr, "extras", {}).get("patch_map")
        num_patches = int(np.prod(grid.shape[1:])) if isinstance(grid, torch.Tensor) else length - 1
        specials = ["[CLS]", "[DIST]"][: max(length - num_patches, 0)]
        specials += [f"[SPECIAL{i}]" for i in range(len(specials), length - num_patches)]
        return specials + [f"patch {i}" for i in range(num_patches)]


@dataclass(frozen=True)
class Chat:
    """One conversation (``[{"role": ..., "content": ...}, ...]``), kept whole through the pipeline's
    batching (a bare list of dicts would be taken as a batch of inputs)."""

    messages: list[dict[str, Any]]

    @property
    def has_images(self) -> bool:
        """Whether a message's content holds an image entry (``{"type": "image", ...}``)."""
        return _first_chat_image(self.messages) is not None


@dataclass(frozen=True)
class ImagePrompt:
    """One image with its text (``pipe(images=image, text="...")``), explained together by a vision-language
    model."""

    image: Any
    text: Any


def _looks_like_image(value: Any) -> bool:
    return hasattr(value, "convert") and hasattr(value, "size") or isinstance(value, np.ndarray)


def _as_pil(image: Any) -> Any:
    """A PIL image, a path / URL string, or a HxW(xC) uint8 array / tensor, as ``load_image`` takes it."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        from PIL import Image

        if image.dtype != np.uint8:
            raise AttributionInputError(
                f"an image array must be uint8 HxW(x3) pixels, got dtype {image.dtype}; pass a PIL image"
            )
        return Image.fromarray(image)
    if isinstance(image, str) or _looks_like_image(image):
        return image
    raise AttributionInputError(
        f"images= takes a PIL image, an image path or a HxW(x3) uint8 array, got {type(image).__name__}"
    )


def _first_chat_image(messages: list[dict[str, Any]]) -> Any:
    """The first image of a conversation (its ``image`` / ``url`` / ``path`` entry), or None."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for item in content:
                if isinstance(item, dict) and item.get("type") == "image":
                    for key in ("image", "url", "path"):
                        if item.get(key) is not None:
                            return item[key]
    return None


def _image_text_inputs(images: Any, text: Any) -> Any:
    """``images=`` / ``text=`` as the pipeline's inputs: one :class:`ImagePrompt` per image-text pair, or the
    chat messages / texts alone."""
    if images is None:
        return text
    if text is None:
        raise AttributionInputError(
            "images= needs text= (one text per image, holding the processor's image token), or chat messages "
            "with image entries"
        )
    if _is_chat(text) or (isinstance(text, list | tuple) and text and all(_is_chat(t) for t in text)):
        raise AttributionInputError(
            "chat messages carry their images in their content ({'type': 'image', 'image': ...}): pass "
            "text=messages without images="
        )
    many_images = isinstance(images, list | tuple)
    many_texts = isinstance(text, list | tuple)
    if many_images != many_texts or (many_images and len(images) != len(text)):
        raise AttributionInputError(
            "give one text per image: an image with a string, or lists of equal length "
            f"(got {len(images) if many_images else 1} image(s) and {len(text) if many_texts else 1} text(s)); "
            "hf_pelrp explains one image per prompt"
        )
    if not many_images:
        return ImagePrompt(images, text)
    return [ImagePrompt(i, t) for i, t in zip(images, text, strict=True)]


def _unpatchify(patches: torch.Tensor, grid: torch.Tensor, image_processor: Any) -> torch.Tensor | None:
    """One image's flattened patches in Qwen2-VL's layout back as ``[1, C, H, W]`` (still normalised), or None
    for another layout.

    The processor cuts the resized image into ``patch_size`` squares, groups them in ``merge_size`` x
    ``merge_size`` blocks (block after block in raster order, raster order inside a block) and repeats each patch
    ``temporal_patch_size`` times: ``[h * w, C * T * ps * ps]`` with ``image_grid_thw = [[1, h, w]]``. This is
    the inverse (the first of the identical temporal copies), so the grid lies exactly on the image."""
    ps = getattr(image_processor, "patch_size", None)
    merge = getattr(image_processor, "merge_size", None)
    temporal = getattr(image_processor, "temporal_patch_size", None)
    if not all(isinstance(v, int) and v > 0 for v in (ps, merge, temporal)):
        return None
    grid = torch.as_tensor(grid)
    if grid.shape != (1, 3) or int(grid[0, 0]) != 1:
        return None
    h, w = int(grid[0, 1]), int(grid[0, 2])
    channels = patches.shape[1] // (temporal * ps * ps)
    if h % merge or w % merge or patches.shape != (h * w, channels * temporal * ps * ps):
        return None
    x = patches.detach().reshape(h // merge, w // merge, merge, merge, channels, temporal, ps, ps)[
        :, :, :, :, :, 0
    ]
    # (block row, block column, row in block, column in block, C, py, px) -> (C, rows, py, columns, px)
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * ps, w * ps)
    return x[None]


def _image_shapes_differ(meta: list[dict[str, Any]]) -> bool:
    """Whether a batch's prompts with images have image inputs of different shapes (pixels, grids): they cannot
    be explained in one pass."""
    own = [m.get("inputs") for m in meta]
    if len(own) < 2 or any(o is None for o in own):
        return False

    def shapes(inputs: dict[str, Any]) -> dict[str, Any]:
        # the token-aligned inputs are padded to one length; the rest must match in shape and, for a grid, value
        return {
            k: (tuple(v.shape), v.tolist() if k.endswith("grid_thw") else None)
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor) and not (v.dim() == 2 and v.shape == inputs["input_ids"].shape)
        }

    first = shapes(own[0])
    return any(shapes(o) != first for o in own[1:])


def _add_image_maps(out: dict[str, Any], attr: Any, meta: dict[str, Any], row: int | None) -> None:
    """A vision-language result's image maps (``image_relevance``, ...) and the displayable image, in ``out``."""
    if getattr(attr, "image", None) is None:
        return

    def take(x: torch.Tensor) -> np.ndarray:
        return _np(x if row is None else x[row])

    out["image_relevance"] = take(attr.image)
    if attr.image_position is not None:
        out["image_position_relevance"] = take(attr.image_position)
    if attr.image_special is not None:  # one value per row: a float, or [S] for a continuation
        special = take(attr.image_special)
        out["image_special"] = float(special) if special.ndim == 0 else special
    out["image_grid"] = tuple(int(v) for v in attr.image_grid[0].tolist())
    if meta.get("image") is not None:
        out["image"] = meta["image"]


def _is_chat(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def _normalise_inputs(inputs: Any) -> Any:
    """One conversation becomes a :class:`Chat`; a list of conversations a list of them; the rest is unchanged."""
    if _is_chat(inputs):
        return Chat(list(inputs))
    if isinstance(inputs, list | tuple) and inputs and all(_is_chat(x) for x in inputs):
        return [Chat(list(x)) for x in inputs]
    return inputs


def _np(x: torch.Tensor) -> np.ndarray:
    """A tensor as a NumPy array: relevance maps as float32, ids, masks and counts keep an integer (or bool)
    dtype (``target_input_ids`` are ids, not floats)."""
    x = x.detach().cpu()
    return x.numpy() if not x.is_floating_point() and not x.is_complex() else x.float().numpy()


def register() -> None:
    """Register the ``lrp-attribution`` task with transformers (done on ``import hf_pelrp``).

    No default model and no model classes are given: a checkpoint path is loaded with the class named in
    its ``config.architectures``, so the head it was saved with is the one explained.
    """
    if TASK in PIPELINE_REGISTRY.supported_tasks:
        return
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=LRPAttributionPipeline, pt_model=())


register()
