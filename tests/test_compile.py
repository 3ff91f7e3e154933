"""`torch.compile` (inductor, CPU) of the model's forward with a static cache: the whole forward, prompt and decoding
steps, compiles without a graph break (`fullgraph=True`), and generation gives exactly the eager tokens; also with
the inference settings the README recommends (`mode="max-autotune-no-cudagraphs"` and inductor's `freezing`, which
prepacks the weights of the products)."""

import pytest
import torch
import torch._inductor.config
from model_testers import PAD_TOKEN_ID, build_model, interleaved_batch, open_gates
from torch._dynamo.utils import counters


@pytest.mark.parametrize(
    ("settings", "mode", "freezing"),
    [({}, None, False), ({"num_beams": 2}, None, False), ({"num_beams": 2}, "max-autotune-no-cudagraphs", True)],
    ids=["greedy", "beams", "beams-max-autotune-freezing"],
)
def test_compiled_forward_generates_the_eager_tokens_with_a_static_cache(settings, mode, freezing):
    model = build_model("llama")
    open_gates(model)
    batch = interleaved_batch()
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values}
    common = dict(
        max_new_tokens=5, min_new_tokens=5, pad_token_id=PAD_TOKEN_ID, cache_implementation="static", **settings
    )
    eager = model.generate(**inputs, **common)
    torch.compiler.reset()
    counters.clear()
    model.forward = torch.compile(model.forward, backend="inductor", fullgraph=True, mode=mode)
    try:
        with torch._inductor.config.patch(freezing=freezing):
            compiled = model.generate(**inputs, **common)
            again = model.generate(**inputs, **common)
    finally:
        del model.forward
        torch.compiler.reset()
    assert compiled.tolist() == eager.tolist() == again.tolist()
    # With freezing, inductor replaces the products by prepacked ones (the speed-up the README claims rests on it).
    assert (counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > 0) == freezing
