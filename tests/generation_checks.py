"""Checks a generation forward by forward: every forward `generate` runs (prompt, decoding steps, drafted tokens of
assisted or prompt-lookup decoding, beams after reordering) must give the logits of one full, cache-free forward over
the same rows' whole sequences."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from model_testers import MEDIA_TOKEN_ID


@dataclass
class RecordedForward:
    input_ids: torch.LongTensor  # every token of every row so far, as `prepare_inputs_for_generation` saw them
    attention_mask: torch.LongTensor | None  # the 2-D padding mask over `input_ids`
    logits: torch.FloatTensor  # what the forward returned, for its last `logits.shape[1]` positions


@contextmanager
def record_forwards(model) -> Iterator[list[RecordedForward]]:
    """Records every forward of `model` inside `generate`, with the whole sequences it continued."""
    recorded: list[RecordedForward] = []
    pending: list[tuple[torch.LongTensor, torch.LongTensor | None]] = []
    original = model.prepare_inputs_for_generation

    @functools.wraps(original)
    def spy(input_ids, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        pending.append((input_ids.clone(), None if mask is None else mask.clone()))
        return original(input_ids, *args, **kwargs)

    def on_forward(module, args, output):
        input_ids, mask = pending.pop()
        recorded.append(RecordedForward(input_ids, mask, output.logits.detach().clone()))

    model.prepare_inputs_for_generation = spy
    handle = model.register_forward_hook(on_forward)
    try:
        yield recorded
    finally:
        handle.remove()
        del model.prepare_inputs_for_generation


def full_forward_logits(model, input_ids, attention_mask, pixel_values, prompt_ids) -> torch.FloatTensor:
    """Logits of one cache-free forward over whole sequences whose first `prompt_ids.shape[1]` tokens are the
    prompts (each prompt's rows consecutive): tokens after a prompt attend to its last image, so an `<image>` token
    generated after the prompt starts no new image."""
    copies = input_ids.shape[0] // prompt_ids.shape[0]
    prompt_images = (prompt_ids == MEDIA_TOKEN_ID).sum(-1).repeat_interleave(copies)
    token_image_index = torch.minimum((input_ids == MEDIA_TOKEN_ID).cumsum(-1), prompt_images[:, None])
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
            pixel_values=pixel_values.repeat_interleave(copies, dim=0),
            token_image_index=token_image_index,
            use_cache=False,
        ).logits


def assert_forwards_match_full_forwards(model, recorded, pixel_values, prompt_ids, atol: float = 1e-5) -> None:
    assert recorded, "generate ran no forward"
    for step, forward in enumerate(recorded):
        full = full_forward_logits(model, forward.input_ids, forward.attention_mask, pixel_values, prompt_ids)
        kept = forward.logits.shape[1]
        real = torch.ones(full.shape[:2], dtype=torch.bool)
        if forward.attention_mask is not None:
            real = forward.attention_mask.bool()  # padded positions are fully masked: implementations fill them freely
        torch.testing.assert_close(
            forward.logits[real[:, -kept:]],
            full[:, -kept:][real[:, -kept:]],
            atol=atol,
            rtol=0,
            msg=lambda message, step=step: f"forward {step} of the generation: {message}",
        )
