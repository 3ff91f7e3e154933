"""The GPU path, checked in one command: correctness on the device, memory at OpenFlamingo-9B scale in bf16 / 8-bit /
4-bit, and speed against OpenFlamingo 2.0.1 on the same weights. Writes `benchmarks/RESULTS-gpu.md` (and, with
`--json`, every number).

    python benchmarks/gpu_check.py                          # on CUDA: the full check (about 5 minutes on an H200)
    python benchmarks/gpu_check.py --tiny --device cpu      # the same code with tiny models, about a minute on a CPU

See `benchmarks/README.md` for the exact device command (wheels carried for the pinned versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
for path in (REPO_ROOT / "tests", BENCHMARKS_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from gpu_correctness import BF16_RTOL, FP32_GRAD_RTOL, FP32_RTOL, Check, run_correctness  # noqa: E402
from gpu_models import CORRECTNESS_SHAPES, PRECISIONS, build_scale_setup, one_line, scale_shape  # noqa: E402
from gpu_scale import DeviceMeter, run_memory, run_speed  # noqa: E402

SECTIONS = ("correctness", "memory", "speed")
SCALE_LOGITS_RTOL = 2e-2
"""hf_flamingo vs OpenFlamingo logits on the same bf16 weights (relative L2): both round differently."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="torch device to check (default: cuda)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models in every section (the CPU dry run; no figure is meaningful)"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default: 5; --tiny: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model before timing (default: 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled static-cache decode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=BENCHMARKS_DIR / "RESULTS-gpu.md", help="Markdown report")
    parser.add_argument("--json", type=Path, default=None, help="also write every number as JSON")
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--sections: unknown {unknown or 'empty list'}; choose from {', '.join(SECTIONS)}")
    args.sections = sections
    try:
        args.device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --tiny --device cpu for the dry run")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device}: only cuda and cpu are supported")
    if args.repeats is None:
        args.repeats = 1 if args.tiny else 5
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    for path in (args.output, args.json):
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            parser.error(f"{path}: expected a file path in an existing directory")
    return args


def environment(device: torch.device) -> dict[str, str]:
    import accelerate
    import bitsandbytes
    import peft
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "CPU threads": str(torch.get_num_threads()),
    }
    try:
        from importlib.metadata import version

        import open_flamingo  # noqa: F401

        info["open-flamingo"] = version("open-flamingo")
    except ImportError:
        info["open-flamingo"] = "not installed"
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["GPU"] = (
            f"{properties.name}, {properties.total_memory / 1024**3:.0f} GiB, capability {properties.major}.{properties.minor}"
        )
        info["CUDA (torch)"] = str(torch.version.cuda)
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    report: dict[str, Any] = {
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "environment": environment(args.device),
    }
    print(" | ".join(f"{k} {v}" for k, v in report["environment"].items()), flush=True)
    meter = DeviceMeter(args.device)

    if "correctness" in args.sections:
        checks: list[Check] = []
        for name in ("tiny", "small" if args.tiny else "mid"):
            print(f"correctness: {name} model", flush=True)
            checks += run_correctness(CORRECTNESS_SHAPES[name], args.device, log=_log)
            meter.release()
        report["correctness"] = [c.as_dict() for c in checks]

    shape = scale_shape("tiny" if args.tiny else "9b")
    if "memory" in args.sections:
        print(f"memory: {shape.description}", flush=True)
        report["memory"] = {}
        for precision in PRECISIONS:
            try:
                report["memory"][precision] = run_memory(shape, meter, precision, seed=args.seed, log=_log)
            except Exception as error:  # reported with its error; the other precisions still run
                report["memory"][precision] = {"error": one_line(error)}
                _log(f"  {precision} failed: {report['memory'][precision]['error']}")
                meter.release()

    if "speed" in args.sections:
        print(f"speed: {shape.description}, bf16, hf_flamingo vs OpenFlamingo 2.0.1 vs the bare LM", flush=True)
        start = time.perf_counter()
        setup = build_scale_setup(shape, args.device, torch.bfloat16, seed=args.seed)
        _log(f"  built in {time.perf_counter() - start:.1f} s")
        report["speed"] = {"description": setup.description}
        report["speed"].update(
            run_speed(
                setup,
                meter,
                torch.bfloat16,
                repeats=args.repeats,
                warmup=args.warmup,
                compile_decode=not args.no_compile,
                log=_log,
            )
        )
        del setup
        meter.release()

    report["total_s"] = time.perf_counter() - started
    failures = failed_checks(report)
    report["failures"] = failures
    text = render(report, args)
    args.output.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.output} in {report['total_s']:.0f} s; {len(failures)} failed check(s)", flush=True)
    for failure in failures:
        print(f"  FAILED: {failure}")
    return 1 if failures else 0


def _log(line: str) -> None:
    print(line, flush=True)


def failed_checks(report: dict[str, Any]) -> list[str]:
    failures = [
        f"[{c['group']}] {c['name']}: {c['value']}" for c in report.get("correctness", []) if c["passed"] is False
    ]
    for precision, result in report.get("memory", {}).items():
        if "error" in result:
            failures.append(f"memory {precision}: {result['error']}")
    speed = report.get("speed")
    if speed is not None:
        if not speed["logits_relative_error"] <= SCALE_LOGITS_RTOL:
            failures.append(f"speed: hf_flamingo vs OpenFlamingo logits {speed['logits_relative_error']:.2e}")
        for name, compiled in speed.get("W4 compiled", {}).items():
            if "per_token_s" not in compiled:
                failures.append(f"compiled decode of {name}: {compiled}")
            elif name == "hf_flamingo" and not compiled["compiled"]:
                failures.append(f"compiled decode of {name}: generate did not compile (cache {compiled['cache']})")
            elif compiled["same_tokens_as_eager"].split("/")[0] != compiled["same_tokens_as_eager"].split("/")[-1]:
                failures.append(f"compiled decode of {name}: tokens equal to eager {compiled['same_tokens_as_eager']}")
    return failures


# ----------------------------------------------------------------------------------------------------------------------
# Report


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# GPU check: hf_flamingo on CUDA" if args.device.type == "cuda" else f"# GPU check, dry run on {args.device}",
        "",
        f"Written by `benchmarks/gpu_check.py {' '.join(sys.argv[1:])}` in {report['total_s']:.0f} s."
        + (
            " **Tiny models: no figure below means anything; this run only proves the code path.**"
            if args.tiny
            else ""
        ),
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in report["environment"].items()),
        "",
        f"**{len(report['failures'])} failed check(s).**" + "".join(f"\n- {f}" for f in report["failures"]),
        "",
    ]
    if "correctness" in report:
        lines += _render_correctness(report["correctness"])
    if "memory" in report:
        lines += _render_memory(report["memory"])
    if "speed" in report:
        lines += _render_speed(report["speed"], args)
    return "\n".join(lines) + "\n"


def _render_correctness(checks: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Correctness on the device",
        "",
        "Two Llama + CLIP Flamingos built from configs (random weights, gates opened), two interleaved rows (3 and 2 "
        "images, left padding). References: the same weights in float32 on the CPU. Tolerances: relative L2 error "
        f"(‖x − ref‖ / ‖ref‖ over the real tokens) ≤ {FP32_RTOL:.0e} for float32 on the device with TF32 off "
        f"(gradients ≤ {FP32_GRAD_RTOL:.0e}), ≤ {BF16_RTOL:.0e} for bfloat16 weights or autocast. Cached and uncached "
        "generation must give the same tokens in float32 (in bfloat16 different kernel shapes may round a near-tie "
        "differently: reported, not judged). bitsandbytes: the language model loaded 8-bit / 4-bit NF4 by "
        "`from_backbones(..., quantization_config=..., device_map=...)`, then a QLoRA step (`flamingo_lora_config`, "
        "LoRA r=4 on q/v, the bridge in `modules_to_save`, AdamW).",
        "",
        "| model | check | measured | required | result |",
        "|---|---|---|---|---|",
    ]
    mark = {True: "pass", False: "**FAIL**", None: "info"}
    lines += [
        f"| {c['group']} | {c['name']} | {c['value']} | {c['tolerance']} | {mark[c['passed']]} |" for c in checks
    ]
    return lines + [""]


def _render_memory(memory: dict[str, Any]) -> list[str]:
    lines = [
        "## Memory at OpenFlamingo-9B scale",
        "",
        "hf_flamingo alone, built as a user composes one (`from_backbones(vision tower, language model, tokenizer)`), "
        "everything bf16 except the language model's linears in the 8-bit / 4-bit rows (lm_head stays bf16). Weights: "
        "allocated after the build; peaks: the allocator's peak during 4-shot captioning with 3 beams and 20 new "
        "tokens, and during one training step of the bridge (batch 4 × 128 tokens, 2 images each, AdamW, no "
        "gradient checkpointing). GiB = 2^30 bytes.",
        "",
        "| LM linears | weights (GiB) | model footprint (GiB) | LM footprint (GiB) | peak, 4-shot 3-beam generation "
        "(GiB) | peak, bridge training step (GiB) | trainable (M) | build (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for precision, r in memory.items():
        if "error" in r:
            lines.append(f"| {precision} | error: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {precision} | {r['weights_gib']:.3f} | {r['footprint_gib']:.3f} | "
            f"{r['language_model_footprint_gib']:.3f} | {r['generation_peak_gib']:.3f} | "
            f"{r['training_peak_gib']:.3f} | {r['trainable_parameters_m']:.1f} | {r['build_s']:.1f} |"
        )
    first = next((r for r in memory.values() if "description" in r), None)
    if first is not None:
        lines += ["", *(f"- {k}: {v}" for k, v in first["description"].items() if k != "LM linears")]
    return lines + [""]


def _render_speed(speed: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines = [
        "## Speed against OpenFlamingo 2.0.1 (same weights, bf16)",
        "",
        "One set of random weights loaded into OpenFlamingo 2.0.1 (built as its factory does, with the transformers-5 "
        "runtime patches of `tests/openflamingo_oracle.py`) and, through `convert_openflamingo_checkpoint`, into "
        "hf_flamingo; the bare LM is an untouched copy of the language model. Prompts are OpenFlamingo's evaluation "
        "prompts tokenized by the byte-level test tokenizer (more tokens per word than GPT-NeoX's). Wall-clock "
        f"medians of {args.repeats} alternating runs after {args.warmup} warm-up run(s), each between device "
        "synchronisations. Per-token latency: median interval between consecutive decoding steps within one call "
        "(a logits processor synchronises and stamps each step).",
        "",
        f"hf_flamingo vs OpenFlamingo logits, relative L2: {speed['logits_relative_error']:.2e} (required "
        f"≤ {SCALE_LOGITS_RTOL:.0e}).",
        "",
        "| workload | prompt tokens | hf_flamingo | OpenFlamingo | bare LM | speed-up vs OpenFlamingo | hf_flamingo / "
        "bare LM | same tokens as OpenFlamingo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    titles = {
        "W1": "W1: 4-shot captioning, 3 beams, 20 tokens (s)",
        "W2-5": "W2-5: batch 8 2-shot VQA, greedy, 5 tokens (s)",
        "W2-20": "W2-20: batch 8 2-shot VQA, greedy, 20 tokens (s)",
    }
    for key, title in titles.items():
        r = speed[key]
        m = r["median_s"]
        lines.append(
            f"| {title} | {r['prompt_tokens']} | {m['hf_flamingo']:.3f} | {m['OpenFlamingo']:.3f} | "
            f"{m['bare LM']:.3f} | {r['speedup_vs_openflamingo']:.2f}× | {r['ours_over_bare_lm']:.2f} | "
            f"{r['same_tokens_as_openflamingo']} |"
        )
    w4 = speed["W4"]
    p = w4["per_token_s"]
    lines.append(
        f"| W4: per-token decode, batch 1, greedy (ms) | {w4['prompt_tokens']} | {p['hf_flamingo'] * 1e3:.2f} | "
        f"{p['OpenFlamingo'] * 1e3:.2f} | {p['bare LM'] * 1e3:.2f} | {w4['speedup_vs_openflamingo']:.2f}× | "
        f"{w4['ours_over_bare_lm']:.2f} | {w4['same_tokens_as_openflamingo']} |"
    )
    lines += ["", *_render_compiled(speed.get("W4 compiled"), p)]
    lines += ["", *(f"- {k}: {v}" for k, v in speed["description"].items())]
    return lines + [""]


def _render_compiled(compiled: dict[str, Any] | None, eager_per_token: dict[str, float]) -> list[str]:
    if compiled is None:
        return ["Compiled decode: not run (`--no-compile`)."]
    lines = [
        'Compiled decode: `generate(..., cache_implementation="static", compile_config=CompileConfig(fullgraph=...))`'
        ", transformers' own compilation of the decoding steps (`fullgraph=True` first; `False` when that fails, with "
        "the error below). Same W4 measurement; compiled tokens must equal the eager ones.",
        "",
        "| model | fullgraph | per token (ms) | vs its eager decode | vs eager OpenFlamingo | first call incl. "
        "compilation (s) | tokens equal to eager |",
        "|---|---|---|---|---|---|---|",
    ]
    errors = []
    for name, r in compiled.items():
        errors += [f"- {name}, {k}: {v}" for k, v in r.items() if k.startswith("error")]
        if "per_token_s" not in r:
            lines.append(f"| {name} | failed | | | | | |")
            continue
        if not r["compiled"]:
            lines.append(f"| {name} | not compiled by transformers (its cache: {r['cache']}) | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['fullgraph']} | {r['per_token_s'] * 1e3:.2f} | "
            f"{eager_per_token[name] / r['per_token_s']:.2f}× | "
            f"{eager_per_token['OpenFlamingo'] / r['per_token_s']:.2f}× | {r['first_call_s']:.1f} | "
            f"{r['same_tokens_as_eager']} |"
        )
    return lines + ([""] + errors if errors else [])


if __name__ == "__main__":
    sys.exit(main())
