"""Long contexts and low precision: time and peak memory of PE-LRP against plain Gradient x Input by length.

Methods (all explain the arg-max next-token logit at the last position, parameters frozen, SDPA kernels):

* ``gxi``          plain Gradient x Input (``hf_pelrp.bench``'s implementation)
* ``pe_lrp``       ``hf_pelrp.attribute`` (AttnLRP rules, positions as leaves)
* ``gxi_ckpt``     Gradient x Input with every block recomputed in the backward pass
* ``pe_lrp_ckpt``  one explanation request with ``gradient_checkpointing=True``

Models: ``smollm2`` (the real SmolLM2-135M-Instruct weights, from the converted offline cache),
``smollm2-random`` (its architecture, random weights: for machines without the cache) and ``llama3-8b``
(LLaMA-3-8B's configuration with random weights, bfloat16; GPU only: 16 GB of weights).

Memory. CPU: each (method, length) runs in a fresh process that loads the model, warms up on 32 tokens (pages
in the weights, initialises the kernels), then resets the kernel's high-water mark and runs one timed pass;
peak extra memory = ``VmHWM`` minus the resident size before the pass, total = ``VmHWM``
(``hf_pelrp.bench`` has the helpers and explains the method); glibc's mmap threshold is fixed at 64 KiB
so that freed tensors leave the resident set and the peak follows the live tensors. A watchdog kills a worker whose resident
size exceeds ``--budget-gb``. GPU: one process, ``torch.cuda.max_memory_allocated`` around each pass,
out-of-memory caught.

Time: the single timed pass of each memory measurement; on a shared machine also ``--time-lengths``, which
times all methods in one process, interleaved over ``--repeats`` rounds (median), as ``hf_pelrp.bench``
does.

``--search`` finds, per method, the largest length (multiple of ``--step``) whose whole pass (weights
included) fits in ``--budget-gb``: the first probe is the linear extrapolation of the measured lengths, then
bisection, so a linear memory curve is settled in two or three probes. ``--precision`` compares bf16 and fp16
attributions with fp32 of the same (rounded) weights on SmolLM2 and prompts of several lengths.

Examples::

    nice python scripts/bench_scale.py --lengths 512 2048 8192 --json scale_cpu.json
    python scripts/bench_scale.py --device cuda --dtype bfloat16 --model llama3-8b --lengths 2048 8192 32768 \\
        --search --budget-gb 120
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time

import torch

from hf_pelrp.bench import (
    _machine,
    _mem_available_gib,
    _status_kib,
    _sync,
    _trim_heap,
    gradient_x_input,
    run_watched_worker,
)
from hf_pelrp.request import single_request

METHODS = ("gxi", "pe_lrp", "gxi_ckpt", "pe_lrp_ckpt")
MODELS = ("smollm2", "smollm2-random", "llama3-8b")
# ratios reported: each PE-LRP variant against Gradient x Input with the same memory strategy
RATIOS = {"pe_lrp": "gxi", "pe_lrp_ckpt": "gxi_ckpt"}

SMOLLM2_CONFIG = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
)
LLAMA3_8B_CONFIG = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
)

PROMPTS = (
    "The capital of France is",
    "Alice gave the book to Bob because he had asked for it. Bob then gave the book to",
    "In 1969, the first humans walked on the Moon. The astronauts of Apollo 11 were Neil Armstrong, Buzz "
    "Aldrin and Michael Collins. Armstrong was the first to step onto the surface, followed by",
)


# ---- models and methods ----


def build_model(name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The benchmarked model in eval mode, SDPA attention, on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        from hf_pelrp.assets import load_smollm2

        model, _ = load_smollm2(dtype=dtype, attn_implementation="sdpa")
        return model.to(device).eval()
    config = LlamaConfig(**(SMOLLM2_CONFIG if name == "smollm2-random" else LLAMA3_8B_CONFIG))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: no 8B-parameter copy through host memory
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


@contextlib.contextmanager
def _checkpointed(model: torch.nn.Module):
    """Gradient x Input with the same block recomputation ``attribute(..., gradient_checkpointing=True)`` uses."""
    from hf_pelrp.checkpointing import checkpoint_layers

    handles = checkpoint_layers(model.model.layers)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_method(method: str, model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One explanation with ``method``; returns the [B, T] relevance."""
    import hf_pelrp

    if method == "gxi":
        return gradient_x_input(model, input_ids, mask)
    if method == "gxi_ckpt":
        with _checkpointed(model):
            return gradient_x_input(model, input_ids, mask)
    checkpoint = method == "pe_lrp_ckpt"
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    request = single_request(model, inputs, gradient_checkpointing=checkpoint)
    return hf_pelrp.engine.explain(request).relevance


def _inputs(model, batch: int, length: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # ordinary vocabulary ids (the first ids of SmolLM2 / LLaMA-3 are special tokens)
    ids = torch.randint(100, min(model.config.vocab_size, 32000), (batch, length), generator=generator)
    return ids.to(device), torch.ones_like(ids, device=device)


# ---- one measurement ----


def measure(model, method: str, length: int, batch: int, device: torch.device) -> dict:
    """Time and peak memory of one pass (after a 32-token warm-up of the same method)."""
    run_method(method, model, *_inputs(model, batch, 32, device))
    ids, mask = _inputs(model, batch, length, device)
    _trim_heap()
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        relevance = run_method(method, model, ids, mask)
        _sync(device)
        out["time_s"] = time.perf_counter() - start
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        out["total_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        start = time.perf_counter()
        relevance = run_method(method, model, ids, mask)
        out["time_s"] = time.perf_counter() - start
        out["peak_mib"] = (_status_kib("VmHWM") - base) / 1024
        out["total_mib"] = _status_kib("VmHWM") / 1024
    out["finite"] = bool(torch.isfinite(relevance).all())
    return out


def interleaved_times(model, methods: list[str], length: int, batch: int, device, repeats: int) -> dict:
    """Median time per method over ``repeats`` rounds that run every method back to back, alternating the
    order: a burst of load from other processes on a shared machine then hits all methods alike."""
    ids, mask = _inputs(model, batch, length, device)
    for method in methods:  # warm-up
        run_method(method, model, *_inputs(model, batch, 32, device))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(repeats):
        for method in methods if r % 2 == 0 else methods[::-1]:
            _sync(device)
            start = time.perf_counter()
            run_method(method, model, ids, mask)
            _sync(device)
            times[method].append(time.perf_counter() - start)
    return {m: {"median_s": statistics.median(t), "times_s": t} for m, t in times.items()}


def _worker(spec: dict) -> dict:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    model = build_model(spec["model"], getattr(torch, spec["dtype"]), device)
    if spec.get("task") == "time":
        return interleaved_times(
            model, spec["methods"], spec["length"], spec["batch"], device, spec["repeats"]
        )
    return measure(model, spec["method"], spec["length"], spec["batch"], device)


def _spawn(spec: dict, budget_gib: float) -> tuple[dict | None, str]:
    """Run one CPU measurement in a fresh process under a resident-memory watchdog."""
    # fixed mmap threshold: the high-water mark follows the live tensors rather than the heap's fragmentation
    # (hf_pelrp.bench's "tensors" measurement)
    result, why = run_watched_worker(__file__, spec, budget_gib, fixed_mmap_threshold=True)
    if result is None:
        return None, why
    if result.get("total_mib", 0) > budget_gib * 1024:
        return None, f"over the {budget_gib:.1f} GiB budget"
    return result, ""


class Runner:
    """Measures on CPU (a process per measurement) or on a GPU (one process, the model loaded once)."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.model = None
        if self.device.type == "cuda":
            self.model = build_model(args.model, getattr(torch, args.dtype), self.device)

    def __call__(self, method: str, length: int, budget_gib: float) -> tuple[dict | None, str]:
        args = self.args
        if self.model is None:
            spec = {
                "model": args.model,
                "device": args.device,
                "dtype": args.dtype,
                "method": method,
                "length": length,
                "batch": args.batch,
                "threads": args.threads,
            }
            return _spawn(spec, budget_gib)
        try:
            result = measure(self.model, method, length, args.batch, self.device)
        except torch.cuda.OutOfMemoryError:
            result = None
        if result is None:
            # outside the except block: the traceback no longer holds the pass's tensors
            gc.collect()
            torch.cuda.empty_cache()
            return None, "out of GPU memory"
        if result["total_mib"] > budget_gib * 1024:
            return None, f"over the {budget_gib:.1f} GiB budget"
        return result, ""


# ---- largest length that fits ----


def largest_fit(fits, lo: int, hi: int, step: int, guess: int | None = None) -> tuple[int | None, list[int]]:
    """The largest multiple of ``step`` in ``[lo, hi]`` with ``fits(length)``, assuming fits is monotone.

    ``lo`` is assumed to fit (pass the longest measured length) and is not probed; ``guess`` (a prediction)
    is probed first, then its neighbour one ``step`` away, then bisection. Returns (length, probed lengths).
    """
    lo, hi = lo // step * step, hi // step * step
    probed: list[int] = []

    def probe(length: int) -> bool:
        probed.append(length)
        return fits(length)

    if hi <= lo:
        return lo, probed
    if guess is not None:
        guess = min(max(guess // step * step, lo + step), hi)
        if probe(guess):
            lo = guess
            if guess + step <= hi and not probe(guess + step):
                return guess, probed
            lo = min(guess + step, hi) if guess + step <= hi else guess
        else:
            hi = guess - step
    while lo < hi:
        mid = (lo + hi + step) // 2 // step * step
        if probe(mid):
            lo = mid
        else:
            hi = mid - step
    return lo, probed


def _linear_guess(rows: list[dict], method: str, budget_mib: float) -> int | None:
    """Length where the measured total memory, fitted linearly in length, reaches the budget."""
    points = [(r["length"], r[method]["total_mib"]) for r in rows if r.get(method)]
    if len(points) < 2:
        return None
    (x0, y0), (x1, y1) = points[-2], points[-1]
    slope = (y1 - y0) / (x1 - x0)
    if slope <= 0:
        return None
    return int(x1 + (budget_mib - y1) / slope)


# ---- precision ----


def precision_report(args) -> list[dict]:
    """bf16 / fp16 attribution against fp32 of the same rounded weights on SmolLM2, per prompt."""
    import hf_pelrp
    from hf_pelrp.assets import load_smollm2

    device = torch.device(args.device)
    model, tokenizer = load_smollm2(dtype=torch.float32)
    model.to(device)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        model.float().load_state_dict(original)
        model.to(dtype)
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            out = hf_pelrp.attribute(model, ids)
            model.float()  # an exact up-cast: fp32 arithmetic on the same rounded weights
            ref = hf_pelrp.attribute(model, ids, target=out.target)
            model.to(dtype)  # exact again: the values are representable
            rel, r0 = out.relevance.cpu(), ref.relevance.cpu()
            norm, norm0 = rel / rel.abs().sum(), r0 / r0.abs().sum()
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "tokens": ids.shape[1],
                    "target": tokenizer.decode(out.target),
                    "relevance_rel_l1": float((rel - r0).abs().sum() / r0.abs().sum()),
                    "l1_norm_rel_diff": float(abs(rel.abs().sum() - r0.abs().sum()) / r0.abs().sum()),
                    "normalised_map_l1": float((norm - norm0).abs().sum()),
                    "logit_rel_diff": float(
                        (out.target_value - ref.target_value).abs().cpu() / ref.target_value.abs().cpu()
                    ),
                    "finite": bool(torch.isfinite(rel).all()),
                }
            )
    return rows


# ---- the table ----


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_table(rows: list[dict], methods: list[str]) -> None:
    head = ["tokens"]
    for m in methods:
        head += [f"{m} s", f"{m} MiB"]
    head += [f"{m}/{RATIOS[m]} time, mem" for m in methods if m in RATIOS and RATIOS[m] in methods]
    print(" | ".join(head))
    for r in rows:
        cells = [str(r["length"])]
        for m in methods:
            res = r.get(m)
            cells += [_fmt(res and res["time_s"], ".1f"), _fmt(res and res["peak_mib"], ".0f")]
        for m in methods:
            base = RATIOS.get(m)
            if base not in methods:
                continue
            a, b = r.get(m), r.get(base)
            if a and b:
                cells.append(f"{a['time_s'] / b['time_s']:.2f}, {a['peak_mib'] / b['peak_mib']:.2f}")
            else:
                cells.append("-")
        print(" | ".join(cells))


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=MODELS)
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--budget-gb",
        type=float,
        default=None,
        help="memory budget of one pass, weights included (default: 70%% of available memory / GPU memory)",
    )
    parser.add_argument("--search", action="store_true", help="find the largest length that fits the budget")
    parser.add_argument(
        "--time-lengths",
        type=int,
        nargs="*",
        default=[],
        help="also time all methods interleaved in one process at these lengths (median of --repeats rounds)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of --time-lengths")
    parser.add_argument("--step", type=int, default=256, help="length granularity of --search")
    parser.add_argument(
        "--search-budget-gb", type=float, default=None, help="budget of --search (default: --budget-gb)"
    )
    parser.add_argument("--max-length", type=int, default=None, help="upper end of --search")
    parser.add_argument(
        "--precision", action="store_true", help="bf16 / fp16 vs fp32 on SmolLM2 (real weights)"
    )
    parser.add_argument("--json", metavar="OUT", help="write the figures as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_gb is None:
        if args.device.startswith("cuda") and torch.cuda.is_available():
            args.budget_gb = torch.cuda.get_device_properties(torch.device(args.device)).total_memory / 2**30
        else:
            args.budget_gb = 0.7 * _mem_available_gib()
    if args.model == "llama3-8b" and not args.device.startswith("cuda"):
        parser.error("--model llama3-8b needs a GPU (16 GB of bf16 weights)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    # reuse hf_pelrp.bench's machine description (it reads mode / positional / device / dtype / threads)
    machine = _machine(argparse.Namespace(**vars(args), mode="attnlrp", no_positional=False))
    machine["model"] = args.model
    report: dict = {"machine": machine, "budget_gib": args.budget_gb, "rows": [], "largest_fit": {}}
    print(f"machine: {json.dumps(machine)}; budget {args.budget_gb:.1f} GiB", flush=True)

    def save():
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)

    runner = Runner(args)
    for length in args.lengths:
        row: dict = {"length": length, "notes": {}}
        for method in args.methods:
            result, why = runner(method, length, args.budget_gb)
            row[method] = result
            if why:
                row["notes"][method] = why
            print(f"L={length} {method}: {result if result else why}", flush=True)
        report["rows"].append(row)
        save()

    for length in args.time_lengths:
        spec = {
            "task": "time",
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "methods": args.methods,
            "length": length,
            "batch": args.batch,
            "threads": args.threads,
            "repeats": args.repeats,
        }
        if runner.model is None:
            result, why = _spawn(spec, args.budget_gb)
        else:
            result, why = (
                interleaved_times(
                    runner.model, args.methods, length, args.batch, runner.device, args.repeats
                ),
                "",
            )
        report.setdefault("interleaved_times", {})[str(length)] = result or why
        print(f"interleaved times L={length}: {result or why}", flush=True)
        save()

    if args.search:
        limit = args.max_length or build_limit(args)
        budget = args.search_budget_gb or args.budget_gb
        report["search_budget_gib"] = budget
        for method in args.methods:
            measured = [r for r in report["rows"] if r.get(method)]
            within = [r["length"] for r in measured if r[method]["total_mib"] <= budget * 1024]
            lo = max(within, default=args.step)
            guess = _linear_guess(measured, method, budget * 1024)
            probes: dict[int, dict | None] = {}

            def fits(length, method=method, probes=probes):
                result, _ = runner(method, length, budget)
                probes[length] = result
                report["largest_fit"][method] = {"probes": {str(k): v for k, v in probes.items()}}
                save()  # a search stopped at a time limit keeps its probes
                print(f"search {method} L={length}: {'fits' if result else 'does not fit'}", flush=True)
                return result is not None

            if within or fits(lo):
                best, probed = largest_fit(fits, lo, limit, args.step, guess)
            else:  # not even the shortest length fits
                best, probed = None, [lo]
            report["largest_fit"][method] = {
                "length": best,
                "model_max_positions": limit,
                "guess": guess,
                "probes": {str(k): v for k, v in probes.items()},
            }
            print(f"largest length that fits, {method}: {best} (probed {probed}, limit {limit})", flush=True)
            save()

    if args.precision:
        report["precision"] = precision_report(args)
        for r in report["precision"]:
            print(json.dumps(r), flush=True)
        save()

    _print_table(report["rows"], args.methods)
    return 0


def build_limit(args) -> int:
    """The model's maximum number of positions (longer inputs are refused by ``hf_pelrp.attribute``)."""
    config = SMOLLM2_CONFIG if args.model.startswith("smollm2") else LLAMA3_8B_CONFIG
    return config["max_position_embeddings"]


if __name__ == "__main__":
    sys.exit(main())
