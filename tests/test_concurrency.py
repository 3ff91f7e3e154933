"""One model shared by many threads (as serving frameworks do): each call sees only its own images, concurrent
results equal sequential ones, and the language model called on its own stays bare meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from model_testers import (
    BOS_TOKEN_ID,
    EOC_TOKEN_ID,
    MEDIA_TOKEN_ID,
    PAD_TOKEN_ID,
    bare_language_model,
    build_model,
    open_gates,
    random_pixels,
)

NUM_THREADS = 20


@pytest.fixture(scope="module")
def model():
    model = build_model("llama")
    open_gates(model)
    return model


def _request(index: int, mixed_shapes: bool) -> dict[str, torch.Tensor]:
    """Request `index`: its own images; with `mixed_shapes`, also its own batch size, length and image count."""
    generator = torch.Generator().manual_seed(index)
    num_images = 1 + index % 3 if mixed_shapes else 2
    batch = 1 + index % 2 if mixed_shapes else 2
    text_length = 3 + index % 4 if mixed_shapes else 4
    rows = []
    for _ in range(batch):
        row = [BOS_TOKEN_ID]
        for _ in range(num_images):
            row += [MEDIA_TOKEN_ID, *torch.randint(3, 90, (text_length,), generator=generator).tolist(), EOC_TOKEN_ID]
        rows.append(row[:-1])
    input_ids = torch.tensor(rows)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": random_pixels(batch, num_images, seed=1000 + index),
    }


def _run_concurrently(calls: list[Callable[[], torch.Tensor]]) -> list[torch.Tensor]:
    """Runs every call in its own thread, all released at once; re-raises the first error."""
    results: list[torch.Tensor | None] = [None] * len(calls)
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls))

    def worker(position: int) -> None:
        start.wait()
        try:
            results[position] = calls[position]()
        except BaseException as error:  # noqa: BLE001 - surfaced in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(position,)) for position in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _forward(model, request):
    def call():
        with torch.no_grad():
            return model(**request).logits

    return call


def _generate(model, request, **settings):
    def call():
        return model.generate(**request, max_new_tokens=4, min_new_tokens=4, pad_token_id=PAD_TOKEN_ID, **settings)

    return call


@pytest.mark.parametrize("mixed_shapes", [False, True], ids=["same-shapes", "mixed-shapes"])
def test_concurrent_forwards_equal_sequential_ones(model, mixed_shapes):
    requests = [_request(index, mixed_shapes) for index in range(NUM_THREADS)]
    sequential = [_forward(model, request)() for request in requests]
    # The images matter: two requests of the same shapes but different images give different logits.
    assert (sequential[0] - sequential[2]).abs().max() > 1e-3 if not mixed_shapes else True
    for _ in range(3):
        concurrent = _run_concurrently([_forward(model, request) for request in requests])
        for index, (got, expected) in enumerate(zip(concurrent, sequential, strict=True)):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=f"request {index}")


@pytest.mark.parametrize("settings", [{}, {"num_beams": 2}], ids=["greedy", "beams"])
def test_concurrent_generations_equal_sequential_ones(model, settings):
    requests = [_request(index, mixed_shapes=index % 2 == 1) for index in range(16)]
    sequential = [_generate(model, request, **settings)().tolist() for request in requests]
    concurrent = _run_concurrently([_generate(model, request, **settings) for request in requests])
    assert [tokens.tolist() for tokens in concurrent] == sequential


def test_language_model_alone_stays_bare_while_flamingo_forwards_run(model):
    bare = bare_language_model(model)
    text = torch.tensor([[BOS_TOKEN_ID, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = bare(text).logits
    requests = [_request(index, mixed_shapes=False) for index in range(NUM_THREADS)]

    def bare_call():
        with torch.no_grad():
            return model.language_model(text).logits

    calls = [call for request in requests for call in (_forward(model, request), bare_call)]
    results = _run_concurrently(calls)
    for logits in results[1::2]:
        torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
