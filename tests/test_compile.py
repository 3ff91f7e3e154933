"""`torch.compile` (inductor, CPU) of the model's forward with a static cache: the whole forward, prompt and decoding
steps, compiles without a graph break (`fullgraph=True`), and generation gives exactly the eager tokens; also with
the inference options the README recommends (`freezing` + `max_autotune`: prepacked oneDNN/MKL products)."""

import pytest
import torch
from model_testers import PAD_TOKEN_ID, build_model, interleaved_batch, open_gates

INFERENCE_OPTIONS = {"freezing": True, "max_autotune": True}


@pytest.mark.parametrize(
    ("settings", "options"),
    [({}, None), ({"num_beams": 2}, None), ({"num_beams": 2}, INFERENCE_OPTIONS)],
    ids=["greedy", "beams", "beams-freezing-max-autotune"],
)
def test_compiled_forward_generates_the_eager_tokens_with_a_static_cache(settings, options):
    model = build_model("llama")
    open_gates(model)
    batch = interleaved_batch()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}
    common = dict(
        max_new_tokens=5, min_new_tokens=5, pad_token_id=PAD_TOKEN_ID, cache_implementation="static", **settings
    )
    eager = model.generate(**inputs, **common)
    torch.compiler.reset()
    model.forward = torch.compile(model.forward, backend="inductor", fullgraph=True, options=options)
    try:
        compiled = model.generate(**inputs, **common)
        again = model.generate(**inputs, **common)
    finally:
        del model.forward
        torch.compiler.reset()
    assert compiled.tolist() == eager.tolist() == again.tolist()
