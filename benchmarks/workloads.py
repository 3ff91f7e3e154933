"""The workloads W1-W4: inputs (prompts as OpenFlamingo's evaluation harness writes them, random pixel tensors), the
calls made on each model, and the analytic decode-FLOP model of W4.

Both Flamingo implementations get the same tensors: hf_flamingo `pixel_values` of shape (B, T_img, 3, H, W),
OpenFlamingo `vision_x = pixel_values.unsqueeze(2)` of shape (B, T_img, 1, 3, H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch._inductor.config
from setups import Setup
from timing import MB, Candidate, Stats, measure, run_alternating
from torch.utils.flop_counter import FlopCounterMode

from hf_flamingo import cpu_fast_path

CAPTIONS = [
    "A man riding a wave on top of a white surfboard.",
    "Two brown dogs playing with a red ball in the park.",
    "A plate of food with broccoli, rice and grilled chicken.",
    "A red double decker bus driving down a busy street.",
    "A small kitten sleeping on a soft blue blanket.",
]
VQA = [
    ("What color is the car?", "red"),
    ("How many people are in the picture?", "three"),
    ("Is it raining?", "no"),
    ("What is the man holding in his left hand while he is walking?", "umbrella"),
    ("Where is the cat?", "on the sofa"),
    ("What sport is being played on the green field behind the fence?", "soccer"),
    ("What time of day is it?", "night"),
    ("Which animal is standing next to the tall wooden barn near the river?", "horse"),
    ("What is on the table?", "pizza"),
    ("Are the lights on?", "yes"),
    ("What is the woman wearing on her head?", "hat"),
    ("Why is the dog wet?", "swimming"),
]
TRAIN_TOKENS = 128
SAME_KERNELS = "bare LM, oneDNN products ({})"
"""The bare LM inside `hf_flamingo.cpu_fast_path`, as `FAST` runs its language model (a like-for-like floor)."""
FAST = "hf_flamingo + cpu_fast_path"
"""hf_flamingo with the opt-in CPU switch on (`hf_flamingo.cpu_fast_path`): float32 inference products on oneDNN."""
IDEFICS = "IDEFICS"
"""transformers' `IdeficsForVisionText2Text` at matched shapes (random weights)."""
COMPILED = "hf_flamingo compiled"
"""hf_flamingo with `cache_implementation="static"`, `model.forward = torch.compile(model.forward, fullgraph=True,
mode=COMPILE_MODE)` (inductor) and inductor's `freezing` on; compiled once per workload, before the timed runs."""
COMPILE_MODE = "max-autotune-no-cudagraphs"
"""The README's inference compile settings: this mode times oneDNN's, MKL's and inductor's own C++ kernels for each
product shape and keeps the fastest (oneDNN for most shapes on this CPU); `torch._inductor.config.freezing` (set
while the compiled model runs, so that every (re)compilation sees it) folds the frozen, inference-only weights into
the graph as constants, which lets inductor prepack them for those kernels. Dynamo reads `freezing` from the global
config, not from `torch.compile(options=...)`; the test suite checks that the products are prepacked."""


@dataclass
class Inputs:
    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    pixel_values: torch.FloatTensor  # (B, T_img, 3, H, W)
    labels: torch.LongTensor | None = None


def caption_prompt(num_shots: int = 4) -> str:
    """OpenFlamingo's captioning prompt: demos `<image>Output:{caption}<|endofchunk|>` each followed by a newline
    (`evaluate.py`), then the query `<image>Output:`."""
    demos = "".join(f"<image>Output:{CAPTIONS[i]}<|endofchunk|>\n" for i in range(num_shots))
    return demos + "<image>Output:"


def vqa_prompt(sample: int, num_shots: int = 2) -> str:
    """OpenFlamingo's VQA prompt: demos `<image>Question:{q} Short answer:{a}<|endofchunk|>` + newline, then the
    query `<image>Question:{q} Short answer:`. Question lengths vary with `sample`."""
    picks = [VQA[(sample * 5 + 3 * k) % len(VQA)] for k in range(num_shots + 1)]
    demos = "".join(f"<image>Question:{q} Short answer:{a}<|endofchunk|>\n" for q, a in picks[:num_shots])
    return demos + f"<image>Question:{picks[-1][0]} Short answer:"


def training_text(sample: int) -> str:
    """Two interleaved chunks; the second one's length varies, so some rows are padded and some truncated."""
    long_text = " ".join(CAPTIONS[(sample + k) % len(CAPTIONS)] for k in range(2 + 4 * sample))
    return f"<image>Output:{CAPTIONS[sample % len(CAPTIONS)]}<|endofchunk|><image>Output:{long_text}<|endofchunk|>"


def random_pixels(batch: int, num_images: int, image_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_images, 3, image_size, image_size, generator=generator)


def w1_inputs(setup: Setup) -> Inputs:
    encoded = setup.tokenizer([caption_prompt()], return_tensors="pt", padding=True)
    return Inputs(encoded["input_ids"], encoded["attention_mask"], random_pixels(1, 5, setup.image_size, seed=1))


def w2_inputs(setup: Setup, batch: int = 8) -> Inputs:
    encoded = setup.tokenizer([vqa_prompt(i) for i in range(batch)], return_tensors="pt", padding=True)
    if bool(encoded["attention_mask"].all()):
        raise RuntimeError("W2 must be left-padded: the questions should have different lengths")
    return Inputs(encoded["input_ids"], encoded["attention_mask"], random_pixels(batch, 3, setup.image_size, seed=2))


def w3_inputs(setup: Setup, batch: int = 4) -> Inputs:
    encoded = setup.tokenizer(
        [training_text(i) for i in range(batch)],
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=TRAIN_TOKENS,
        padding_side="right",
    )
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    media_token_id = setup.ours.config.media_token_id
    if not bool(((input_ids == media_token_id).sum(dim=1) == 2).all()):
        raise RuntimeError("every W3 row must keep both <image> tokens after truncation")
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    pixel_values = random_pixels(batch, 2, setup.image_size, seed=3)
    return Inputs(input_ids, attention_mask, pixel_values, labels)


def text_only_ids(setup: Setup, input_ids: torch.LongTensor) -> torch.LongTensor:
    """The same number of tokens for the bare LM: the Flamingo-only tokens (`<image>`, `<|endofchunk|>`, ids beyond
    the LM's vocabulary) replaced by an ordinary token (a space)."""
    filler = setup.tokenizer.encode(" ", add_special_tokens=False)[0]
    vocab = setup.bare_lm.get_input_embeddings().weight.shape[0]
    return input_ids.masked_fill(input_ids >= vocab, filler)


# ----------------------------------------------------------------------------------------------------------------------
# Calls


def generation_kwargs(setup: Setup, new_tokens: int, num_beams: int) -> dict[str, Any]:
    """Identical settings for both Flamingos: exactly `new_tokens` tokens, stop token `<|endofchunk|>`."""
    return {
        "num_beams": num_beams,
        "min_new_tokens": new_tokens,
        "max_new_tokens": new_tokens,
        "do_sample": False,
        "eos_token_id": setup.ours.config.eoc_token_id,
        "pad_token_id": setup.tokenizer.pad_token_id,
    }


def ours_generate(setup: Setup, inputs: Inputs, fast: bool = False, **kwargs: Any) -> Callable[[], torch.Tensor]:
    """hf_flamingo's `generate`; with `fast`, inside `cpu_fast_path()`."""

    def run() -> torch.Tensor:
        with torch.inference_mode(), cpu_fast_path(enabled=fast):
            return setup.ours.generate(
                input_ids=inputs.input_ids,
                attention_mask=inputs.attention_mask,
                pixel_values=inputs.pixel_values,
                **kwargs,
            )

    return run


def idefics_image_attention_mask(
    setup: Setup, input_ids: torch.LongTensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """IDEFICS' `image_attention_mask` (batch, text length, images) for our token ids: each real token attends to
    the latest `<image>` at or before it (the `<image>` token included), tokens before the first image and padding
    to none — what Flamingo's `only_attend_immediate_media` does, and what `IdeficsProcessor` builds around its own
    `<fake_token_around_image><image>` markers. The ids themselves are ours (one `<image>` token per image), so
    IDEFICS sees prompts of exactly our lengths."""
    image_index = (input_ids == setup.ours.config.media_token_id).long().cumsum(dim=1) - 1
    num_images = int((input_ids == setup.ours.config.media_token_id).sum(dim=1).max())
    mask = torch.nn.functional.one_hot(image_index.clamp(min=0), num_images)
    return mask * ((image_index >= 0) & attention_mask.bool()).unsqueeze(-1).long()


def idefics_generate(setup: Setup, inputs: Inputs, **kwargs: Any) -> Callable[[], torch.Tensor]:
    """IDEFICS' `generate` on the same ids, mask and pixels (`pixel_values` (B, T_img, 3, H, W)) with
    `idefics_image_attention_mask`; the same generation settings as the others."""
    image_attention_mask = idefics_image_attention_mask(setup, inputs.input_ids, inputs.attention_mask)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return setup.idefics.generate(
                input_ids=inputs.input_ids,
                attention_mask=inputs.attention_mask,
                pixel_values=inputs.pixel_values,
                image_attention_mask=image_attention_mask,
                **kwargs,
            )

    return run


def compiled_generate(
    setup: Setup, inputs: Inputs, compiled: Callable[..., Any], **kwargs: Any
) -> Callable[[], torch.Tensor]:
    """hf_flamingo's `generate` with a static cache and `compiled` (the compiled `forward`) set as the instance's
    `forward` for the call only, so that the other candidates of the same model run eagerly."""
    eager = ours_generate(setup, inputs, cache_implementation="static", **kwargs)

    def run() -> torch.Tensor:
        setup.ours.forward = compiled
        try:
            with torch._inductor.config.patch(freezing=True):
                return eager()
        finally:
            del setup.ours.forward

    return run


def compile_forward(setup: Setup) -> Callable[..., Any]:
    """A fresh `torch.compile(model.forward, fullgraph=True, mode=COMPILE_MODE)` of hf_flamingo (dynamo's caches
    reset first, so that earlier workloads' graphs do not count against its recompile limit)."""
    torch.compiler.reset()
    return torch.compile(setup.ours.forward, fullgraph=True, mode=COMPILE_MODE)


def guarded(name: str, fn: Callable[[], Any], errors: dict[str, str]) -> Callable[[], Any]:
    """`fn` that records its first exception in `errors[name]` (and returns None) instead of aborting the workload;
    once failed it is not called again. The report shows the error in place of the candidate's numbers."""

    def run() -> Any:
        if name in errors:
            return None
        try:
            return fn()
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            return None

    return run


def peer_candidates(
    setup: Setup, errors: dict[str, str], idefics: Callable[[], Any] | None, compiled: Callable[[], Any] | None
) -> list[Candidate]:
    """The IDEFICS and compiled candidates of a workload (guarded); an IDEFICS that could not be built is recorded."""
    candidates = []
    if setup.idefics is None:
        errors[IDEFICS] = f"not built: {setup.idefics_error}"
    elif idefics is not None:
        candidates.append(Candidate(IDEFICS, guarded(IDEFICS, idefics, errors)))
    if compiled is not None:
        candidates.append(Candidate(COMPILED, guarded(COMPILED, compiled, errors)))
    return candidates


def first_compiled_call(fn: Callable[[], Any], log=print) -> float:
    """Times the first call of a compiled candidate (compilation + one run), untimed by the alternating runner."""
    sample = measure(fn)
    log(f"    first compiled call (compilation + run): {sample.seconds:.1f} s")
    return sample.seconds


def oracle_generate(setup: Setup, inputs: Inputs, **kwargs: Any) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return setup.oracle.generate(
                vision_x=inputs.pixel_values.unsqueeze(2),
                lang_x=inputs.input_ids,
                attention_mask=inputs.attention_mask,
                **kwargs,
            )

    return run


def bare_generate(
    setup: Setup,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor | None = None,
    same_kernels: bool = False,
    **kwargs: Any,
) -> Callable[[], torch.Tensor]:
    """The bare LM decoding `input_ids` (left-padded when `attention_mask` has zeros) exactly like the Flamingo.

    As transformers runs it; with `same_kernels`, inside `cpu_fast_path()` (its products on oneDNN), as `FAST`.
    """
    kwargs = dict(kwargs)
    kwargs.pop("eos_token_id", None)
    kwargs["pad_token_id"] = setup.bare_lm.config.eos_token_id if setup.bare_lm.config.eos_token_id is not None else 0
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    def run() -> torch.Tensor:
        with torch.inference_mode(), cpu_fast_path(enabled=same_kernels):
            return setup.bare_lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    return run


def ours_image_features(setup: Setup, pixel_values: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return setup.ours.get_image_features(pixel_values)

    return run


def logits_max_abs_diff(setup: Setup, inputs: Inputs) -> float:
    """Max |logit difference| of the two Flamingos on `inputs` over the real (unpadded) positions."""
    with torch.inference_mode():
        ours = setup.ours(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values
        ).logits
        oracle = setup.oracle(
            vision_x=inputs.pixel_values.unsqueeze(2), lang_x=inputs.input_ids, attention_mask=inputs.attention_mask
        ).logits
    real = inputs.attention_mask.bool()
    return (ours.float() - oracle.float())[real].abs().max().item()


def identical(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))


def count_gflops(run: Callable[[], Any], *modules: torch.nn.Module, inference: bool = True) -> float:
    """GFLOPs of the matrix products and attention in one `run()`, counted by `torch.utils.flop_counter` (one
    multiply-add = 2 FLOPs; elementwise work not counted). Untimed.

    For inference runs the parameters of `modules` are switched to `requires_grad=False` while counting: the
    counter's module tracker cannot hook parameters that require grad under `torch.inference_mode()`. Counted on
    the default path, oneDNN switched off: the counter only knows aten's products (`cpu_fast_path` computes the same
    products on oneDNN).
    """
    saved = [(p, p.requires_grad) for module in modules for p in module.parameters()] if inference else []
    for parameter, _ in saved:
        parameter.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    try:
        with torch.backends.mkldnn.flags(enabled=False), counter:
            run()
    finally:
        for parameter, flag in saved:
            parameter.requires_grad_(flag)
    return counter.get_total_flops() / 1e9


def generation_gflops(
    setup: Setup,
    ours: Callable[[], Any],
    oracle: Callable[[], Any],
    bare: Callable[[], Any],
    features: Callable[[], Any],
    idefics: Callable[[], Any] | None = None,
) -> dict[str, float | None]:
    """Counted GFLOPs of both Flamingos and of the floor's two parts (bare LM decoding, one image encoding)."""
    models = (setup.ours, setup.oracle, setup.bare_lm) + ((setup.idefics,) if setup.idefics is not None else ())
    counts = {
        "hf_flamingo": count_gflops(ours, *models),
        "OpenFlamingo": count_gflops(oracle, *models),
        "bare LM": count_gflops(bare, *models),
        "image features": count_gflops(features, *models),
    }
    counts["floor"] = counts["bare LM"] + counts["image features"]
    if idefics is not None and setup.idefics is not None:
        try:
            counts[IDEFICS] = count_gflops(idefics, *models)
        except Exception as error:  # the timed runs record the error too
            counts[IDEFICS] = None
            print(f"    IDEFICS FLOP count failed: {type(error).__name__}: {error}")
    return counts


# ----------------------------------------------------------------------------------------------------------------------
# Workloads: each returns a JSON-able dict and keeps its `Stats` under "stats"


def time_generation(
    setup: Setup,
    inputs: Inputs,
    kwargs: dict[str, Any],
    floor_candidates: list[Candidate],
    repeats: int,
    warmup: int,
    log=print,
    compile: bool = True,
) -> dict[str, Any]:
    """Times one generation workload, alternating: hf_flamingo (default and `cpu_fast_path`), OpenFlamingo, IDEFICS
    and the compiled model (`peer_candidates`), then `floor_candidates`. Returns `peer_results(...)` plus "stats"."""
    errors: dict[str, str] = {}
    peers = peer_candidates(
        setup,
        errors,
        idefics_generate(setup, inputs, **kwargs),
        compiled_generate(setup, inputs, compile_forward(setup), **kwargs) if compile else None,
    )
    try:
        first = {c.name: first_compiled_call(c.fn, log) for c in peers if c.name == COMPILED}
        stats = run_alternating(
            [
                Candidate("hf_flamingo", ours_generate(setup, inputs, **kwargs)),
                Candidate(FAST, ours_generate(setup, inputs, fast=True, **kwargs)),
                Candidate("OpenFlamingo", oracle_generate(setup, inputs, **kwargs)),
                *peers,
                *floor_candidates,
            ],
            repeats=repeats,
            warmup=warmup,
            log=log,
        )
    finally:
        torch.compiler.reset()
    return {**peer_results(stats, errors, first), "stats": stats}


def run_w1(setup: Setup, repeats: int, warmup: int, log=print, compile: bool = True) -> dict[str, Any]:
    """4-shot captioning, batch 1, 3 beams, exactly 20 new tokens; and the floor (bare LM + one image encoding)."""
    inputs = w1_inputs(setup)
    kwargs = generation_kwargs(setup, new_tokens=20, num_beams=3)
    text_ids = text_only_ids(setup, inputs.input_ids)
    same_kernels_name = SAME_KERNELS.format("3 beams, 20 tokens")
    floor_candidates = [
        Candidate("bare LM (3 beams, 20 tokens)", bare_generate(setup, text_ids, **kwargs)),
        Candidate(same_kernels_name, bare_generate(setup, text_ids, same_kernels=True, **kwargs)),
        Candidate("hf_flamingo get_image_features (5 images)", ours_image_features(setup, inputs.pixel_values)),
    ]
    timed = time_generation(setup, inputs, kwargs, floor_candidates, repeats, warmup, log, compile)
    stats = timed["stats"]
    features = stats["hf_flamingo get_image_features (5 images)"].median
    floor = stats["bare LM (3 beams, 20 tokens)"].median + features
    floor_same_kernels = stats[same_kernels_name].median + features
    gflops = generation_gflops(
        setup,
        ours_generate(setup, inputs, **kwargs),
        oracle_generate(setup, inputs, **kwargs),
        bare_generate(setup, text_ids, **kwargs),
        ours_image_features(setup, inputs.pixel_values),
        idefics_generate(setup, inputs, **kwargs) if setup.idefics is not None else None,
    )
    return {
        **timed,
        "gflops": gflops,
        "prompt_tokens": int(inputs.input_ids.shape[1]),
        "images": int(inputs.pixel_values.shape[1]),
        "identical": identical(stats["hf_flamingo"].last_result, stats["OpenFlamingo"].last_result),
        "fast_identical": identical(stats[FAST].last_result, stats["OpenFlamingo"].last_result),
        "floor_s": floor,
        "ours_over_floor": stats["hf_flamingo"].median / floor,
        "same_kernels_name": same_kernels_name,
        "floor_same_kernels_s": floor_same_kernels,
        "ours_over_floor_same_kernels": stats[FAST].median / floor_same_kernels,
    }


def run_w2(
    setup: Setup, new_tokens: int, repeats: int, warmup: int, log=print, compile: bool = True
) -> dict[str, Any]:
    """2-shot VQA, batch 8 (left-padded), greedy, exactly `new_tokens` new tokens; and its floor (the bare LM on
    text-only prompts of the same lengths, same decoding, + one image encoding of the 24 images)."""
    inputs = w2_inputs(setup)
    kwargs = generation_kwargs(setup, new_tokens=new_tokens, num_beams=1)
    bare_name = f"bare LM (B={inputs.input_ids.shape[0]}, {new_tokens} tokens)"
    same_kernels_name = SAME_KERNELS.format(f"B={inputs.input_ids.shape[0]}, {new_tokens} tokens")
    features_name = (
        f"hf_flamingo get_image_features ({inputs.pixel_values.shape[0] * inputs.pixel_values.shape[1]} images)"
    )
    text_ids = text_only_ids(setup, inputs.input_ids)
    bare = bare_generate(setup, text_ids, attention_mask=inputs.attention_mask, **kwargs)
    floor_candidates = [
        Candidate(bare_name, bare),
        Candidate(
            same_kernels_name,
            bare_generate(setup, text_ids, attention_mask=inputs.attention_mask, same_kernels=True, **kwargs),
        ),
        Candidate(features_name, ours_image_features(setup, inputs.pixel_values)),
    ]
    timed = time_generation(setup, inputs, kwargs, floor_candidates, repeats, warmup, log, compile)
    stats = timed["stats"]
    floor = stats[bare_name].median + stats[features_name].median
    floor_same_kernels = stats[same_kernels_name].median + stats[features_name].median
    gflops = generation_gflops(
        setup,
        ours_generate(setup, inputs, **kwargs),
        oracle_generate(setup, inputs, **kwargs),
        bare,
        ours_image_features(setup, inputs.pixel_values),
        idefics_generate(setup, inputs, **kwargs) if setup.idefics is not None else None,
    )
    return {
        **timed,
        "floor_names": (bare_name, features_name),
        "floor_s": floor,
        "ours_over_floor": stats["hf_flamingo"].median / floor,
        "same_kernels_name": same_kernels_name,
        "floor_same_kernels_s": floor_same_kernels,
        "ours_over_floor_same_kernels": stats[FAST].median / floor_same_kernels,
        "gflops": gflops,
        "batch": int(inputs.input_ids.shape[0]),
        "prompt_tokens": [int(n) for n in inputs.attention_mask.sum(dim=1)],
        "identical": identical(stats["hf_flamingo"].last_result, stats["OpenFlamingo"].last_result),
        "fast_identical": identical(stats[FAST].last_result, stats["OpenFlamingo"].last_result),
    }


def peer_results(stats: dict[str, Stats], errors: dict[str, str], first_call_s: dict[str, float]) -> dict[str, Any]:
    """The IDEFICS / compiled part of a generation workload's result: errors, compile time (first call minus the
    median of the timed runs), and whether the compiled tokens equal the eager ones."""
    out: dict[str, Any] = {"errors": dict(errors)}
    if COMPILED in first_call_s and COMPILED not in errors:
        out["compile_s"] = first_call_s[COMPILED] - stats[COMPILED].median
        out["compiled_identical"] = identical(stats[COMPILED].last_result, stats["hf_flamingo"].last_result)
    return out


def _saved_for_backward_mb(forward: Callable[[], torch.Tensor]) -> float:
    """Size of the distinct tensor storages autograd saves for backward during `forward()` (then backpropagated)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward()
    loss.backward()
    return sum(storages.values()) / MB


def run_w3(setup: Setup, repeats: int, warmup: int, log=print) -> dict[str, Any]:
    """One training step (forward + backward) on batch 4 x 128 tokens, 2 images per sample, frozen backbones."""
    inputs = w3_inputs(setup)
    ours, oracle = setup.ours, setup.oracle

    def ours_loss() -> torch.Tensor:
        return ours(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            pixel_values=inputs.pixel_values,
            labels=inputs.labels,
        ).loss

    def oracle_loss() -> torch.Tensor:
        return oracle(
            vision_x=inputs.pixel_values.unsqueeze(2),
            lang_x=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            labels=inputs.labels,
        ).loss

    idefics = setup.idefics
    idefics_mask = idefics_image_attention_mask(setup, inputs.input_ids, inputs.attention_mask)

    def idefics_loss() -> torch.Tensor:
        return idefics(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            pixel_values=inputs.pixel_values,
            image_attention_mask=idefics_mask,
            labels=inputs.labels,
        ).loss

    def step(loss_fn: Callable[[], torch.Tensor], fast: bool = False) -> Callable[[], float]:
        def run() -> float:
            with cpu_fast_path(enabled=fast):
                loss = loss_fn()
                loss.backward()
            return loss.item()

        return run

    models = [ours, oracle] + ([idefics] if idefics is not None else [])
    trainable = {
        "hf_flamingo": sum(p.numel() for p in ours.parameters() if p.requires_grad),
        "OpenFlamingo": sum(p.numel() for p in oracle.parameters() if p.requires_grad),
    }
    errors: dict[str, str] = {}
    peers = []
    if idefics is not None:
        trainable[IDEFICS] = sum(p.numel() for p in idefics.parameters() if p.requires_grad)
    peers = peer_candidates(setup, errors, step(idefics_loss) if idefics is not None else None, None)
    for candidate in peers:
        candidate.before = lambda: idefics.zero_grad(set_to_none=True)

    def zero_all() -> None:
        for model in models:
            model.zero_grad(set_to_none=True)

    for model in models:
        model.train()
    try:
        with torch.enable_grad():
            stats = run_alternating(
                [
                    Candidate("hf_flamingo", step(ours_loss), lambda: ours.zero_grad(set_to_none=True)),
                    Candidate(FAST, step(ours_loss, fast=True), lambda: ours.zero_grad(set_to_none=True)),
                    Candidate("OpenFlamingo", step(oracle_loss), lambda: oracle.zero_grad(set_to_none=True)),
                    *peers,
                ],
                repeats=repeats,
                warmup=warmup,
                log=log,
            )
            zero_all()
            saved = {
                "hf_flamingo": _saved_for_backward_mb(ours_loss),
                "OpenFlamingo": _saved_for_backward_mb(oracle_loss),
            }
            zero_all()
            gflops = {
                "hf_flamingo": count_gflops(step(ours_loss), inference=False),
                "OpenFlamingo": count_gflops(step(oracle_loss), inference=False),
            }
            if idefics is not None and IDEFICS not in errors:
                zero_all()
                saved[IDEFICS] = _saved_for_backward_mb(idefics_loss)
                zero_all()
                gflops[IDEFICS] = count_gflops(step(idefics_loss), inference=False)
    finally:
        zero_all()
        for model in models:
            model.eval()
    losses = {name: s.last_result for name, s in stats.items()}
    return {
        "errors": errors,
        "batch": int(inputs.input_ids.shape[0]),
        "tokens": int(inputs.input_ids.shape[1]),
        "images_per_sample": int(inputs.pixel_values.shape[1]),
        "stats": stats,
        "loss": losses,
        "loss_abs_diff": abs(losses["hf_flamingo"] - losses["OpenFlamingo"]),
        "trainable_parameters": trainable,
        "saved_for_backward_mb": saved,
        "gflops": gflops,
        "gradient_mb": {name: 4 * n / MB for name, n in trainable.items()},
    }


def decode_flops(setup: Setup, context_length: float) -> dict[str, float]:
    """Analytic FLOPs per decoded token (batch 1, KV cache; one multiply-add = 2 FLOPs; norms, activations, rotary
    embeddings and softmax neglected):

        LM    = 2 * N_nonemb + n_layers * 4 * C * n_heads * d_head + 2 * d_model * V
        xattn = sum over gated blocks of [2 * (|to_q| + |to_out| + |ff_up| + |ff_down|) + 4 * n_latents * h_x * d_x]
        ratio = (LM + xattn) / LM

    N_nonemb: parameters of the bare LM without the input embedding and the LM head; C: the context a decoded token
    attends to (prompt + half of the decoded tokens); V: vocabulary; |w|: parameter count of a weight; n_latents: the
    64 perceiver latents of the last image, which each decoded token attends to with h_x heads of width d_x. The
    blocks' key/value projections (`to_kv`) act on the image latents once per prompt, not per token.
    """
    lm = setup.bare_lm
    config = lm.config
    excluded = {id(lm.get_input_embeddings().weight)}
    if lm.get_output_embeddings() is not None:
        excluded.add(id(lm.get_output_embeddings().weight))
    non_embedding = sum(p.numel() for p in lm.parameters() if id(p) not in excluded)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    lm_attention = config.num_hidden_layers * 4 * context_length * config.num_attention_heads * head_dim
    lm_head = 2 * config.hidden_size * config.vocab_size
    lm_flops = 2 * non_embedding + lm_attention + lm_head

    num_latents = setup.oracle.perceiver.latents.shape[0]
    xattn_flops = 0.0
    for block in setup.oracle.lang_encoder.gated_cross_attn_layers:
        if block is None:
            continue
        linear = sum(m.weight.numel() for m in (block.attn.to_q, block.attn.to_out, block.ff[1], block.ff[3]))
        inner = block.attn.to_q.out_features  # heads * dim_head
        xattn_flops += 2 * linear + 4 * num_latents * inner
    return {
        "context_length": context_length,
        "lm_non_embedding_params": non_embedding,
        "lm_flops_per_token": lm_flops,
        "xattn_flops_per_token": xattn_flops,
        "flamingo_flops_per_token": lm_flops + xattn_flops,
        "flop_ratio": (lm_flops + xattn_flops) / lm_flops,
    }


def run_w4(setup: Setup, repeats: int, warmup: int, log=print, compile: bool = True) -> dict[str, Any]:
    """Per-token decode time at the W1 context (batch 1, greedy): (t(21 tokens) - t(1 token)) / 20."""
    inputs = w1_inputs(setup)
    text_ids = text_only_ids(setup, inputs.input_ids)
    long, short = 21, 1
    same_kernels_name = SAME_KERNELS.format("B=1, greedy")
    models = {
        "hf_flamingo": lambda n: ours_generate(setup, inputs, **generation_kwargs(setup, n, 1)),
        FAST: lambda n: ours_generate(setup, inputs, fast=True, **generation_kwargs(setup, n, 1)),
        "OpenFlamingo": lambda n: oracle_generate(setup, inputs, **generation_kwargs(setup, n, 1)),
        "bare LM": lambda n: bare_generate(setup, text_ids, **generation_kwargs(setup, n, 1)),
        same_kernels_name: lambda n: bare_generate(
            setup, text_ids, same_kernels=True, **generation_kwargs(setup, n, 1)
        ),
    }
    errors: dict[str, str] = {}
    peers = {IDEFICS: lambda n: idefics_generate(setup, inputs, **generation_kwargs(setup, n, 1))}
    if compile:
        compiled = compile_forward(setup)
        peers[COMPILED] = lambda n: compiled_generate(setup, inputs, compiled, **generation_kwargs(setup, n, 1))
    candidates = [Candidate(f"{name} {n} tok", make(n)) for name, make in models.items() for n in (short, long)]
    for name, make in peers.items():
        for n in (short, long):
            candidate = Candidate(f"{name} {n} tok", make(n))
            if name == IDEFICS and setup.idefics is None:
                errors[IDEFICS] = f"not built: {setup.idefics_error}"
                continue
            candidate.fn = guarded(name, candidate.fn, errors)
            candidates.append(candidate)
    try:
        # Compiles the graphs of both lengths (each has its own static cache size) before the timed runs.
        first = {c.name: first_compiled_call(c.fn, log) for c in candidates if c.name.startswith(COMPILED)}
        stats = run_alternating(candidates, repeats=repeats, warmup=warmup, log=log)
    finally:
        torch.compiler.reset()
    for name in peers:
        if name not in errors and f"{name} {long} tok" in stats:
            models[name] = peers[name]
    compile_s = None
    if COMPILED in models:
        compile_s = sum(first[f"{COMPILED} {n} tok"] - stats[f"{COMPILED} {n} tok"].median for n in (short, long))
    per_token: dict[str, float] = {}
    paired: dict[str, list[float]] = {}
    for name in models:
        s_long, s_short = stats[f"{name} {long} tok"], stats[f"{name} {short} tok"]
        per_token[name] = (s_long.median - s_short.median) / (long - short)
        paired[name] = [(a - b) / (long - short) for a, b in zip(s_long.seconds, s_short.seconds, strict=True)]
    flops = decode_flops(setup, context_length=inputs.input_ids.shape[1] + (long - short + 1) / 2)
    budget = 1.15 * per_token["bare LM"] * flops["flop_ratio"]
    budget_same_kernels = 1.15 * per_token[same_kernels_name] * flops["flop_ratio"]
    return {
        "errors": errors,
        "compile_s": compile_s,
        "compiled_identical": COMPILED in models
        and identical(stats[f"{COMPILED} {long} tok"].last_result, stats[f"hf_flamingo {long} tok"].last_result),
        "prompt_tokens": int(inputs.input_ids.shape[1]),
        "stats": stats,
        "per_token_s": per_token,
        "per_token_paired_s": paired,
        "peak_rss_mb": {name: stats[f"{name} {long} tok"].peak_mb for name in models},
        "identical": identical(
            stats[f"hf_flamingo {long} tok"].last_result, stats[f"OpenFlamingo {long} tok"].last_result
        ),
        "flops": flops,
        "target_s": budget,
        "target_same_kernels_s": budget_same_kernels,
    }


def stats_as_dict(result: dict[str, Any]) -> dict[str, Any]:
    """`result` with its `Stats` objects turned into plain dicts (for JSON)."""
    out = dict(result)
    out["stats"] = {name: s.as_dict() for name, s in result["stats"].items() if isinstance(s, Stats)}
    return out
