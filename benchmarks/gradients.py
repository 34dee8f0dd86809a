"""Benchmark: per-sample gradients by `PerSampleGradients` against an autograd loop and the floor.

For each model (the default digits UNet "tiny" at 1×8×8, the DDPM CIFAR-10 UNet at 3×32×32) and
one batch of B items with S = 1 noise draw each, it times

- (a) extractor:  `PerSampleGradients.__call__` with its default engine, layerwise (one batched
  backward to the layer outputs, per-sample weight gradients per layer) → [B, dim];
- (a') vmap:      the same call with engine "vmap" (torch.func vmap(grad)) → the same [B, dim];
- (b) loop:       `PerSampleGradients.loop`, one autograd backward per item (what the official
  ReTrac code does) → the same [B, dim];
- (c) floor:      one batched mean-loss forward + backward with plain autograd on the model as
  built (fused attention): it yields only the summed gradient, the least any method can cost;
- (d) projection: the sparse sketch of [B, dim] gradients to k features (the CPU default), and,
  with --dense, the dense Rademacher projection for the tiny model only;

and reports time per sample (min and median over --rounds × --repeats timed calls, each round a
fresh process with one warm-up; rounds interleave the methods, so a slow spell of a shared
machine hits them alike and the min stays a fair estimate), the ratios b/a
(speed-up, target ≥ 4×), a/c (overhead over the floor, target ≤ 1.5×) and d/a (projection vs
gradient, target ≤ 1×) for the default engine, the same for vmap (a'), and the peak memory each
method adds.

Every (model, method) runs in a fresh subprocess, so no method inherits another's caches or
allocator state. Memory is the peak a method adds over what its process holds once the model and
inputs are set up (the extractor's model copy included): on CUDA ``max_memory_allocated`` minus
the memory allocated at the start (tensors only, not the allocator's cache); on the CPU the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus its resident set
(VmRSS) at the start. Both windows include the warm-up call.

    .venv/bin/python benchmarks/gradients.py --quick               # validate the script (seconds)
    .venv/bin/python benchmarks/gradients.py --json reports/bench.json
    .venv/bin/python benchmarks/gradients.py --device cuda --models cifar --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffattr.devices import resolve_device
from diffattr.diffusion.model import build_unet, predict_eps, unet_config
from diffattr.diffusion.schedule import add_noise, build_scheduler
from diffattr.diffusion.task import per_sample_loss
from diffattr.gradients.engines import PerSampleGradients
from diffattr.gradients.projection import make_projector

# Benchmark model name → (UNet topology, image shape (C, H, W)).
MODELS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "tiny": ("tiny", (1, 8, 8)),
    "cifar": ("ddpm_cifar10", (3, 32, 32)),
}
# Default batch per model and device type.
DEFAULT_BATCH = {
    ("tiny", "cpu"): 64,
    ("cifar", "cpu"): 8,
    ("tiny", "cuda"): 64,
    ("cifar", "cuda"): 64,
}

LABELS = {
    "extractor": "(a) extractor, layerwise",
    "vmap": "(a') extractor, vmap(grad)",
    "loop": "(b) autograd loop per item",
    "floor": "(c) floor: batched mean loss",
    "sparse": "(d) sparse sketch projection",
    "rademacher": "(d) dense rademacher proj.",
}

TARGET_SPEEDUP = 4.0  # b/a at least
TARGET_OVERHEAD = 1.5  # a/c at most
TARGET_PROJECTION = 1.0  # d/a at most

MIB = 2**20


# ---- measuring, inside a worker process --------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory allocated between `start()` and `peak()`, over what was held at `start()`.

    CUDA: `torch.cuda.max_memory_allocated` − allocated at start (bytes of tensors).
    CPU: VmHWM − VmRSS at start (bytes resident), after resetting VmHWM to the current resident
    set by writing 5 to /proc/self/clear_refs; `hwm_reset` is False where that was refused, and
    the peak may then be the setup's.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.hwm_reset = True

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.hwm_reset = False
        self.base = _proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _proc_status_bytes("VmHWM") - self.base


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _method_fn(spec: dict, device: torch.device) -> tuple[Callable[[], object], int]:
    """Set up one method on one model and batch; returns (the call to time, parameter count)."""
    unet, shape = MODELS[spec["model"]]
    batch = spec["batch"]
    model = build_unet(unet_config(unet, shape), seed=0).to(device)
    dim = sum(p.numel() for p in model.parameters())
    abar = build_scheduler().alphas_cumprod.to(device, torch.float32)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, *shape, generator=gen) * 2 - 1).to(device)
    t = torch.randint(0, len(abar), (batch,), generator=gen).to(device)
    eps = torch.randn(batch, 1, *shape, generator=gen).to(device)  # [B, S = 1, C, H, W]
    method = spec["method"]

    if method in ("extractor", "vmap", "loop"):
        engine = "vmap" if method == "vmap" else "auto"
        psg = PerSampleGradients(
            model, abar, chunk_size=spec["chunk_size"], device=device, engine=engine
        )
        del model
        if method != "loop":
            return (lambda: psg(x0, t, eps)), dim
        return (lambda: psg.loop(x0, t, eps)), dim

    if method == "floor":
        eps1 = eps[:, 0]

        def step() -> None:
            model.zero_grad(set_to_none=True)
            x_t = add_noise(x0, eps1, t, abar)
            per_sample_loss(predict_eps(model, x_t, t), eps1).mean().backward()

        return step, dim

    if method in ("sparse", "rademacher"):
        del model
        # The projections' work does not depend on the values, so stand-in gradients serve.
        dev_gen = torch.Generator(device).manual_seed(1)
        grads = torch.randn(batch, dim, generator=dev_gen, device=device)
        projector = make_projector(method, dim, spec["proj_dim"], seed=0)
        return (lambda: projector(grads)), dim

    raise ValueError(f"unknown method {method!r}; choose one of {list(LABELS)}")


def run_worker(spec: dict) -> dict:
    """Time one method on one model (warm-up once, then `repeats` calls); measure its memory."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    fn, dim = _method_fn(spec, device)
    memory = PeakMemory(device)
    memory.start()
    warmup_s = _timed(fn, device)
    times = [_timed(fn, device) for _ in range(spec["repeats"])]
    peak = memory.peak()
    batch = spec["batch"]
    return {
        **spec,
        "dim": dim,
        "warmup_s": warmup_s,
        "times_s": times,
        "min_s": min(times),
        "median_s": statistics.median(times),
        "per_sample_min_ms": 1e3 * min(times) / batch,
        "per_sample_median_ms": 1e3 * statistics.median(times) / batch,
        "peak_bytes": peak,
        "hwm_reset": memory.hwm_reset,
        "torch_threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


# ---- orchestrating, in the main process --------------------------------------------------------


def run_in_subprocess(spec: dict) -> dict:
    """Run `run_worker(spec)` in a fresh Python process; its result is the last stdout line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**spec, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_rounds(runs: list[dict]) -> dict:
    """One method's rounds as one result: all timed calls pooled, the largest memory peak."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    times = [t for r in runs for t in r["times_s"]]
    batch = runs[0]["batch"]
    return {
        **runs[0],
        "rounds": len(runs),
        "warmup_s": max(r["warmup_s"] for r in runs),
        "times_s": times,
        "min_s": min(times),
        "median_s": statistics.median(times),
        "per_sample_min_ms": 1e3 * min(times) / batch,
        "per_sample_median_ms": 1e3 * statistics.median(times) / batch,
        "peak_bytes": max(r["peak_bytes"] for r in runs),
        "hwm_reset": all(r["hwm_reset"] for r in runs),
    }


def machine_info() -> dict:
    """CPU model, core counts, torch version (GPU name and threads come from the workers)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def memory_description(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "peak CUDA memory a method adds: torch.cuda.max_memory_allocated minus memory "
            "allocated once model and inputs are set up (tensors only), warm-up included"
        )
    return (
        "peak resident memory a method adds in its own fresh process: VmHWM minus VmRSS once "
        "model and inputs are set up (HWM reset via /proc/self/clear_refs), warm-up included"
    )


def ratio_lines(results: list[dict]) -> tuple[list[str], list[dict]]:
    """The b/a, a/c and d/a lines with PASS/MISS (from min times; medians in brackets)."""
    by_key = {(r["model"], r["method"]): r for r in results if "error" not in r}
    checks = [
        ("speed-up over the loop", "b/a", "loop", "extractor", ">=", TARGET_SPEEDUP),
        ("overhead over the floor", "a/c", "extractor", "floor", "<=", TARGET_OVERHEAD),
        ("vmap: speed-up over the loop", "b/a'", "loop", "vmap", ">=", TARGET_SPEEDUP),
        ("vmap: overhead over the floor", "a'/c", "vmap", "floor", "<=", TARGET_OVERHEAD),
        ("sparse projection vs gradient", "d/a", "sparse", "extractor", "<=", TARGET_PROJECTION),
        ("dense projection vs gradient", "d/a", "rademacher", "extractor", "<=", TARGET_PROJECTION),
    ]
    lines, records = [], []
    models = list(dict.fromkeys(r["model"] for r in results))
    for model in models:
        for name, symbol, num, den, op, target in checks:
            a, b = by_key.get((model, num)), by_key.get((model, den))
            if a is None or b is None:
                continue
            value = a["min_s"] / b["min_s"]
            median = a["median_s"] / b["median_s"]
            ok = value >= target if op == ">=" else value <= target
            verdict = "PASS" if ok else "MISS"
            goal = f"target {'≥' if op == '>=' else '≤'} {target:g}×"
            lines.append(
                f"{model:<6} {name:<30} {symbol:<4} = {value:7.2f}×  (median {median:6.2f}×)  "
                f"{goal:<14} {verdict}"
            )
            records.append(
                {
                    "model": model,
                    "ratio": symbol,
                    "numerator": num,
                    "denominator": den,
                    "value_min": value,
                    "value_median": median,
                    "target": f"{op} {target}",
                    "pass": ok,
                }
            )
    return lines, records


def format_table(results: list[dict]) -> list[str]:
    header = (
        f"{'model':<6} {'params':>7} {'B':>4}  {'method':<29} {'min ms/sample':>13} "
        f"{'median ms/sample':>16} {'warm-up s':>9} {'peak MiB':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        prefix = f"{r['model']:<6} "
        if "error" in r:
            lines.append(f"{prefix}{'':>7} {r['batch']:>4}  {LABELS[r['method']]:<29} {r['error']}")
            continue
        flag = "" if r["hwm_reset"] else "*"
        lines.append(
            f"{prefix}{r['dim'] / 1e6:6.2f}M {r['batch']:>4}  {LABELS[r['method']]:<29} "
            f"{r['per_sample_min_ms']:13.3f} {r['per_sample_median_ms']:16.3f} "
            f"{r['warmup_s']:9.2f} {r['peak_bytes'] / MIB:8.1f}{flag}"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="items per batch for every model (default: tiny 64; cifar 8 on CPU, 64 on CUDA)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per round, after one warm-up"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh processes per method, interleaved"
    )
    parser.add_argument("--models", default="tiny,cifar", help=f"comma list of {list(MODELS)}")
    parser.add_argument(
        "--quick", action="store_true", help="validate the script: tiny only, batch 8, repeats 1"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: as is)"
    )
    parser.add_argument("--proj-dim", type=int, default=2048, help="projected dimension k")
    parser.add_argument(
        "--dense",
        action="store_true",
        help="also time the dense rademacher projection (tiny model only)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="items per pass of the extractor engines"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.repeats, args.rounds = "tiny", 8, 1, 1
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    for name in ("batch", "repeats", "rounds", "threads", "proj_dim", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return

    device = resolve_device(args.device)
    specs = []
    for model in args.models:
        methods = ["extractor", "vmap", "loop", "floor", "sparse"]
        if args.dense and model == "tiny":
            methods.append("rademacher")
        batch = args.batch or DEFAULT_BATCH[(model, device.type)]
        for method in methods:
            specs.append(
                {
                    "model": model,
                    "unet": MODELS[model][0],
                    "image_shape": list(MODELS[model][1]),
                    "method": method,
                    "device": str(device),
                    "batch": batch,
                    "draws": 1,
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "proj_dim": args.proj_dim,
                    "chunk_size": args.chunk_size,
                }
            )

    rounds: list[list[dict]] = []
    for round_index in range(args.rounds):
        rounds.append([])
        for spec in specs:
            print(
                f"round {round_index + 1}/{args.rounds}: {spec['model']} {spec['method']} "
                f"(B={spec['batch']}) ...",
                file=sys.stderr,
            )
            rounds[-1].append(run_in_subprocess(spec))
    results = [merge_rounds(list(runs)) for runs in zip(*rounds, strict=True)]

    ok = [r for r in results if "error" not in r]
    machine = machine_info()
    machine["torch_threads"] = ok[0]["torch_threads"] if ok else None
    machine["device"] = str(device)
    machine["device_name"] = ok[0]["device_name"] if ok else None

    print("diffattr per-sample gradient benchmark")
    print(
        f"machine: {machine['cpu']}; {machine['logical_cores']} logical cores "
        f"({machine['usable_cores']} usable); torch {machine['torch']}, "
        f"{machine['torch_threads']} threads; device {device}"
        + (f" ({machine['device_name']})" if machine["device_name"] else "")
    )
    print(
        f"settings: S = 1 draw per item, l2 loss; {args.rounds} round(s) of a fresh process per "
        f"method, each one warm-up then {args.repeats} timed repeat(s); "
        f"projection k = {args.proj_dim}, chunk size {args.chunk_size}; "
        "each method in its own process"
    )
    print(f"memory: {memory_description(device)}")
    print("projection input: stand-in gaussian [B, dim] gradients (the work is value-free)")
    print()
    for line in format_table(results):
        print(line)
    if any(not r.get("hwm_reset", True) for r in ok):
        print("* VmHWM could not be reset: the peak may include the setup")
    for model in dict.fromkeys(r["model"] for r in ok):
        r = next(r for r in ok if r["model"] == model)
        size = r["batch"] * r["dim"] * 4
        print(f"{model}: the [B, dim] float32 gradient output is {size / MIB:.1f} MiB")
    print()
    lines, ratios = ratio_lines(results)
    print(
        "ratios of min times per sample (b: loop, a: extractor (layerwise), a': vmap, c: floor, "
        "d: projection):"
    )
    for line in lines:
        print(line)

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": "gradients",
            "machine": machine,
            "settings": {
                "models": args.models,
                "repeats": args.repeats,
                "rounds": args.rounds,
                "batch": args.batch,
                "proj_dim": args.proj_dim,
                "chunk_size": args.chunk_size,
                "threads": args.threads,
                "dense": args.dense,
                "quick": args.quick,
            },
            "memory_measure": memory_description(device),
            "results": results,
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    if len(ok) < len(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
