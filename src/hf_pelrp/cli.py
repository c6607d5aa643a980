"""The ``hf-pelrp`` command line: ``explain`` a prediction, and the ``bench`` / ``evaluate`` hooks.

    hf-pelrp explain --model PATH --text "..." [--target ...] [--mode ...] [--no-positional] --out report.html
    hf-pelrp explain --model PATH --image cat.png --out report.png
    hf-pelrp explain --model LLAVA --image cat.png --text "<image>What is this?" [--generate N] --out report.html
    hf-pelrp bench [ARGS ...]
    hf-pelrp evaluate CONFIG

Errors in the arguments, a missing or unsupported model and every hf_pelrp error end the program with exit
code 2 and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2
PROG = "hf-pelrp"


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line (argparse prints the whole usage block first); --help still shows the usage
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _mode_choices() -> list[str]:
    from .config import MODES, PRESETS

    return list(dict.fromkeys([*MODES, *PRESETS]))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hf-pelrp`` (sub-commands ``explain``, ``bench``, ``evaluate``)."""
    parser = _Parser(
        prog=PROG,
        description="Explain Hugging Face transformers predictions with positional-encoding-aware LRP (PE-LRP).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    explain = sub.add_parser(
        "explain",
        help="explain a model's prediction on a text or an image and write a report",
        description=(
            "Explain the prediction of a sequence classifier, a causal or masked language model, an image "
            "classifier (ViT / DeiT) or a vision-language model (an image with text: LLaVA, ...) saved in a "
            "local folder with its tokenizer / processor, and write an HTML (or PNG) report."
        ),
    )
    explain.add_argument(
        "--model", required=True, metavar="PATH", help="folder of the model and its tokenizer"
    )
    explain.add_argument(
        "--text",
        action="append",
        metavar="TEXT",
        help="input text (repeat for several inputs, explained in one padded batch); with --image for a "
        "vision-language model, the prompt holding the processor's image token (e.g. '<image>What is this?')",
    )
    explain.add_argument(
        "--image",
        action="append",
        metavar="FILE",
        help="input image file: alone for image classifiers, with one --text per --image for vision-language "
        "models (repeatable)",
    )
    explain.add_argument(
        "--target",
        metavar="T",
        help="what to explain: class id or label (classifiers), token id or one-token string (LMs); "
        "default: the prediction",
    )
    explain.add_argument("--foil", metavar="F", help="contrast: explain score(target) - score(foil)")
    explain.add_argument(
        "--mode",
        choices=_mode_choices(),
        help="rules: attnlrp (AttnLRP), cp (CP-LRP) or a preset; default: attnlrp",
    )
    explain.add_argument(
        "--no-positional",
        dest="positional",
        action="store_false",
        default=None,
        help="treat positional encodings as constants (the classic baseline without position relevance)",
    )
    explain.add_argument(
        "--position",
        type=int,
        metavar="N",
        help="causal LMs: index of the token whose next-token prediction is explained (negative: from the end; "
        "default the last); masked LMs: the masked position (default the first mask token)",
    )
    gen = explain.add_mutually_exclusive_group()
    gen.add_argument(
        "--continuation",
        metavar="TEXT",
        help="causal and encoder-decoder LMs: explain each token of this continuation (target) of --text",
    )
    gen.add_argument(
        "--generate", type=int, metavar="N", help="causal LMs: generate N tokens greedily and explain each"
    )
    explain.add_argument(
        "--top-k", type=int, default=5, metavar="K", help="most relevant tokens to print (5)"
    )
    explain.add_argument("--batch-size", type=int, default=8, metavar="B", help="inputs per padded batch (8)")
    explain.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda:0 (cpu)")
    explain.add_argument(
        "--out",
        metavar="FILE",
        help="report to write: .html (tokens coloured by relevance) or .png (image overlays / bar charts)",
    )
    explain.add_argument("--json", metavar="FILE", help="also write the results (relevance arrays) as JSON")
    explain.add_argument("--quiet", action="store_true", help="no progress bar and no summary on stdout")

    bench = sub.add_parser(
        "bench",
        help="run the attribution benchmark (hf_pelrp.bench, as make bench)",
        description="Run the attribution benchmark; the remaining arguments go to hf_pelrp.bench.",
        add_help=False,
    )
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark script")

    evaluate = sub.add_parser(
        "evaluate",
        help="run the faithfulness evaluation described by a config file",
        description="Run the evaluation suite (hf_pelrp.evaluation.run) on a config file.",
    )
    evaluate.add_argument("config", metavar="CONFIG", help="evaluation config file (YAML, see configs/)")
    evaluate.add_argument(
        "--output-dir", metavar="DIR", help="where the results go (default: the config's output_dir)"
    )
    return parser


# ---- explain --------------------------------------------------------------------------------------------


def _parse_id(value: str | None) -> int | str | None:
    """``"3"`` is a class / token id; anything else is a label or a token string."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _check_explain_args(args: argparse.Namespace) -> None:
    if not args.text and not args.image:
        raise UsageError("give --text, --image, or both (an image with text, for vision-language models)")
    model = Path(args.model)
    if not model.is_dir() or not (model / "config.json").is_file():
        raise UsageError(f"--model {args.model}: not a folder with a config.json (a save_pretrained folder)")
    for image in args.image or []:
        if not Path(image).is_file():
            raise UsageError(f"--image {image}: no such file")
    for option, path, suffixes in (
        ("--out", args.out, (".html", ".htm", ".png")),
        ("--json", args.json, (".json",)),
    ):
        if path is None:
            continue
        if Path(path).suffix.lower() not in suffixes:
            raise UsageError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
        folder = Path(path).resolve().parent
        if not folder.is_dir():
            raise UsageError(f"{option} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
            raise UsageError(f"{option} {path}: not writable")
    _check_device(args.device)
    if args.top_k < 0 or args.batch_size < 1:
        raise UsageError("--top-k must be >= 0 and --batch-size >= 1")
    if (args.continuation is not None or args.generate is not None) and len(args.text or []) != 1:
        raise UsageError("--continuation / --generate explain one --text at a time")
    if args.text and args.image and len(args.text) != len(args.image):
        raise UsageError(
            f"an image with text takes one --text per --image (got {len(args.image)} --image and "
            f"{len(args.text)} --text)"
        )
    if args.generate is not None and args.generate < 1:
        raise UsageError("--generate needs a positive number of tokens")


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif parsed.type not in ("cpu", "mps", "xpu"):
        raise UsageError(f"--device {device}: unsupported device type {parsed.type!r}")


def _check_inputs_fit(args: argparse.Namespace, config: Any) -> None:
    """Text for a text model, images for an image model, both for a vision-language model: said before any
    weight is loaded."""
    architectures = " ".join(getattr(config, "architectures", None) or [])
    classifier = "ImageClassification" in architectures
    vision_language = not classifier and getattr(config, "vision_config", None) is not None
    if classifier and args.text:
        raise UsageError(
            f"--model {args.model} is an image classifier ({architectures}): give --image FILE, not --text"
        )
    if vision_language and not args.text:
        raise UsageError(
            f"--model {args.model} is a vision-language model ({architectures}): give --text with the --image "
            "(the prompt, holding the processor's image token)"
        )
    if not classifier and not vision_language and args.image:
        raise UsageError(f"--model {args.model} is a text model ({architectures}): give --text, not --image")


def _quiet() -> None:
    """No progress bar anywhere: transformers' weight loading and the hub's downloads included."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _load_pipeline(args: argparse.Namespace):
    import torch
    from transformers import AutoConfig, pipeline

    from . import pipeline as _registers_the_task  # noqa: F401

    try:
        config = AutoConfig.from_pretrained(args.model)
    except (ValueError, KeyError) as exc:
        # transformers does not know the model type at all
        raise UsageError(f"--model {args.model}: {exc}") from None
    if not getattr(config, "architectures", None):
        raise UsageError(
            f"--model {args.model}: config.json names no architecture (save the model with save_pretrained)"
        )
    _check_inputs_fit(args, config)
    return pipeline(
        "lrp-attribution", model=args.model, device=torch.device(args.device), dtype=torch.float32
    )


def _named(entry: dict[str, Any]) -> str:
    return f"{entry['label']!r} (id {entry['id']})"


def _summary_line(index: int, result: dict[str, Any]) -> str:
    target = result["target"]
    foil = result.get("foil")
    if isinstance(target, list):  # a continuation: one target per generated token
        gaps = result["conservation_gap"]
        versus = ""
        if foil:
            names = list(dict.fromkeys(_named(f) for f in foil))
            versus = f" versus foil {', '.join(names)}"
        return (
            f"[{index}] continuation {result['generated_text']!r}{versus}: {len(target)} tokens explained, "
            f"conservation gap max {max(abs(g) for g in gaps):.4g}"
        )
    top = ", ".join(f"{t['token']!r} {t['relevance']:+.4g}" for t in result["top_tokens"])
    # with a foil the score is logit(target) - logit(foil): the line says so
    versus = f" versus foil {_named(foil)}" if foil else ""
    score = "score (difference)" if foil else "score"
    image = ""
    if (
        "image_relevance" in result
    ):  # a vision-language model: the image's share (patches, positions, specials)
        total = float(result["image_relevance"].sum()) + float(result.get("image_special", 0.0))
        if "image_position_relevance" in result:
            total += float(result["image_position_relevance"].sum())
        image = f" image {total:.4g}"
    return (
        f"[{index}] target {_named(target)}{versus} {score} {result['score']:.4g}{image} "
        f"conservation gap {result['conservation_gap']:.4g} | top: {top}"
    )


def _jsonable(value: Any) -> Any:
    import numpy as np

    from .result import Attribution, GenerationAttribution

    if isinstance(value, dict):
        return {
            k: _jsonable(v)
            for k, v in value.items()
            # the attribution object and the pipeline's image (a PIL picture) are not JSON
            if not isinstance(v, Attribution | GenerationAttribution) and not hasattr(v, "getpixel")
        }
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_report(args: argparse.Namespace, pipe: Any, results: list[dict[str, Any]]) -> list[Path]:
    from .result import Attribution, GenerationAttribution

    out = Path(args.out)
    html = out.suffix.lower() in (".html", ".htm")
    title = f"hf_pelrp: {Path(args.model).name}"
    attrs = [r["attribution"] for r in results]
    # the attributions carry their decoded tokens and label names (the pipeline filled them)
    if isinstance(attrs[0], GenerationAttribution):
        if html:
            attrs[0].to_html(path=out, title=title, image=results[0].get("image"))
        else:
            attrs[0].save_png(out)
        return [out]
    attr = Attribution.stack(attrs)
    images = None
    if args.image and args.text:  # a vision-language model: the images as the model saw them (the pipeline's)
        images = [r.get("image") for r in results]
    elif args.image:
        from PIL import Image

        images = [Image.open(path).convert("RGB") for path in args.image]
    if html:
        attr.to_html(path=out, title=title, image=images)
        return [out]
    written = []
    for row in range(attr.batch_size):
        path = out if attr.batch_size == 1 else out.with_name(f"{out.stem}-{row}{out.suffix}")
        attr[row].save_png(path, images[row] if images else None)
        written.append(path)
    return written


def _explain(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    _check_explain_args(args)
    if args.quiet:
        _quiet()
    pairs = bool(args.text and args.image)  # a vision-language model: image i with text i
    inputs: list[Any] = list(args.text or args.image)
    params: dict[str, Any] = {
        "target": _parse_id(args.target),
        "foil": _parse_id(args.foil),
        "mode": args.mode,
        "positional": args.positional,
        "position": args.position,
        "top_k": args.top_k,
        "continuation": args.continuation,
        "max_new_tokens": args.generate,
        "return_attribution": True,
    }
    params = {k: v for k, v in params.items() if v is not None}
    batches = [inputs[i : i + args.batch_size] for i in range(0, len(inputs), args.batch_size)]
    # the bar counts the inputs only (loading the model is its status, not a step: one input reads "1/1")
    with tqdm(total=len(inputs), desc="hf-pelrp explain", unit=" input", disable=args.quiet) as bar:
        bar.set_postfix_str("loading model")
        pipe = _load_pipeline(args)
        results: list[dict[str, Any]] = []
        for batch in batches:
            bar.set_postfix_str("attributing")
            if pairs:
                from PIL import Image

                start = len(results)
                images = [Image.open(path).convert("RGB") for path in args.image[start : start + len(batch)]]
                out = pipe(images=images, text=batch, batch_size=args.batch_size, **params)
            else:
                if args.image:
                    from PIL import Image

                    batch = [Image.open(path).convert("RGB") for path in batch]
                out = pipe(batch, batch_size=args.batch_size, **params)
            out = out if isinstance(out, list) else [out]
            results.extend(out)
            bar.update(len(batch))
    if not args.quiet:
        for i, result in enumerate(results):
            print(_summary_line(i, result))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(_jsonable(results), indent=1), encoding="utf-8")
    if args.out is not None:
        for path in _write_report(args, pipe, results):
            if not args.quiet:
                print(f"wrote {path}")
    return 0


# ---- hooks for the benchmark and the evaluation suite ---------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    return int(bench.main(list(args.args)) or 0)


def _evaluate(args: argparse.Namespace) -> int:
    if not Path(args.config).is_file():
        raise UsageError(f"evaluation config {args.config}: no such file")
    if importlib.util.find_spec("hf_pelrp.evaluation") is None:
        raise UsageError("the evaluation suite (hf_pelrp.evaluation) is not installed in this version")
    evaluation = importlib.import_module("hf_pelrp.evaluation")
    run = getattr(evaluation, "run", None)
    if not callable(run):
        raise UsageError("this version of hf_pelrp.evaluation has no run(config_path) entry point yet")
    kwargs = {"output_dir": args.output_dir} if args.output_dir is not None else {}
    try:
        result = run(args.config, **kwargs)
    except (ValueError, KeyError) as exc:
        # a malformed configuration is bad input, reported like a bad argument
        raise UsageError(f"evaluation config {args.config}: {exc}") from exc
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-pelrp`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        # everything after "bench" belongs to the benchmark script, options included
        args.args = [*extra, *args.args]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {"explain": _explain, "bench": _bench, "evaluate": _evaluate}
    from .errors import HfPelrpError

    try:
        return commands[args.command](args)
    except (UsageError, HfPelrpError, OSError) as exc:
        # bad arguments, a refusal of hf_pelrp, unreadable model files, an unwritable report
        return _one_line_error(args.command, exc)
    except (ValueError, TypeError, RuntimeError, ImportError) as exc:
        # transformers / torch refusing the input (e.g. a model that cannot load on this device): one line too;
        # HF_PELRP_DEBUG=1 shows the traceback
        if os.environ.get("HF_PELRP_DEBUG"):
            raise
        return _one_line_error(args.command, exc, hint=" (set HF_PELRP_DEBUG=1 for the traceback)")


def _one_line_error(command: str, exc: BaseException, hint: str = "") -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{PROG} {command}: error: {message}{hint}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
