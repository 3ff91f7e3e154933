"""Model cards: `save_pretrained` / `push_to_hub` of a Flamingo built with `from_backbones` or fine-tuned with `Trainer`
write `huggingface_hub` model cards (base models, interval, usage, license, training data, evaluation results)."""

import json
import re

import pytest
import torch
from helpers import make_test_image
from huggingface_hub import ModelCard
from model_testers import flamingo_config, open_gates
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from hf_flamingo import FlamingoDataCollator, FlamingoForConditionalGeneration
from hf_flamingo.evaluation import EvaluationResults, ShotResult
from hf_flamingo.model_card import PLACEHOLDER_MODEL_ID, usage_snippet

VISION_ID = "openai/clip-vit-base-patch32"
LANGUAGE_ID = "meta-llama/Llama-3.2-1B"


@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory):
    """A tiny CLIP vision tower and a tiny Llama saved as `from_backbones` would download them."""
    from model_testers import vision_config_for

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    CLIPVisionModel(vision_config_for("clip")).save_pretrained(root / "clip-tiny")
    language_config = LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    LlamaForCausalLM(language_config).save_pretrained(root / "llama-tiny")
    return root


def _from_backbones(backbone_dirs, processor):
    torch.manual_seed(0)
    return FlamingoForConditionalGeneration.from_backbones(
        backbone_dirs / "clip-tiny",
        backbone_dirs / "llama-tiny",
        tokenizer=processor.tokenizer,
        cross_attn_every_n_layers=2,
        perceiver_depth=1,
        perceiver_num_latents=4,
    )


def _as_if_from_hub(model):
    """What `from_backbones("openai/...", "meta-llama/...")` records: the Hub ids as the sub-configs' names."""
    model.config.vision_config._name_or_path = VISION_ID
    model.config.text_config._name_or_path = LANGUAGE_ID
    return model


def _snippet(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)


def test_save_pretrained_writes_a_card(backbone_dirs, tiny_processor, tmp_path):
    model = _as_if_from_hub(_from_backbones(backbone_dirs, tiny_processor))
    model.save_pretrained(tmp_path / "saved")
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["tags"] == ["flamingo", "hf_flamingo"]
    assert data["base_model"] == [VISION_ID, LANGUAGE_ID]
    assert data["base_model_relation"] == "finetune"
    assert "license" not in data and "datasets" not in data and "model-index" not in data
    assert usage_snippet() in card.text
    assert f'model_id = "{PLACEHOLDER_MODEL_ID}"' in card.text
    assert "`(i + 1) % 2 == 0` (`cross_attn_every_n_layers=2`, 2 blocks)" in card.text
    assert "`<image>` = 321, `<|endofchunk|>` = 320" in card.text
    trainable = model.num_parameters(only_trainable=True)
    assert f"of which {trainable:,} in the Perceiver Resampler and the cross-attention blocks" in card.text
    assert (
        f"Vision encoder: [`{VISION_ID}`](https://huggingface.co/{VISION_ID}): CLIPVisionModel, 2 layers" in card.text
    )
    assert "Language model: [`meta-llama/Llama-3.2-1B`]" in card.text
    assert "## Training data\n\nNot recorded." in card.text
    assert "whose licenses apply" in card.text and f"`{VISION_ID}` and `{LANGUAGE_ID}`" in card.text


def test_base_model_names_survive_a_save_load_round_trip(backbone_dirs, tiny_processor, tmp_path):
    model = _from_backbones(backbone_dirs, tiny_processor)
    # `from_backbones` given local directories: they are recorded, but only named (never paths) in the card.
    assert model.config.vision_config._name_or_path == str(backbone_dirs / "clip-tiny")
    local_card = model.create_model_card()
    assert local_card.data.base_model is None
    assert "Vision encoder: `clip-tiny` (a local checkpoint)" in local_card.text
    assert str(backbone_dirs) not in local_card.content

    _as_if_from_hub(model).save_pretrained(tmp_path / "saved", model_card=False)
    assert not (tmp_path / "saved" / "README.md").exists()
    reloaded = FlamingoForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert reloaded.create_model_card().data.base_model == [VISION_ID, LANGUAGE_ID]


def test_usage_snippet_runs_against_the_saved_directory(backbone_dirs, tiny_processor, tmp_path, monkeypatch, capsys):
    import transformers.image_utils

    model = _from_backbones(backbone_dirs, tiny_processor)
    open_gates(model)
    directory = tmp_path / "saved"
    model.save_pretrained(directory)
    tiny_processor.save_pretrained(directory)
    images = {"000000039769": make_test_image(1), "000000000285": make_test_image(2)}
    monkeypatch.setattr(transformers.image_utils, "load_image", lambda url: images[url.rsplit("/", 1)[1][:-4]])

    code = _snippet((directory / "README.md").read_text())
    code = code.replace(f'model_id = "{PLACEHOLDER_MODEL_ID}"', f"model_id = {str(directory)!r}")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()

    prompt = "<image>Output:two cats sleeping on a pink blanket.<|endofchunk|><image>Output:"
    inputs = tiny_processor(
        images=[[images["000000039769"], images["000000000285"]]], text=[prompt], return_tensors="pt"
    )
    generated = model.eval().generate(**inputs, max_new_tokens=20, num_beams=3)
    expected = tiny_processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert printed == repr(expected)


def test_an_existing_readme_is_kept_and_an_explicit_card_is_written(backbone_dirs, tiny_processor, tmp_path):
    model = _from_backbones(backbone_dirs, tiny_processor)
    directory = tmp_path / "saved"
    directory.mkdir()
    (directory / "README.md").write_text("# My own card\n")
    model.save_pretrained(directory)
    assert (directory / "README.md").read_text() == "# My own card\n"
    assert (directory / "config.json").is_file()

    card = model.create_model_card(license="apache-2.0", datasets="my/captions", training_data="10k captions.")
    model.save_pretrained(directory, model_card=card)
    written = ModelCard.load(directory / "README.md")
    assert written.data.license == "apache-2.0"
    assert written.data.datasets == ["my/captions"]
    assert (
        "## Training data\n\n10k captions.\n\nData sets: [`my/captions`](https://huggingface.co/datasets/my/captions)."
        in written.text
    )
    assert "## License\n\n`apache-2.0`." in written.text

    # A process that is not the main one writes nothing.
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1" / "README.md").exists()


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records calls and what `upload_folder` would upload."""

    calls: list = []
    remote_readme = False

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"me/{repo_id}"})()

    def file_exists(self, repo_id, filename, **kwargs):
        return self.remote_readme

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kwargs):
        names = {pattern for pattern in allow_patterns if not pattern.endswith("/*")}
        files = {name: (folder_path / name).read_bytes() for name in names if (folder_path / name).is_file()}
        self.calls.append(("upload_folder", repo_id, files, kwargs))
        return "commit-info"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    RecordingApi.calls = []
    RecordingApi.remote_readme = False
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


def test_push_to_hub_uploads_the_flamingo_card(backbone_dirs, tiny_processor, hub):
    model = _as_if_from_hub(_from_backbones(backbone_dirs, tiny_processor))
    assert model.push_to_hub("me/tiny-flamingo", private=True, token="t", tags=["demo"]) == "commit-info"
    assert hub.calls[0] == ("init", "t")
    assert hub.calls[1] == ("create_repo", "me/tiny-flamingo", {"private": True, "exist_ok": True})
    kind, repo_id, files, options = hub.calls[2]
    assert (kind, repo_id) == ("upload_folder", "me/tiny-flamingo")
    assert options == {
        "commit_message": "Upload model",
        "commit_description": None,
        "create_pr": False,
        "revision": None,
    }
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.tags == ["flamingo", "hf_flamingo", "demo"]
    assert card.data.base_model == [VISION_ID, LANGUAGE_ID]
    assert usage_snippet("me/tiny-flamingo") in card.text
    assert "# tiny-flamingo" in card.text


def test_push_keeps_the_card_a_hub_repository_has(backbone_dirs, tiny_processor, hub, tmp_path):
    model = _from_backbones(backbone_dirs, tiny_processor)
    hub.remote_readme = True
    model.save_pretrained(tmp_path / "tiny-flamingo", push_to_hub=True, revision="v1")
    assert hub.calls[1] == ("create_repo", "tiny-flamingo", {"private": None, "exist_ok": True})
    assert hub.calls[2] == ("create_branch", "me/tiny-flamingo", "v1")
    kind, repo_id, files, options = hub.calls[3]
    assert (kind, repo_id, options["revision"]) == ("upload_folder", "me/tiny-flamingo", "v1")
    assert "config.json" in files and "README.md" not in files
    # The local copy is written all the same, with the repository in its usage snippet.
    assert usage_snippet("me/tiny-flamingo") in (tmp_path / "tiny-flamingo" / "README.md").read_text()

    # A card passed explicitly is uploaded even over the repository's.
    hub.calls.clear()
    model.push_to_hub("me/tiny-flamingo", model_card=model.create_model_card(license="mit"))
    assert ModelCard(hub.calls[-1][2]["README.md"].decode()).data.license == "mit"


def _trainer(tiny_processor, tmp_path):
    config = flamingo_config(
        "llama", media_token_id=tiny_processor.media_token_id, eoc_token_id=tiny_processor.eoc_token_id
    )
    config.text_config.vocab_size = len(tiny_processor.tokenizer)
    torch.manual_seed(0)
    model = FlamingoForConditionalGeneration(config)
    model.freeze_backbones()
    features = []
    for seed, caption in enumerate(["A red circle.", "A blue square."]):
        text = f"<image>{caption}<|endofchunk|><|endoftext|>"
        encoded = tiny_processor(images=[[make_test_image(seed, 30, 30)]], text=[text], return_tensors="pt")
        features.append({"input_ids": encoded["input_ids"][0], "pixel_values": encoded["pixel_values"][0]})
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=features, data_collator=FlamingoDataCollator(tiny_processor))


def test_trainer_save_model_writes_the_card_and_merges_with_trainers_card(tiny_processor, tmp_path):
    trainer = _trainer(tiny_processor, tmp_path)
    trainer.train()
    trainer.save_model()
    readme = tmp_path / "out" / "README.md"
    saved = ModelCard.load(readme)
    assert saved.data.pipeline_tag == "image-text-to-text"
    assert usage_snippet() in saved.text
    interval = trainer.model.config.cross_attn_every_n_layers
    assert f"`(i + 1) % {interval} == 0` (`cross_attn_every_n_layers={interval}`" in saved.text

    # `Trainer.create_model_card` (run by `Trainer.push_to_hub`) replaces README.md with its own card ...
    trainer.create_model_card(model_name="tiny-flamingo", dataset="my/captions")
    trainers = ModelCard.load(readme)
    assert "## Usage" not in trainers.text and "### Training hyperparameters" in trainers.text
    # ... which the Flamingo card can take in: both texts, merged metadata.
    merged = trainer.model.create_model_card(repo_id="me/tiny-flamingo", license="mit", merge_with=readme)
    assert merged.text.index("## Usage") < merged.text.index("### Training hyperparameters")
    assert merged.data.pipeline_tag == "image-text-to-text"
    assert merged.data.license == "mit"
    assert set(merged.data.tags) >= {"flamingo", "hf_flamingo", "generated_from_trainer"}
    assert merged.data.datasets == trainers.data.datasets


def test_evaluation_results_become_the_model_index(backbone_dirs, tiny_processor, tmp_path):
    coco = EvaluationResults(
        task="coco",
        metric="CIDEr",
        results=[ShotResult(0, [71.25, 73.75], 72.5, 1.25), ShotResult(4, [80.0], 80.0, 0.0)],
        config={},
        generation={},
        environment={},
    )
    coco.save(tmp_path / "coco.json")
    vqa = {"task": "vqav2", "metric": "VQA accuracy", "results": [{"shots": 8, "mean": 44.5, "stddev": float("nan")}]}
    (tmp_path / "vqav2.json").write_text(json.dumps(vqa))

    model = _from_backbones(backbone_dirs, tiny_processor)
    card = model.create_model_card(
        repo_id="me/fl", evaluation_results=[tmp_path / "coco.json", tmp_path / "vqav2.json"]
    )
    reparsed = ModelCard(card.content)
    index = reparsed.data.to_dict()["model-index"]
    assert index[0]["name"] == "fl"
    results = {entry["dataset"]["type"]: entry for entry in index[0]["results"]}
    assert results["coco"]["task"] == {"type": "image-to-text", "name": "Image captioning"}
    assert [(m["name"], m["type"], m["value"]) for m in results["coco"]["metrics"]] == [
        ("CIDEr (0-shot)", "cider", 72.5),
        ("CIDEr (4-shot)", "cider", 80.0),
    ]
    assert [(m["name"], m["value"]) for m in results["vqav2"]["metrics"]] == [("VQA accuracy (8-shot)", 44.5)]
    assert "| COCO (Karpathy test split) | CIDEr | 0 | 72.50 ± 1.25 | 2 |" in card.text
    assert "| VQAv2 | VQA accuracy | 8 | 44.50 | 1 |" in card.text

    with pytest.raises(ValueError, match="is not a results file of `hf_flamingo.evaluation.evaluate`"):
        model.create_model_card(evaluation_results={"task": "coco"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.create_model_card(evaluation_results=tmp_path / "missing.json")


def test_converter_card_is_built_by_the_same_builder(backbone_dirs, tiny_processor):
    from hf_flamingo.conversion.openflamingo import ConversionReport
    from hf_flamingo.conversion.openflamingo_to_hf import model_card
    from hf_flamingo.conversion.releases import get_release

    model = _from_backbones(backbone_dirs, tiny_processor)
    report = ConversionReport(10, ["a"] * 6, ["b"] * 3, ["c"] * 3, ["d"], {}, 2)
    release = get_release("OpenFlamingo-3B-vitl-mpt1b")
    text = model_card(
        model, report, release=release, vision_model=release.vision_model, language_model=release.language_model
    )
    card = ModelCard(text)
    assert card.data.license == "mit"
    assert card.data.tags == ["flamingo", "hf_flamingo", "openflamingo"]
    assert card.data.base_model == [release.vision_model, release.language_model]
    assert "# OpenFlamingo-3B-vitl-mpt1b (Transformers-native)" in card.text
    assert release.model_card_notes in card.text
    assert (
        "Conversion: 6 weights from the checkpoint (10 keys, of which 3 duplicate aliases and 1 obsolete buffers "
        "were dropped); 3 frozen backbone weights from the backbones." in card.text
    )
    assert "fp32 reproduces the original model to within float rounding." in card.text
    assert "Multimodal C4" in card.text
    assert usage_snippet() in card.text
