"""Correctness of the device path (`gpu_check.py`): forward, generation, training and bitsandbytes on `device`,
against the CPU float32 result of the same weights.

Every check is a `Check` row: a measured value, the tolerance it must meet, and whether it did (`None` for a value
reported as information, not judged).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_models import CorrectnessShape, build_correctness_model, correctness_batch, one_line, quantization_config
from torch import nn

from hf_flamingo import FlamingoForConditionalGeneration, flamingo_lora_config

FP32_RTOL = 1e-4
"""Device float32 (TF32 off) vs CPU float32: relative L2 error of logits and losses."""
FP32_GRAD_RTOL = 1e-3
"""Device float32 vs CPU float32: relative L2 error of the bridge's gradients (all tensors together)."""
BF16_RTOL = 3e-2
"""Device bfloat16 (weights, or autocast) vs CPU float32: relative L2 error of logits and losses."""
NEW_TOKENS = 8
BRIDGE_PREFIXES = ("perceiver.", "gated_cross_attn_layers.")


@dataclass
class Check:
    group: str
    name: str
    value: str
    tolerance: str = ""
    passed: bool | None = None
    """`None`: information, not judged."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def relative_error(value: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    value, reference = value.detach().float().cpu(), reference.detach().float().cpu()
    if mask is not None:
        value, reference = value[mask], reference[mask]
    if not torch.isfinite(value).all():
        return float("inf")
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """TF32 off for CUDA matrix products and convolutions (their defaults differ), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _on(batch: dict[str, torch.Tensor], device: torch.device, labels: bool = False) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if labels or k != "labels"}


def _generate(model: Any, batch: dict[str, torch.Tensor], device: torch.device, **kwargs: Any) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(
            **_on(batch, device),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[:, batch["input_ids"].shape[1] :].tolist()


def _logits(model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        return model(**_on(batch, device)).logits.float().cpu()


@dataclass
class TrainingStep:
    loss: float
    gradients: dict[str, torch.Tensor]
    """Bridge gradients (float32, CPU)."""
    frozen_with_gradients: list[str]
    unchanged_after_step: list[str]
    """Trainable tensors that one AdamW step left unchanged."""


def training_step(
    model: Any, batch: dict[str, torch.Tensor], device: torch.device, autocast: torch.dtype | None = None
) -> TrainingStep:
    """Forward + backward on `batch` (with labels) and one AdamW step on the trainable parameters; the model is
    restored to eval mode (its trainable weights are updated)."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    model.train()
    try:
        context = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with context:
            loss = model(**_on(batch, device, labels=True)).loss
        loss.backward()
        optimizer.step()
    finally:
        model.eval()
    gradients = {
        name: p.grad.detach().float().cpu()
        for name, p in trainable.items()
        if name.startswith(BRIDGE_PREFIXES) and p.grad is not None
    }
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    unchanged = [name for name, p in trainable.items() if torch.equal(p.detach(), before[name])]
    model.zero_grad(set_to_none=True)
    return TrainingStep(loss.item(), gradients, frozen, unchanged)


def _grads_error(step: TrainingStep, reference: TrainingStep) -> float:
    names = sorted(reference.gradients)
    if sorted(step.gradients) != names:
        return float("inf")
    value = torch.cat([step.gradients[n].flatten() for n in names])
    expected = torch.cat([reference.gradients[n].flatten() for n in names])
    return relative_error(value, expected)


def _bridge_parameter_names(model: Any) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.startswith(BRIDGE_PREFIXES)]


def _reached(step: TrainingStep, names: list[str]) -> list[str]:
    """Bridge tensors with a finite, non-zero gradient."""
    return [
        n for n in names if n in step.gradients and torch.isfinite(step.gradients[n]).all() and step.gradients[n].any()
    ]


def run_correctness(shape: CorrectnessShape, device: torch.device, log: Callable[[str], None] = print) -> list[Check]:
    """All checks for one model size on `device`."""
    group = shape.name
    checks: list[Check] = []
    reference = build_correctness_model(shape)
    reference.freeze_backbones()
    batch = correctness_batch(shape)
    real = batch["attention_mask"].bool()
    cpu = torch.device("cpu")
    log(f"  [{group}] CPU float32 reference")
    reference_logits = _logits(reference, batch, cpu)
    reference_greedy = _generate(reference, batch, cpu)
    reference_step = training_step(copy.deepcopy(reference), batch, cpu)
    bridge_names = _bridge_parameter_names(reference)

    def add(name: str, value: str, tolerance: str = "", passed: bool | None = None) -> None:
        checks.append(Check(group, name, value, tolerance, passed))
        mark = {True: "ok", False: "FAILED", None: "info"}[passed]
        log(f"    {mark:6} {name}: {value} {tolerance}")

    def within(error: float, tolerance: float, name: str) -> None:
        add(name, f"{error:.2e}", f"<= {tolerance:.0e}", error <= tolerance)

    log(f"  [{group}] float32 on {device}")
    with strict_float32():
        model = copy.deepcopy(reference).to(device)
        add("attention implementation (LM / vision)", _attention_implementations(model))
        within(
            relative_error(_logits(model, batch, device), reference_logits, real), FP32_RTOL, "fp32 logits vs CPU fp32"
        )
        _generation_checks(model, batch, device, add, reference_greedy, exact=True, label="fp32")
        step = training_step(model, batch, device)
        within(
            relative_error(torch.tensor(step.loss), torch.tensor(reference_step.loss)), FP32_RTOL, "fp32 loss vs CPU"
        )
        within(_grads_error(step, reference_step), FP32_GRAD_RTOL, "fp32 bridge gradients vs CPU")
        _training_checks(step, bridge_names, add, "fp32")
        del model

    log(f"  [{group}] bfloat16 on {device}")
    model = copy.deepcopy(reference).to(device=device, dtype=torch.bfloat16)
    within(relative_error(_logits(model, batch, device), reference_logits, real), BF16_RTOL, "bf16 logits vs CPU fp32")
    _generation_checks(model, batch, device, add, reference_greedy, exact=False, label="bf16")
    del model
    model = copy.deepcopy(reference).to(device)
    step = training_step(model, batch, device, autocast=torch.bfloat16)
    within(
        relative_error(torch.tensor(step.loss), torch.tensor(reference_step.loss)),
        BF16_RTOL,
        "bf16-autocast loss vs CPU fp32",
    )
    _training_checks(step, bridge_names, add, "bf16-autocast")
    del model

    for precision in ("8bit", "4bit"):
        log(f"  [{group}] bitsandbytes {precision} on {device}")
        checks_before = len(checks)
        try:
            _quantized_checks(reference, shape, batch, device, precision, add)
        except Exception as error:  # reported with its error, as the issue asks for anything failing on the device
            add(f"{precision}: error", one_line(error), "", False)
        if len(checks) == checks_before:
            add(f"{precision}: ran", "no checks", "", False)
    return checks


def _attention_implementations(model: Any) -> str:
    return f"{model.language_model.config._attn_implementation} / {model.vision_model.config._attn_implementation}"


def _generation_checks(model, batch, device, add, reference_greedy, *, exact: bool, label: str) -> None:
    """Cached == uncached (greedy and 3 beams); equal to the CPU's greedy tokens (information: a near-tie may flip)."""
    for name, kwargs in (("greedy", {}), ("3 beams", {"num_beams": 3})):
        cached = _generate(model, batch, device, **kwargs)
        uncached = _generate(model, batch, device, use_cache=False, **kwargs)
        same = sum(
            a == b for row_a, row_b in zip(cached, uncached, strict=True) for a, b in zip(row_a, row_b, strict=True)
        )
        total = sum(len(row) for row in cached)
        add(
            f"{label} {name}: cached == uncached tokens",
            f"{same}/{total}",
            "all equal" if exact else "",
            (same == total) if exact else None,
        )
        if name == "greedy":
            agree = sum(
                a == b
                for row_a, row_b in zip(cached, reference_greedy, strict=True)
                for a, b in zip(row_a, row_b, strict=True)
            )
            add(f"{label} greedy tokens equal to CPU fp32's", f"{agree}/{total}")


def _training_checks(step: TrainingStep, bridge_names: list[str], add, label: str) -> None:
    reached = _reached(step, bridge_names)
    add(
        f"{label} bridge tensors with finite non-zero gradients",
        f"{len(reached)}/{len(bridge_names)}",
        "all",
        len(reached) == len(bridge_names),
    )
    add(
        f"{label} frozen backbone tensors with gradients",
        str(len(step.frozen_with_gradients)),
        "0",
        not step.frozen_with_gradients,
    )
    add(
        f"{label} trainable tensors unchanged by one AdamW step",
        str(len(step.unchanged_after_step)),
        "0",
        not step.unchanged_after_step,
    )


def _language_model_linears(model: Any) -> list[str]:
    """Names of the linear layers inside the language model's decoder layers (what bitsandbytes should quantize)."""
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("language_model.model.layers.")
    )


def _quantized_checks(reference, shape, batch, device, precision: str, add) -> None:
    import bitsandbytes as bnb
    from peft import get_peft_model, prepare_model_for_kbit_training

    layer_type = bnb.nn.Linear8bitLt if precision == "8bit" else bnb.nn.Linear4bit
    expected = _language_model_linears(reference)
    with tempfile.TemporaryDirectory() as directory:
        reference.language_model.save_pretrained(Path(directory) / "lm")
        reference.vision_model.save_pretrained(Path(directory) / "vision")
        model = FlamingoForConditionalGeneration.from_backbones(
            Path(directory) / "vision",
            Path(directory) / "lm",
            dtype=torch.bfloat16,
            device_map={"": torch.cuda.current_device()} if device.type == "cuda" else None,
            quantization_config=quantization_config(precision),
            media_token_id=shape.media_token_id,
            eoc_token_id=shape.eoc_token_id,
            cross_attn_every_n_layers=shape.cross_attn_every_n_layers,
        )
    # The reference's bridge (open gates), so that images matter.
    model.perceiver.load_state_dict(reference.perceiver.state_dict())
    model.gated_cross_attn_layers.load_state_dict(reference.gated_cross_attn_layers.state_dict())
    quantized = sorted(name for name, module in model.named_modules() if isinstance(module, layer_type))
    add(
        f"{precision}: quantized layers are exactly the LM's decoder linears",
        f"{len(quantized)} quantized, {len(expected)} expected",
        "same names",
        quantized == expected,
    )
    devices = {
        part: str(next(getattr(model, part).parameters()).device)
        for part in ("vision_model", "perceiver", "gated_cross_attn_layers", "language_model")
    }
    add(
        f"{precision}: devices of tower / bridge / LM",
        ", ".join(sorted(set(devices.values()))),
        f"all {device.type}",
        all(torch.device(d).type == device.type for d in devices.values()),
    )

    reference_logits = _logits(reference, batch, torch.device("cpu"))
    logits = _logits(model, batch, device)
    error = relative_error(logits, reference_logits, batch["attention_mask"].bool())
    add(f"{precision}: logits vs CPU fp32 (quantization error)", f"{error:.2e}", "finite", error != float("inf"))
    tokens = _generate(model, batch, device)
    add(
        f"{precision}: generate",
        f"{sum(len(r) for r in tokens)} tokens for {len(tokens)} rows",
        f"{NEW_TOKENS} per row",
        all(len(r) == NEW_TOKENS for r in tokens),
    )

    # QLoRA as the README does it: PEFT's k-bit preparation (half-precision weights that stay trainable are upcast to
    # float32; bf16 weights would round away small AdamW updates), LoRA adapters on the quantized LM, the bridge
    # trained in full (PEFT's `modules_to_save`).
    model = prepare_model_for_kbit_training(model)
    peft_model = get_peft_model(model, flamingo_lora_config(model, r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    frozen_quantized = {
        name: p.detach().clone() for name, p in peft_model.named_parameters() if ".base_layer." in name
    }
    step = training_step(peft_model, batch, device)
    lora = [n for n in trainable if ".lora_" in n]
    bridge = [n for n in trainable if ".modules_to_save." in n]
    unchanged = set(step.unchanged_after_step)
    add(
        f"{precision}: QLoRA step updates every adapter tensor",
        f"{len(set(lora) - unchanged)}/{len(lora)}",
        "all (> 0)",
        bool(lora) and not unchanged.intersection(lora),
    )
    add(
        f"{precision}: QLoRA step updates every bridge tensor",
        f"{len(set(bridge) - unchanged)}/{len(bridge)}",
        "all (> 0)",
        bool(bridge) and not unchanged.intersection(bridge),
    )
    changed_base = [
        n
        for n, p in peft_model.named_parameters()
        if n in frozen_quantized and not torch.equal(p.detach(), frozen_quantized[n])
    ]
    add(f"{precision}: quantized base weights changed by the step", str(len(changed_base)), "0", not changed_base)
    add(f"{precision}: QLoRA loss", f"{step.loss:.4f}", "finite", bool(torch.isfinite(torch.tensor(step.loss))))
