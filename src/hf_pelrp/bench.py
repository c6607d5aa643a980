"""Cost of one PE-LRP attribution against one plain Gradient x Input pass on SmolLM2-135M-Instruct.

``--model llama-4x256`` measures a 4-layer LLaMA 256 wide with random weights (no download) instead: at short
inputs (``--lengths 128 --batches 1``) its forward takes milliseconds, so the ratio shows the fixed work of
each attribution (rules set up, checks, hooks) rather than the arithmetic.

Both methods run on the same model, inputs and attention kernel (SDPA), with the parameters frozen and only
the explained position sent through the LM head (``logits_to_keep``); the baseline seeds the same arg-max
logit and back-propagates to ``inputs_embeds``. The table gives, per sequence length and batch size, the
median wall time and the peak extra memory of each method and their ratios.

Time: one warm-up pass per method, then ``--repeats`` rounds that run both methods back to back (alternating
which goes first), median per method. Interleaving matters on a shared machine: a burst of load from other
processes hits both methods instead of one. ``--clock cpu`` times by the process's CPU time instead of the wall
clock: with ``--threads 1`` on a crowded CPU it is the only clock other processes do not inflate.

Memory on CPU: every measurement runs in a fresh subprocess that loads the model, builds the inputs, pages
in the memory-mapped weights with a short no-grad forward, returns freed heap pages to the OS
(``malloc_trim``), reads its resident set size (``VmRSS``), resets the kernel's high-water mark
(``echo 5 > /proc/self/clear_refs``), runs one pass and reads the high-water mark (``VmHWM``). Peak extra
memory = ``VmHWM - VmRSS before the pass``: what the operating system had to provide, and nothing earlier in
the process (model loading, a previous measurement, the other method's cached blocks) leaks into it.

Resident memory also counts glibc heap fragmentation, which depends on allocation order more than on what is
alive: glibc raises its mmap threshold as blocks are freed, after which medium-sized tensors share heap
pages that cannot be returned while any neighbour lives (measured: one PE-LRP pass at 256 tokens peaked at
406 MiB with the default allocator settings and at 241 MiB with a fixed threshold, for the same live tensors).
So each method is measured twice: with ``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor of 64 KiB or more is its
own mapping, unmapped when freed: the peak then follows the live tensors, the algorithm's memory; the "MiB"
and "mem ratio" columns) and with the default allocator (what a user sees; the "RSS ratio" column). The
default allocator's peak varies between identical fresh processes by up to about 20% (measured: RSS ratios of
0.81-1.25 for one configuration in single runs; at 128 tokens on SmolLM2, 8 fresh processes each peaked at
143-163 MiB for GxI and 111-182 MiB for PE-LRP), so that column is the median of ``--memory-repeats`` fresh
processes per method (5 by default: with 3, the 128-token ratio came out anywhere between 1.16 and 1.45).
Before each memory measurement every worker makes one short call (8 tokens) of its method: the per-call memory is measured, not what hf_pelrp does once per model (its structural
and norm-surrogate checks, remembered per model); the baseline gets the same warm-up.

torch's profiler was the alternative: it reports allocations per operator, but not a peak over the pass (it
would have to be re-summed from the event timeline, which misses memory freed by the autograd engine outside
profiled operators). On CUDA the fresh process uses ``torch.cuda.max_memory_allocated()`` minus the
allocation before the pass (the caching allocator has no fragmentation question for this purpose).

A parent-side watchdog kills a worker whose resident memory exceeds ``--max-memory-gb`` (default 50% of the
memory available at start) and reports that configuration as not measured: the machine is shared.

Run ``hf-pelrp bench --help`` (or ``python -m hf_pelrp.bench --help``, or the thin caller
``scripts/bench_attribution.py``) for the options; ``make bench`` runs the default grid. The workers run as
``python -m hf_pelrp.bench --worker SPEC``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("gradient_x_input", "pe_lrp")
MODELS = ("smollm2", "llama-4x256")
_TITLES = {"smollm2": "SmolLM2-135M", "llama-4x256": "LLaMA 4 layers x 256 (random)"}


# ---- the two methods ----


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    # attribute() freezes the parameters too: no weight gradients in either method
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gradient_x_input(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Plain Gradient x Input of the arg-max next-token logit at the last position, [B, T]."""
    from hf_pelrp.heads import last_token_positions
    from hf_pelrp.inputs import causal_position_ids

    positions = last_token_positions(attention_mask)
    with _frozen(model), torch.enable_grad():
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        logits = model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=causal_position_ids(attention_mask),
            logits_to_keep=positions[:, None],
        ).logits[:, 0]
        target = logits.detach().argmax(-1)
        seed = logits.gather(1, target[:, None]).squeeze(1)
        torch.autograd.backward(seed.sum(), inputs=[embeds])
    return (embeds.detach() * embeds.grad).sum(-1)


def pe_lrp(model, input_ids, attention_mask, mode: str = "attnlrp", positional: bool = True):
    """One ``hf_pelrp.attribute`` call (arg-max next token at the last position)."""
    import hf_pelrp

    return hf_pelrp.attribute(
        model, input_ids, attention_mask, config=hf_pelrp.LRPConfig(mode=mode, positional=positional)
    )


# ---- one worker process: one measurement ----


def _status_kib(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _trim_heap() -> None:
    gc.collect()
    # not glibc: freed pages may stay resident and the baseline is then a little high
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(name: str, dtype: torch.dtype) -> torch.nn.Module:
    """The benchmarked model: SmolLM2 (converted once by the parent), or the small random LLaMA."""
    if name == "llama-4x256":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=4096,
            max_position_embeddings=4096,
            attn_implementation="sdpa",
        )
        return LlamaForCausalLM(config).to(dtype).eval()
    from hf_pelrp.assets import load_smollm2

    model, _ = load_smollm2(dtype=dtype, attn_implementation="sdpa")
    return model


def _worker(spec: dict) -> dict:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    model = _load(spec.get("model", "smollm2"), dtype)
    model.to(device)
    generator = torch.Generator().manual_seed(spec["seed"])
    # token ids of the ordinary vocabulary (SmolLM2's first ids are special tokens)
    input_ids = torch.randint(
        100, model.config.vocab_size, (spec["batch"], spec["length"]), generator=generator
    )
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        # page in the weights (safetensors are memory-mapped: untouched pages are not resident yet, and the
        # first pass would count the whole model as its own memory) and initialise the kernels
        model(input_ids[:, :8])
    runs = {
        "gradient_x_input": lambda: gradient_x_input(model, input_ids, mask),
        "pe_lrp": lambda: pe_lrp(model, input_ids, mask, spec["mode"], spec["positional"]),
    }
    out: dict = {}
    if spec["task"] == "memory":
        run = runs[spec["method"]]
        # the per-call memory: one short call of the method first (8 tokens), so that what a method does once
        # per model (hf_pelrp's structural and norm-surrogate checks, both remembered per model) is not counted
        # as the memory of every call; the baseline gets the same warm-up
        short = input_ids[:, :8], mask[:, :8]
        if spec["method"] == "gradient_x_input":
            gradient_x_input(model, *short)
        else:
            pe_lrp(model, *short, spec["mode"], spec["positional"])
        _trim_heap()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            result = run()
            _sync(device)
            out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            base = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            result = run()
            out["peak_mib"] = (_status_kib("VmHWM") - base) / 1024
        del result
    else:
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        for method in METHODS:  # warm-up: lazy initialisation, kernel selection, allocator growth
            runs[method]()
        # the process's CPU time is what a crowded machine cannot inflate (meaningful with --threads 1 on CPU)
        clock = time.process_time if spec.get("clock") == "cpu" else time.perf_counter
        for r in range(spec["repeats"]):
            order = METHODS if r % 2 == 0 else METHODS[::-1]
            for method in order:
                _sync(device)
                start = clock()
                runs[method]()
                _sync(device)
                times[method].append(clock() - start)
        out["times"] = times
    return out


# ---- the parent: grid, watchdog, table ----


def _mem_available_gib() -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def _memory_key(method: str, kind: str) -> str:
    return f"{method}_peak_mib" if kind == "tensors" else f"{method}_rss_peak_mib"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def _estimate_mib(rows: list[dict], key: str, batch: int, length: int) -> float | None:
    """Peak memory extrapolated linearly in the token count from the longest measured row of this batch."""
    measured = [r for r in rows if r["batch"] == batch and r.get(key)]
    if not measured:
        return None
    ref = max(measured, key=lambda r: r["length"])
    return ref[key] * length / ref["length"]


#: how a worker of this module is started: the module, not a file path
WORKER = ("-m", "hf_pelrp.bench")


def run_watched_worker(
    script: str | tuple[str, ...], spec: dict, limit_gib: float, fixed_mmap_threshold: bool
) -> tuple[dict | None, str]:
    """Run ``script --worker SPEC`` in a fresh process, killed if its resident memory passes ``limit_gib``;
    (its JSON result, "") or (None, why it was not measured). ``script`` is a file path or the interpreter
    arguments that name a module (:data:`WORKER`). Shared by the benchmark scripts."""
    env = dict(os.environ)
    # the worker imports hf_pelrp from where this process did (a source checkout without installation too)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if fixed_mmap_threshold:
        # glibc: every block >= 64 KiB is its own mapping, unmapped on free: RSS follows the live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.Popen(
        [sys.executable, *([os.path.abspath(script)] if isinstance(script, str) else script)]
        + ["--worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    while proc.poll() is None:
        rss = 0
        with contextlib.suppress(OSError, RuntimeError):  # the process may be exiting
            rss = _status_kib("VmRSS", str(proc.pid))
        if rss > limit_gib * 2**20:
            proc.kill()
            proc.wait()
            return None, f"over the {limit_gib:.1f} GiB memory budget"
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        return None, f"worker failed (exit {proc.returncode}): {tail[0]}"
    return json.loads(stdout.strip().splitlines()[-1]), ""


def _run_worker(spec: dict, limit_gib: float, fixed_mmap_threshold: bool = False) -> tuple[dict | None, str]:
    """Run one measurement in a fresh process; (result, "") or (None, why it was not measured)."""
    return run_watched_worker(WORKER, spec, limit_gib, fixed_mmap_threshold)


def _machine(args) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import transformers

    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    info = {
        "commit": commit,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "mode": args.mode,
        "positional": not args.no_positional,
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048], help="sequence lengths")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (median)")
    parser.add_argument(
        "--memory-repeats",
        type=int,
        default=5,
        help="fresh processes per method for the default allocator's resident peak (median; 1: one process)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.add_argument("--model", default="smollm2", choices=MODELS, help="the benchmarked model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="time by the wall clock, or by this process's CPU time (CPU, --threads 1, on a shared machine)",
    )
    parser.add_argument("--mode", default="attnlrp", choices=["attnlrp", "cp"])
    parser.add_argument("--no-positional", action="store_true", help="benchmark the AttnLRP baseline rules")
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="kill a worker above this resident size (default: 50%% of the memory available at start)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--from-json", metavar="IN", help="print the table of a saved --json run, measure nothing"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("lengths", "batches"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name} must be positive integers")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _measure(args, console) -> dict:
    """Run the grid; returns ``{"machine", "settings", "rows"}`` (also written to ``--json`` row by row)."""
    from hf_pelrp.assets import smollm2_checkpoint

    if args.model == "smollm2":
        smollm2_checkpoint()  # convert once here, not inside a timed worker
    limit = args.max_memory_gb or 0.5 * _mem_available_gib()
    machine = _machine(args)
    console.print(f"machine: {json.dumps(machine)}; worker memory budget {limit:.1f} GiB")
    base = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "mode": args.mode,
        "positional": not args.no_positional,
        "seed": args.seed,
        "repeats": args.repeats,
        "clock": args.clock,
    }
    rows: list[dict] = []
    report = {"machine": machine, "settings": base, "rows": rows}
    for batch in args.batches:
        for length in args.lengths:
            row: dict = {"length": length, "batch": batch, "notes": []}
            for kind in _memory_kinds(args.device):
                for method in METHODS:
                    key = _memory_key(method, kind)
                    row[key] = None
                    estimate = _estimate_mib(rows, key, batch, length)
                    if estimate is not None and estimate > limit * 1024:
                        # not started: linear in tokens from the longest measured input of this batch size
                        row["notes"].append(
                            f"{key}: estimated {estimate / 1024:.1f} GiB > {limit:.1f} GiB budget"
                        )
                        continue
                    spec = {**base, "task": "memory", "method": method, "length": length, "batch": batch}
                    # the default allocator's peak varies from process to process by tens of percent (heap
                    # fragmentation depends on allocation order): the median of several fresh processes
                    runs = args.memory_repeats if kind == "rss" else 1
                    peaks = []
                    for _ in range(runs):
                        result, why = _run_worker(spec, limit, fixed_mmap_threshold=kind == "tensors")
                        if not result:
                            row["notes"].append(f"{key}: {why}")
                            break
                        peaks.append(result["peak_mib"])
                    else:
                        row[key] = statistics.median(peaks)
            if not row["notes"]:
                result, why = _run_worker({**base, "task": "time", "length": length, "batch": batch}, limit)
                for method in METHODS:
                    row[f"{method}_times_s"] = result["times"][method] if result else None
                if why:
                    row["notes"].append(f"time: {why}")
            rows.append(row)
            _derive(row)
            console.print(
                f"L={length} B={batch}: time ratio {_fmt(row['time_ratio'], '.2f')}, memory ratio "
                f"{_fmt(row['tensors_memory_ratio'], '.2f')} {'; '.join(row['notes'])}"
            )
            if args.json:  # after every row: a long run that is stopped keeps what it measured
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(report, f, indent=2)
    return report


def _memory_kinds(device: str) -> tuple[str, ...]:
    # CPU: live tensor memory (fixed mmap threshold) and what the default allocator takes (see the docstring)
    return ("tensors", "rss") if device == "cpu" else ("tensors",)


def _derive(row: dict) -> None:
    """Medians, ratios and memory per token of one row (from its raw times and peaks)."""
    for method in METHODS:
        times = row.get(f"{method}_times_s")
        row[f"{method}_time_s"] = statistics.median(times) if times else None
        row[f"{method}_min_time_s"] = min(times) if times else None
    row["time_ratio"] = _ratio(row["pe_lrp_time_s"], row["gradient_x_input_time_s"])
    # the fastest run is the least disturbed by other processes on a shared machine
    row["min_time_ratio"] = _ratio(row["pe_lrp_min_time_s"], row["gradient_x_input_min_time_s"])
    for kind in ("tensors", "rss"):
        row[f"{kind}_memory_ratio"] = _ratio(
            row.get(_memory_key("pe_lrp", kind)), row.get(_memory_key("gradient_x_input", kind))
        )
    lrp_mib = row.get(_memory_key("pe_lrp", "tensors"))
    row["pe_lrp_kib_per_token"] = lrp_mib * 1024 / (row["batch"] * row["length"]) if lrp_mib else None


def _render(report: dict, console, markdown: bool) -> None:
    settings = report["settings"]
    columns = [
        "seq len",
        "batch",
        "GxI s",
        "PE-LRP s",
        "time ratio",
        "min-time ratio",
        "GxI MiB",
        "PE-LRP MiB",
    ]
    columns += ["mem ratio", "RSS ratio", "PE-LRP KiB/token"]
    body = []
    for r in report["rows"]:
        _derive(r)
        body.append(
            [
                str(r["length"]),
                str(r["batch"]),
                _fmt(r["gradient_x_input_time_s"], ".4f"),
                _fmt(r["pe_lrp_time_s"], ".4f"),
                _fmt(r["time_ratio"], ".2f"),
                _fmt(r["min_time_ratio"], ".2f"),
                _fmt(r.get(_memory_key("gradient_x_input", "tensors")), ".0f"),
                _fmt(r.get(_memory_key("pe_lrp", "tensors")), ".0f"),
                _fmt(r["tensors_memory_ratio"], ".2f"),
                _fmt(r["rss_memory_ratio"], ".2f"),
                _fmt(r["pe_lrp_kib_per_token"], ".0f"),
            ]
        )
    title = (
        f"PE-LRP ({settings['mode']}, positional={settings['positional']}) vs Gradient x Input (GxI), "
        f"{_TITLES[settings.get('model', 'smollm2')]}, {settings['device']}, {settings['dtype']}"
    )
    if markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---:|" * len(columns))
        for cells in body:
            print("| " + " | ".join(cells) + " |")
    else:
        from rich.table import Table

        table = Table(title=title)
        for name in columns:
            table.add_column(name, justify="right")
        for cells in body:
            table.add_row(*cells)
        console.print(table)
    for r in report["rows"]:
        for note in r["notes"]:
            console.print(f"L={r['length']} B={r['batch']}: not measured: {note}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    from rich.console import Console

    console = Console(width=max(Console().width, 120))
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            report = json.load(f)
        console.print(f"machine: {json.dumps(report['machine'])}")
    else:
        report = _measure(args, console)
    _render(report, console, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
