"""Fine-tuning: Trainer (columns, num_items_in_batch, gradient checkpointing), LoRA and QLoRA through PEFT, and
save/reload of full models and adapter+bridge checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_test_image
from model_testers import flamingo_config, open_gates
from transformers import BitsAndBytesConfig, Trainer, TrainingArguments

from hf_flamingo import FlamingoDataCollator, FlamingoForConditionalGeneration, flamingo_lora_config

peft = pytest.importorskip("peft")

CAPTIONS = ["A red circle.", "A blue square.", "A green cross.", "A red square."]


def _model(processor, seed: int = 0) -> FlamingoForConditionalGeneration:
    """A tiny Llama Flamingo over the tiny tokenizer (<|endofchunk|> 320, <image> 321, <PAD> 322), gates open."""
    config = flamingo_config("llama", media_token_id=processor.media_token_id, eoc_token_id=processor.eoc_token_id)
    config.text_config.vocab_size = len(processor.tokenizer)
    config.text_config.pad_token_id = processor.tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = FlamingoForConditionalGeneration(config)
    open_gates(model)
    model.freeze_backbones()
    return model.eval()


def _raw_features() -> list[dict]:
    return [
        {"text": f"<image>{caption}<|endofchunk|><|endoftext|>", "images": [make_test_image(i, 30, 30)]}
        for i, caption in enumerate(CAPTIONS)
    ]


def _processed_features(processor) -> list[dict]:
    """One processed sample per item, as a `Dataset.map(processor)` would store them."""
    features = []
    for feature in _raw_features():
        encoded = processor(images=[feature["images"]], text=[feature["text"]], return_tensors="pt")
        features.append({"input_ids": encoded["input_ids"][0], "pixel_values": encoded["pixel_values"][0]})
    return features


def _args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _logits(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def test_trainer_keeps_pixel_values_and_trains_only_the_bridge(tiny_processor, tmp_path):
    model = _model(tiny_processor)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    perceiver_calls = []
    model.perceiver.register_forward_pre_hook(lambda module, args: perceiver_calls.append(args[0].shape))

    # Default `remove_unused_columns=True`: `input_ids` and `pixel_values` are named by `forward`, so they survive.
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_processed_features(tiny_processor),
        data_collator=FlamingoDataCollator(tiny_processor),
    )
    assert trainer.args.remove_unused_columns
    trainer.train()
    assert len(perceiver_calls) == 3  # the images reached the model at every step
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert not any(name.startswith(("vision_model.", "language_model.")) for name in changed)  # frozen backbones
    assert any(name.startswith("perceiver.") for name in changed)
    assert any(name.startswith("gated_cross_attn_layers.") for name in changed)

    # Raw text/images features need `remove_unused_columns=False` (Trainer would drop `text` and `images`).
    raw_trainer = Trainer(
        model=_model(tiny_processor),
        args=_args(tmp_path, remove_unused_columns=False, max_steps=1),
        train_dataset=_raw_features(),
        data_collator=FlamingoDataCollator(tiny_processor),
    )
    raw_trainer.train()

    # Full-model round trip after training: identical logits.
    batch = FlamingoDataCollator(tiny_processor)(_raw_features())
    model.save_pretrained(tmp_path / "full")
    reloaded = FlamingoForConditionalGeneration.from_pretrained(tmp_path / "full")
    difference = (_logits(reloaded, batch) - _logits(model.eval(), batch)).abs().max().item()
    print(f"full model reload: max |Δlogits| = {difference}")
    assert difference == 0


def test_loss_honours_num_items_in_batch(tiny_processor):
    model = _model(tiny_processor)
    batch = FlamingoDataCollator(tiny_processor)(_raw_features())
    with torch.no_grad():
        outputs = model(**batch)
        scaled = model(**batch, num_items_in_batch=torch.tensor(50)).loss
    shift_logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1]).float()
    shift_labels = batch["labels"][:, 1:].reshape(-1)
    summed = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    num_targets = (shift_labels != -100).sum()
    torch.testing.assert_close(outputs.loss, summed / num_targets)
    torch.testing.assert_close(scaled, summed / 50)


def test_trainer_with_gradient_checkpointing_takes_the_same_steps(tiny_processor, tmp_path):
    params = {}
    for checkpointing in (False, True):
        model = _model(tiny_processor)
        trainer = Trainer(
            model=model,
            args=_args(tmp_path, activation_checkpointing=checkpointing, max_steps=1),
            train_dataset=_processed_features(tiny_processor),
            data_collator=FlamingoDataCollator(tiny_processor),
        )
        trainer.train()
        assert model.is_activation_checkpointing == checkpointing
        params[checkpointing] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, value in params[False].items():
        torch.testing.assert_close(params[True][name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_trainer_predict_returns_logits_without_the_cache(tiny_processor, tmp_path):
    """`Trainer.predict` leaves the cache out of the predictions (`keys_to_ignore_at_inference`, both names)."""
    model = _model(tiny_processor)
    collator = FlamingoDataCollator(tiny_processor)
    trainer = Trainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=4), data_collator=collator)
    features = _processed_features(tiny_processor)
    prediction = trainer.predict(features)
    batch = collator(features)
    logits, image_hidden_states = prediction.predictions  # no cache among them
    torch.testing.assert_close(torch.as_tensor(logits), _logits(model, batch), atol=1e-5, rtol=0)
    assert image_hidden_states.shape[:2] == (len(features), 1)
    assert prediction.metrics["test_loss"] > 0


def test_flamingo_lora_config(tiny_processor):
    model = _model(tiny_processor)
    config = flamingo_lora_config(model, r=4, train_new_token_embeddings=True)
    assert config.target_modules == r"language_model\..*\.(?:q_proj|v_proj)"
    assert config.modules_to_save == ["perceiver", "gated_cross_attn_layers.1", "gated_cross_attn_layers.3"]
    assert config.trainable_token_indices == [321, 320]
    with pytest.raises(ValueError, match=r"named \['nope'\]"):
        flamingo_lora_config(model, target_modules=["q_proj", "nope"])
    # The vision tower has `q_proj` layers too: they are not adapted.
    peft_model = peft.get_peft_model(model, flamingo_lora_config(model, r=4))
    lora = [name for name, _ in peft_model.named_modules() if name.endswith(".lora_A")]
    assert len(lora) == 8 and all(".language_model." in name for name in lora)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".perceiver.modules_to_save.default." in name for name in trainable)
    assert all(("lora_" in n) or (".modules_to_save.default." in n) for n in trainable)


def test_lora_with_trainer_and_adapter_reload(tiny_processor, tmp_path):
    model = _model(tiny_processor)
    peft_model = peft.get_peft_model(model, flamingo_lora_config(model, r=4))
    Trainer(
        model=peft_model,
        args=_args(tmp_path, max_steps=2),
        train_dataset=_processed_features(tiny_processor),
        data_collator=FlamingoDataCollator(tiny_processor),
    ).train()
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = peft.PeftModel.from_pretrained(_model(tiny_processor), tmp_path / "adapter")
    batch = FlamingoDataCollator(tiny_processor)(_raw_features())
    trained_logits = _logits(peft_model.eval(), batch)
    assert (trained_logits - _logits(_model(tiny_processor), batch)).abs().max() > 1e-3  # training changed it
    difference = (_logits(reloaded.eval(), batch) - trained_logits).abs().max().item()
    print(f"LoRA adapter+bridge reload: max |Δlogits| = {difference}")
    assert difference == 0


def test_qlora_with_trainer_loss_goes_down_and_reloads(tiny_processor, tmp_path):
    _model(tiny_processor).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)

    def load_base():
        return FlamingoForConditionalGeneration.from_pretrained(tmp_path / "base", quantization_config=quantization)

    model = load_base()
    batch = FlamingoDataCollator(tiny_processor)(_raw_features())
    with torch.no_grad():
        loss_before = model(**batch).loss.item()  # an eval-mode forward first (the 4-bit CPU trap)
    # QLoRA's usual preparation: freezes everything, upcasts non-quantized half-precision weights to float32 and
    # turns on gradient checkpointing; `get_peft_model` then unfreezes the adapters and the bridge copies.
    model = peft.prepare_model_for_kbit_training(model)
    peft_model = peft.get_peft_model(model, flamingo_lora_config(model, r=4))
    trainer = Trainer(
        model=peft_model,
        args=_args(tmp_path, max_steps=8, learning_rate=5e-3),
        train_dataset=_processed_features(tiny_processor),
        data_collator=FlamingoDataCollator(tiny_processor),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peft_model.eval()
    with torch.no_grad():
        loss_after = peft_model(**batch).loss.item()
    print(f"QLoRA: loss {loss_before:.4f} -> {loss_after:.4f} (train losses {[round(x, 4) for x in losses]})")
    assert loss_after < loss_before - 0.1
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # gradients reached every adapter through 4-bit layers

    peft_model.save_pretrained(tmp_path / "qlora")
    reloaded = peft.PeftModel.from_pretrained(load_base(), tmp_path / "qlora").eval()
    difference = (_logits(reloaded, batch) - _logits(peft_model, batch)).abs().max().item()
    print(f"QLoRA adapter+bridge reload: max |Δlogits| = {difference}")
    assert difference <= 1e-5
