"""Every benchmark end to end on a tiny random Flamingo, from fixture files in each benchmark's real format."""

from __future__ import annotations

import json
import re

import pytest
import torch
from evaluation_fixtures import build_tiny_flamingo, requires_java, single_torch_thread, write_benchmark
from helpers import make_test_image

import hf_flamingo.evaluation.runner as runner
import hf_flamingo.evaluation.tasks as tasks
from hf_flamingo.evaluation import (
    DatasetFormatError,
    EvaluationConfig,
    UnreadableImageError,
    class_log_likelihoods,
    compute_vqa_accuracy,
    evaluate,
    load_hateful_memes,
    load_karpathy_captions,
    load_vqa,
    roc_auc_score,
)
from hf_flamingo.evaluation.prompts import GenerationSettings


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_torch_thread()


@pytest.fixture(scope="module")
def model_and_processor():
    return build_tiny_flamingo()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("benchmarks")


@pytest.fixture(scope="module")
def benchmark_paths(data_root):
    return {
        task: write_benchmark(task, data_root)
        for task in ("coco", "flickr30k", "vqav2", "ok_vqa", "vizwiz", "textvqa", "imagenet", "hateful_memes")
    }


class Recorder:
    """Wraps a model call of the runner and records its prompts."""

    def __init__(self, function):
        self.function = function
        self.calls = []

    def __call__(self, model, processor, texts, images, *args, **kwargs):
        output = self.function(model, processor, texts, images, *args, **kwargs)
        self.calls.append(
            {"texts": list(texts), "num_images": [len(row) for row in images], "args": args, "output": output}
        )
        return output


GENERATION_TASKS = {"coco": 20, "flickr30k": 20, "vqav2": 5, "ok_vqa": 5, "vizwiz": 5, "textvqa": 10}


@pytest.mark.parametrize(
    "task",
    [pytest.param(task, marks=requires_java) for task in ("coco", "flickr30k")]
    + ["vqav2", "ok_vqa", "vizwiz", "textvqa", "imagenet", "hateful_memes"],
)
def test_task_end_to_end(task, model_and_processor, benchmark_paths, tmp_path, monkeypatch):
    model, processor = model_and_processor
    classification = task in ("imagenet", "hateful_memes")
    recorder = Recorder(tasks.class_log_likelihoods if classification else tasks.generate_batch)
    monkeypatch.setattr(tasks, "class_log_likelihoods" if classification else "generate_batch", recorder)
    config = EvaluationConfig(
        task=task,
        shots=(0, 2),
        seeds=(0,),
        batch_size=2,
        num_samples=3,
        max_new_tokens=3,  # keeps the test fast; the defaults are checked below
        ok_vqa_stemming=False,
        **benchmark_paths[task],
    )
    output = tmp_path / "results.json"
    results = evaluate(model, processor, config, output_path=output, progress=False)

    # The JSON has the scores and the full configuration.
    saved = json.loads(output.read_text())
    assert saved["task"] == task and saved["config"]["task"] == task and saved["config"]["shots"] == [0, 2]
    assert saved["config"]["batch_size"] == 2 and saved["environment"]["transformers"]
    assert [entry["shots"] for entry in saved["results"]] == [0, 2]
    for entry in saved["results"]:
        assert len(entry["trials"]) == 1 and entry["mean"] == entry["trials"][0] and entry["stddev"] == 0
        assert len(entry["predictions"]["0"]) == 3  # num_samples
    if not classification:
        assert saved["generation"] == {
            "max_new_tokens": 3,
            "min_new_tokens": 0,
            "num_beams": 3,
            "length_penalty": 0.0,
            "eos_token": "<|endofchunk|>",
        }

    # Prompts: 0 shots = 2 text-only demonstrations + the query image; 2 shots = 3 images; batches of 2 then 1.
    by_shots = {0: recorder.calls[:2], 2: recorder.calls[2:]}
    for shots, calls in by_shots.items():
        assert [len(call["texts"]) for call in calls] == [2, 1]
        for call in calls:
            for text, num_images in zip(call["texts"], call["num_images"], strict=True):
                assert text.count("<image>") == num_images == (1 if shots == 0 else 3)
                assert text.count("<|endofchunk|>") == 2
                if classification:
                    assert "\n" not in text
                else:
                    assert text.count("<|endofchunk|>\n") == 2

    # Each score is the metric of the saved predictions.
    for result in results.results:
        predictions = result.predictions[0]
        if task in ("vqav2", "ok_vqa", "vizwiz", "textvqa"):
            questions = load_vqa(config.test_questions, config.test_annotations, config.test_image_dir, task)
            answers = {example.id: example.references for example in questions}
            assert result.mean == compute_vqa_accuracy({p["id"]: p["prediction"] for p in predictions}, answers)
        elif task == "hateful_memes":
            labels = [p["label"] for p in predictions]
            if len(set(labels)) == 2:
                assert result.mean == pytest.approx(100 * roc_auc_score(labels, [p["yes_score"] for p in predictions]))
        elif task == "imagenet":
            assert result.mean == pytest.approx(100 * sum(p["label"] == p["prediction"] for p in predictions) / 3)
        else:
            assert 0 <= result.mean <= 1000


def test_default_generation_settings_per_task():
    for task, max_new_tokens in GENERATION_TASKS.items():
        paths = {
            name: "x"
            for name in (
                "karpathy_json",
                "image_dir",
                "train_questions",
                "train_annotations",
                "train_image_dir",
                "test_questions",
                "test_annotations",
            )
        }
        config = EvaluationConfig(task=task, **paths)
        assert config.generation_settings() == GenerationSettings(
            max_new_tokens=max_new_tokens, min_new_tokens=0, num_beams=3, length_penalty=0.0
        )


def _fake_vqa_generation(model, processor, texts, images, settings, precision="fp32"):
    # The fixture's question "What is the <word>?" has the majority answer <word>; add junk the post-processing cuts.
    words = [re.findall(r"Question:What is the (\w+)\? Short answer:$", text)[0] for text in texts]
    return [f"The {word.upper()}, maybe Question: what" for word in words]


def test_correct_answers_score_100_after_postprocessing(benchmark_paths, model_and_processor, monkeypatch):
    model, processor = model_and_processor
    monkeypatch.setattr(tasks, "generate_batch", _fake_vqa_generation)
    config = EvaluationConfig(task="vqav2", shots=(4,), seeds=(0,), batch_size=3, **benchmark_paths["vqav2"])
    result = evaluate(model, processor, config, progress=False).results[0]
    assert result.mean == 100.0
    assert {p["prediction"] for p in result.predictions[0]} == {"The SEA", "The SNOW", "The CAR"}


def test_ok_vqa_predictions_are_stemmed(benchmark_paths, model_and_processor, monkeypatch):
    model, processor = model_and_processor
    monkeypatch.setattr(tasks, "generate_batch", _fake_vqa_generation)

    class FakeStemmer:
        def __call__(self, text):
            return text.lower() + "s"

    monkeypatch.setattr(tasks.prompts, "OKVQAStemmer", FakeStemmer)
    config = EvaluationConfig(task="ok_vqa", shots=(2,), seeds=(0,), **benchmark_paths["ok_vqa"])
    result = evaluate(model, processor, config, progress=False).results[0]
    assert {p["prediction"] for p in result.predictions[0]} == {"the seas", "the snows", "the cars"}
    assert result.mean == 0.0  # annotations are not stemmed in the fixture


def test_reproducible_for_a_fixed_seed(benchmark_paths, model_and_processor, monkeypatch):
    model, processor = model_and_processor

    def run(seed):
        recorder = Recorder(tasks.generate_batch)
        monkeypatch.setattr(tasks, "generate_batch", recorder)
        config = EvaluationConfig(
            task="vizwiz", shots=(2,), seeds=(seed,), num_samples=2, max_new_tokens=2, **benchmark_paths["vizwiz"]
        )
        result = evaluate(model, processor, config, progress=False).results[0]
        return [call["texts"] for call in recorder.calls], result.predictions[seed], result.mean

    first, second, other = run(5), run(5), run(6)
    assert first == second
    assert first[0] != other[0]  # another seed draws other test samples and demonstrations


def test_rices_end_to_end_with_cached_features(benchmark_paths, model_and_processor, tmp_path, monkeypatch):
    model, processor = model_and_processor
    config = EvaluationConfig(
        task="hateful_memes",
        shots=(2,),
        seeds=(0, 1),
        rices=True,
        rices_cache_dir=str(tmp_path / "rices"),
        **benchmark_paths["hateful_memes"],
    )
    first = evaluate(model, processor, config, progress=False)
    cache = tmp_path / "rices" / "hateful_memes.safetensors"
    assert cache.is_file()

    def no_recompute(self):
        raise AssertionError("features should be read from the cache")

    monkeypatch.setattr(runner.RICES, "_compute_features", no_recompute)
    second = evaluate(model, processor, config, progress=False)
    assert second.results[0].trials == first.results[0].trials
    assert len(first.results[0].trials) == 2
    # RICES is deterministic: the seed only picks test samples, all of which are used here.
    assert first.results[0].trials[0] == first.results[0].trials[1]


def test_class_log_likelihoods_cache_matches_full_forward(model_and_processor):
    model, processor = model_and_processor
    texts = [
        "<image>Output:tench<image>Output:",  # longer: the other row is left-padded
        "<image>is an image with: 'x' written on it. Is it hateful? Answer:",
    ]
    images = [[make_test_image(1), make_test_image(2)], [make_test_image(3)]]
    names = ["tench", "great white shark", "no"]
    cached = class_log_likelihoods(model, processor, texts, images, names, use_cache=True)
    full = class_log_likelihoods(model, processor, texts, images, names, use_cache=False)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    # Hand check of one entry: mean log-probability of the class tokens after the unpadded prompt.
    inputs = processor(images=[images[1]], text=[texts[1]], return_tensors="pt")
    name_ids = processor.tokenizer("no", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.cat([inputs.input_ids, name_ids], 1), pixel_values=inputs.pixel_values).logits
    n, length = name_ids.shape[1], inputs.input_ids.shape[1]
    log_probs = logits[0, length - 1 : length - 1 + n].log_softmax(-1)
    expected = log_probs.gather(-1, name_ids[0, :, None]).mean()
    torch.testing.assert_close(cached[1, 2], expected, rtol=0, atol=1e-5)


def test_dataset_readers_in_benchmark_formats(benchmark_paths):
    coco = benchmark_paths["coco"]
    train = load_karpathy_captions(coco["karpathy_json"], coco["image_dir"], "train", "coco")
    test = load_karpathy_captions(coco["karpathy_json"], coco["image_dir"], "test", "coco")
    assert len(train) == 6 and len(test) == 3  # "restval" is in neither
    assert test[0].id == 1006 and test[0].image_path.parent.name == "val2014" and len(test[0].references) == 5
    assert train[0].image_path.name == "COCO_train2014_000000001000.jpg"
    vqa = benchmark_paths["vqav2"]
    questions = load_vqa(vqa["test_questions"], vqa["test_annotations"], vqa["test_image_dir"], "vqav2")
    assert questions[0].image_path.name == "COCO_val2014_000000002006.jpg" and len(questions[0].references) == 10
    memes = load_hateful_memes(
        benchmark_paths["hateful_memes"]["test_annotations"], benchmark_paths["hateful_memes"]["image_dir"]
    )
    assert [m.target for m in memes] == ["no", "yes", "no", "yes"] and memes[0].question == "a sea meme"


def test_bad_dataset_files_raise_specific_errors(benchmark_paths, tmp_path, model_and_processor):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"id": 1, "img": "img/1.png", "label": 0, "text": "ok"}\n{not json\n')
    with pytest.raises(DatasetFormatError, match="line 2 is not valid JSON"):
        load_hateful_memes(bad_jsonl, tmp_path)
    with pytest.raises(DatasetFormatError, match="dataset file not found"):
        load_karpathy_captions(tmp_path / "missing.json", tmp_path, "test")
    with pytest.raises(DatasetFormatError, match="must be COCO's"):
        vqa = benchmark_paths["vizwiz"]
        load_vqa(vqa["test_questions"], vqa["test_annotations"], vqa["test_image_dir"], "vqav2")
    with pytest.raises(ValueError, match="needs karpathy_json, image_dir"):
        EvaluationConfig(task="coco")
    # An unreadable image in the test split is reported with its path.
    broken = tmp_path / "broken"
    paths = write_benchmark("hateful_memes", broken)
    image = broken / "hateful_memes" / "img" / "40006.png"
    image.write_bytes(b"not a png")
    model, processor = model_and_processor
    config = EvaluationConfig(task="hateful_memes", shots=(0,), **paths)
    with pytest.raises(UnreadableImageError, match="40006.png"):
        evaluate(model, processor, config, progress=False)


def test_bf16_autocast_runs_close_to_fp32(model_and_processor):
    model, processor = model_and_processor
    texts = ["<image>is an image with: 'x' written on it. Is it hateful? Answer:"]
    images = [[make_test_image(5)]]
    fp32 = class_log_likelihoods(model, processor, texts, images, ["no", "yes"])
    bf16 = class_log_likelihoods(model, processor, texts, images, ["no", "yes"], precision="amp_bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.1)


def test_rices_with_a_separate_clip_model(benchmark_paths, model_and_processor, tmp_path):
    from safetensors import safe_open
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model, processor = model_and_processor
    torch.manual_seed(1)
    clip_config = CLIPVisionConfig(**{**model.config.vision_config.to_dict(), "projection_dim": 6})
    CLIPVisionModelWithProjection(clip_config).save_pretrained(tmp_path / "clip")
    config = EvaluationConfig(
        task="imagenet",
        shots=(2,),
        seeds=(0,),
        rices=True,
        rices_vision_model=str(tmp_path / "clip"),
        rices_cache_dir=str(tmp_path / "cache"),
        **benchmark_paths["imagenet"],
    )
    results = evaluate(model, processor, config, progress=False)
    assert results.config["rices_vision_model"] == str(tmp_path / "clip")

    with safe_open(str(tmp_path / "cache" / "imagenet.safetensors"), framework="pt") as file:
        assert file.get_tensor("features").shape == (6, 6)  # 6 training images, projection_dim 6
        assert file.metadata()["encoder"] == str(tmp_path / "clip")


def test_classification_prompt_ensembling_averages_demonstration_orders(
    benchmark_paths, model_and_processor, monkeypatch
):
    model, processor = model_and_processor
    recorder = Recorder(tasks.class_log_likelihoods)
    monkeypatch.setattr(tasks, "class_log_likelihoods", recorder)
    config = EvaluationConfig(
        task="hateful_memes",
        shots=(3,),
        seeds=(0,),
        batch_size=4,
        classification_prompt_ensembling=True,
        **benchmark_paths["hateful_memes"],
    )
    result = evaluate(model, processor, config, progress=False).results[0]
    assert len(recorder.calls) == 6  # min(6, 3!) orders of the demonstrations, for the one batch of 4
    orders = [call["texts"][0] for call in recorder.calls]
    query = orders[0][orders[0].rindex("<image>") :]
    assert all(text.endswith(query) for text in orders) and len(set(orders)) > 1
    assert sorted(orders[0].split("<|endofchunk|>")[:-1]) == sorted(orders[1].split("<|endofchunk|>")[:-1])
    # The score comes from the mean log-likelihoods over the orders: P("yes") under a softmax over the two classes.
    mean_scores = torch.stack([call["output"] for call in recorder.calls]).mean(0)
    yes_probability = mean_scores.softmax(-1)[:, 1].tolist()
    labels = [p["label"] for p in result.predictions[0]]
    assert [p["yes_score"] for p in result.predictions[0]] == pytest.approx(yes_probability, abs=1e-6)
    assert result.mean == pytest.approx(100 * roc_auc_score(labels, yes_probability))


def test_class_log_likelihoods_cache_matches_full_forward_with_a_sliding_window_cache():
    """A sliding-window cache cannot be cropped back to the prompt: each class name continues from a copy."""
    from model_testers import open_gates, vision_config_for
    from transformers import CLIPVisionModel, MistralConfig, MistralForCausalLM

    from hf_flamingo import FlamingoForConditionalGeneration

    _, processor = build_tiny_flamingo()
    torch.manual_seed(0)
    text_config = MistralConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,  # shorter than the prompts
        bos_token_id=0,
        eos_token_id=0,
    )
    model = FlamingoForConditionalGeneration.from_backbones(
        CLIPVisionModel(vision_config_for("clip")),
        MistralForCausalLM(text_config),
        tokenizer=processor.tokenizer,
        cross_attn_every_n_layers=1,
        perceiver_depth=1,
        perceiver_num_latents=4,
    ).eval()
    open_gates(model)
    texts = ["<image>Output:tench<image>Output:", "<image>Output:"]
    images = [[make_test_image(1), make_test_image(2)], [make_test_image(3)]]
    names = ["tench", "great white shark"]
    cached = class_log_likelihoods(model, processor, texts, images, names, use_cache=True)
    full = class_log_likelihoods(model, processor, texts, images, names, use_cache=False)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    again = class_log_likelihoods(model, processor, texts, images, names[::-1], use_cache=True)
    torch.testing.assert_close(again, cached.flip(-1), rtol=0, atol=1e-5)
