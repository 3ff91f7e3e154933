"""Times hf_flamingo against OpenFlamingo 2.0.1 (same weights, same process) on CPU, and writes RESULTS.md.

Also times transformers' IDEFICS (`IdeficsForVisionText2Text`, matched shapes, random weights) and hf_flamingo
compiled (static cache + `torch.compile`) beside them.

Workloads: W1 4-shot captioning (beam search), W2 2-shot VQA batch (greedy, 5 and 20 new tokens), W3 one training
step, W4 per-token decode time against the bare language model. See benchmarks/README.md.

Run: `python benchmarks/run_benchmarks.py` (real SmolLM2-135M + ViT-B/16-shaped tower, several minutes) or
`python benchmarks/run_benchmarks.py --config tiny --repeats 1 --warmup 0` (a smoke run, well under a minute).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fresh inductor cache, so that the reported compile times are cold (not reusing an earlier run's kernels or
# autotuning results); removed at exit.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hf_flamingo_benchmark_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

BENCHMARKS_DIR = Path(__file__).resolve().parent
if str(BENCHMARKS_DIR) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS_DIR))

import report  # noqa: E402
import workloads  # noqa: E402
from setups import CONFIGS, REPO_ROOT, build_setup  # noqa: E402

WORKLOADS = ("W1", "W2", "W3", "W4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark hf_flamingo against OpenFlamingo 2.0.1 (same weights, same process, CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config",
        choices=CONFIGS,
        default="openflamingo-3b-like",
        help="openflamingo-3b-like: real SmolLM2-135M (30 layers), cross-attention every layer, random ViT-B/16 "
        "open_clip tower at 224 px; tiny: tiny random Llama + tiny open_clip ViT (smoke test)",
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS)
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model and workload")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per model and workload")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--output", type=Path, default=BENCHMARKS_DIR / "RESULTS.md", help="markdown report to write")
    parser.add_argument("--json", type=Path, default=None, help="also write every number as JSON to this path")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the compiled column (static cache + torch.compile; compiling takes minutes on a 2-core CPU)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--logits-tolerance",
        type=float,
        default=1e-3,
        help="abort if the two models' logits on the W1 prompt differ by more than this",
    )
    args = parser.parse_args(argv)
    selected = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(selected) - set(WORKLOADS))
    if unknown or not selected:
        parser.error(f"--workloads: unknown {unknown}; choose from {','.join(WORKLOADS)}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    args.workloads = [w for w in WORKLOADS if w in selected]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*No pretrained weights loaded.*")
    command = "python benchmarks/run_benchmarks.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    with tempfile.TemporaryDirectory(prefix="hf_flamingo_bench_") as directory:
        print(f"Building `{args.config}` (OpenFlamingo oracle, converted hf_flamingo, bare LM) ...", flush=True)
        setup = build_setup(args.config, Path(directory), seed=args.seed, log=lambda m: print(m, flush=True))
    print(f"  built in {setup.build_seconds:.1f} s", flush=True)
    for key, value in setup.description.items():
        print(f"  {key}: {value}")

    logits_diff = workloads.logits_max_abs_diff(setup, workloads.w1_inputs(setup))
    print(f"Logits on the W1 prompt: max |hf_flamingo - OpenFlamingo| = {logits_diff:.3e}", flush=True)
    if not logits_diff <= args.logits_tolerance:
        print(f"ERROR: the models differ by more than --logits-tolerance={args.logits_tolerance}", file=sys.stderr)
        return 1

    def log(message: str) -> None:
        print(message, flush=True)

    results = {}
    compile = not args.no_compile
    for workload in args.workloads:
        t0 = time.perf_counter()
        if workload == "W1":
            log("W1: 4-shot captioning, batch 1, 3 beams, 20 new tokens (+ floor: bare LM, image features)")
            results["W1"] = workloads.run_w1(setup, args.repeats, args.warmup, log, compile=compile)
        elif workload == "W2":
            for new_tokens in (5, 20):
                log(f"W2: 2-shot VQA, batch 8, greedy, {new_tokens} new tokens")
                results[f"W2-{new_tokens}"] = workloads.run_w2(
                    setup, new_tokens, args.repeats, args.warmup, log, compile=compile
                )
        elif workload == "W3":
            log("W3: training step, batch 4 x 128 tokens, 2 images per sample")
            results["W3"] = workloads.run_w3(setup, args.repeats, args.warmup, log)
        elif workload == "W4":
            log("W4: per-token decode time (21 vs 1 new tokens), batch 1, greedy")
            results["W4"] = workloads.run_w4(setup, args.repeats, args.warmup, log, compile=compile)
        log(f"  ({time.perf_counter() - t0:.1f} s)")

    print()
    print(report.summary_table(results))
    print()
    for target, required, measured, verdict in report.acceptance(results):
        print(f"  {target:<32} {required:<52} {measured:<22} {verdict}")
    for check, value in report.sanity_rows(results, logits_diff):
        print(f"  {check}: {value}")
    if "W1" in results:
        print(
            f"  W1 floor {results['W1']['floor_s']:.3f} s; hf_flamingo W1 / floor = {results['W1']['ours_over_floor']:.2f}x"
            f"; with the bare LM on oneDNN products {results['W1']['floor_same_kernels_s']:.3f} s, "
            f"{results['W1']['ours_over_floor_same_kernels']:.2f}x"
        )
    if "W4" in results:
        w4 = results["W4"]
        steps = ", ".join(f"{name} {value * 1e3:.2f} ms" for name, value in w4["per_token_s"].items())
        print(f"  W4 per-token: {steps}; FLOP ratio {w4['flops']['flop_ratio']:.3f}")

    for warning in report.contention_warnings(results, args.threads):
        print(f"  WARNING: {warning}")
    total = time.perf_counter() - start
    machine = report.machine_info()
    machine["1-min load average at start / end"] = f"{load_at_start:.2f} / {os.getloadavg()[0]:.2f}"
    versions = report.versions(REPO_ROOT)
    report.write_markdown(
        args.output,
        results=results,
        args=vars(args),
        command=command,
        machine=machine,
        versions_info=versions,
        config=setup.description,
        logits_diff=logits_diff,
        build_seconds=setup.build_seconds,
        total_seconds=total,
    )
    print(f"\nWrote {args.output} ({total:.1f} s in all)")
    if args.json is not None:
        payload = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine,
            "versions": versions,
            "config": setup.description,
            "logits_max_abs_diff": logits_diff,
            "results": {key: workloads.stats_as_dict(value) for key, value in results.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
