"""Tiny benchmark data sets in each benchmark's real file format, and a tiny Flamingo + processor, for the
evaluation and command-line tests (no network: everything is written into a temporary folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_image_processor, build_tiny_tokenizer, make_test_image
from model_testers import open_gates, vision_config_for
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from hf_flamingo import FlamingoForConditionalGeneration, FlamingoProcessor


def single_torch_thread():
    """Generator for a module fixture: one torch thread while the module runs (tiny ops on a shared 2-core machine run
    several times faster without thread hand-offs), then the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# CIDEr runs pycocoevalcap's PTB tokenizer, a java program. The test machines have java (see README); without it
# these tests fail with `compute_cider`'s message instead of being skipped.
requires_java = pytest.mark.java


WORDS = ["red", "blue", "green", "dog", "cat", "bird", "sea", "snow", "car", "mat", "fox", "tree"]


def build_tiny_flamingo() -> tuple[FlamingoForConditionalGeneration, FlamingoProcessor]:
    """A random Flamingo (tiny CLIP tower, 4-layer Llama, gates opened) with a `FlamingoProcessor` over the tiny
    byte-level tokenizer (`<|endofchunk|>` 320, `<image>` 321, `<PAD>` 322)."""
    processor = FlamingoProcessor(image_processor=build_tiny_image_processor(), tokenizer=build_tiny_tokenizer())
    torch.manual_seed(0)
    language_model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    model = FlamingoForConditionalGeneration.from_backbones(
        CLIPVisionModel(vision_config_for("clip")),
        language_model,
        tokenizer=processor.tokenizer,
        cross_attn_every_n_layers=2,
        perceiver_depth=1,
        perceiver_num_latents=4,
    )
    open_gates(model)
    return model.eval(), processor


def _caption(seed: int, number: int) -> str:
    words = [WORDS[(seed * 3 + number + k) % len(WORDS)] for k in range(3)]
    return f"A {words[0]} {words[1]} near the {words[2]}."


def _save_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_test_image(seed, height=32, width=36).save(path, format="PNG")


def _answers(seed: int) -> list[dict]:
    # 10 annotators; most say the first word, some a second one.
    main, other = WORDS[seed % len(WORDS)], WORDS[(seed + 5) % len(WORDS)]
    return [{"answer": main if k < 7 else other, "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]


def write_coco(root: Path, num_train: int = 6, num_test: int = 3) -> dict:
    """`dataset_coco.json` (Karpathy) with train2014/val2014 images; returns the `EvaluationConfig` path fields."""
    images = []
    for index in range(num_train + num_test + 1):
        split = "train" if index < num_train else "test" if index < num_train + num_test else "restval"
        folder = "train2014" if split == "train" else "val2014"
        cocoid = 1000 + index
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        _save_png(root / "coco" / folder / filename, seed=index)
        sentences = [
            {
                "tokens": _caption(index, n).lower().rstrip(".").split(),
                "raw": _caption(index, n),
                "imgid": index,
                "sentid": 5 * index + n,
            }
            for n in range(5)
        ]
        images.append(
            {
                "filepath": folder,
                "sentids": [s["sentid"] for s in sentences],
                "filename": filename,
                "imgid": index,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        )
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return {"karpathy_json": str(path), "image_dir": str(root / "coco")}


def write_flickr30k(root: Path, num_train: int = 6, num_test: int = 3) -> dict:
    """`dataset_flickr30k.json` (Karpathy) with its image folder."""
    images = []
    for index in range(num_train + num_test):
        filename = f"{100000 + index}.jpg"
        _save_png(root / "flickr30k_images" / filename, seed=50 + index)
        sentences = [
            {"tokens": [], "raw": _caption(50 + index, n), "imgid": index, "sentid": 5 * index + n} for n in range(5)
        ]
        images.append(
            {
                "sentids": [],
                "imgid": index,
                "sentences": sentences,
                "split": "train" if index < num_train else "test",
                "filename": filename,
            }
        )
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return {"karpathy_json": str(path), "image_dir": str(root / "flickr30k_images")}


def _vqa_split(root: Path, dataset: str, split: str, image_dir: Path, start: int, count: int) -> tuple[Path, Path]:
    questions, annotations = [], []
    for index in range(start, start + count):
        if dataset in ("vqav2", "ok_vqa"):
            image_id = 2000 + index
            _save_png(image_dir / f"COCO_{image_dir.name}_{image_id:012d}.jpg", seed=100 + index)
        elif dataset == "vizwiz":
            image_id = f"VizWiz_{split}_{index:08d}.jpg"
            _save_png(image_dir / image_id, seed=100 + index)
        else:  # textvqa
            image_id = f"{index:016x}"
            _save_png(image_dir / f"{image_id}.jpg", seed=100 + index)
        question_id = 30000 + index
        questions.append(
            {"image_id": image_id, "question": f"What is the {WORDS[index % 12]}?", "question_id": question_id}
        )
        annotations.append(
            {
                "question_type": "what is the",
                "multiple_choice_answer": WORDS[index % 12],
                "answers": _answers(index),
                "image_id": image_id,
                "answer_type": "other",
                "question_id": question_id,
            }
        )
    questions_path = root / f"{dataset}_{split}_questions.json"
    annotations_path = root / f"{dataset}_{split}_annotations.json"
    questions_path.write_text(
        json.dumps(
            {
                "info": {},
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "license": {},
                "data_subtype": split,
                "questions": questions,
            }
        )
    )
    annotations_path.write_text(
        json.dumps({"info": {}, "license": {}, "data_subtype": split, "annotations": annotations})
    )
    return questions_path, annotations_path


def write_vqa(root: Path, dataset: str, num_train: int = 6, num_test: int = 3) -> dict:
    """VQA-format questions + annotations and images (VQAv2 / OK-VQA: COCO file names in train2014/val2014)."""
    if dataset in ("vqav2", "ok_vqa"):
        train_dir, test_dir = root / dataset / "train2014", root / dataset / "val2014"
    else:
        train_dir, test_dir = root / dataset / "train", root / dataset / "val"
    train_q, train_a = _vqa_split(root, dataset, "train", train_dir, 0, num_train)
    test_q, test_a = _vqa_split(root, dataset, "val", test_dir, num_train, num_test)
    return {
        "train_questions": str(train_q),
        "train_annotations": str(train_a),
        "train_image_dir": str(train_dir),
        "test_questions": str(test_q),
        "test_annotations": str(test_a),
        "test_image_dir": str(test_dir),
    }


def write_imagenet(root: Path, per_class_train: int = 2, per_class_val: int = 1) -> dict:
    """An ImageNet-style folder `imagenet/{train,val}/<wnid>/<image>.JPEG` with 3 classes and a class-names file."""
    wnids = ["n01440764", "n01443537", "n01484850"]
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for label, wnid in enumerate(wnids):
            for k in range(count):
                _save_png(root / "imagenet" / split / wnid / f"{wnid}_{split}_{k}.JPEG", seed=200 + 10 * label + k)
    names = root / "imagenet_classnames.txt"
    names.write_text("tench\ngoldfish\ngreat white shark\n")
    return {"imagenet_root": str(root / "imagenet"), "class_names_file": str(names)}


def write_hateful_memes(root: Path, num_train: int = 6, num_test: int = 4) -> dict:
    """HatefulMemes `train.jsonl` / `dev_seen.jsonl` (`{"id", "img", "label", "text"}`) and `img/` images."""
    paths = {}
    for split, start, count in (("train", 0, num_train), ("dev_seen", num_train, num_test)):
        lines = []
        for index in range(start, start + count):
            meme_id = 40000 + index
            _save_png(root / "hateful_memes" / "img" / f"{meme_id}.png", seed=300 + index)
            lines.append(
                json.dumps(
                    {
                        "id": meme_id,
                        "img": f"img/{meme_id}.png",
                        "label": index % 2,
                        "text": f"a {WORDS[index % 12]} meme",
                    }
                )
            )
        path = root / "hateful_memes" / f"{split}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths[split] = path
    return {
        "train_annotations": str(paths["train"]),
        "test_annotations": str(paths["dev_seen"]),
        "image_dir": str(root / "hateful_memes" / "img"),
    }


def write_benchmark(task: str, root: Path) -> dict:
    """Writes the fixture files of `task` under `root`; returns the `EvaluationConfig` path fields."""
    if task == "coco":
        return write_coco(root)
    if task == "flickr30k":
        return write_flickr30k(root)
    if task == "imagenet":
        return write_imagenet(root)
    if task == "hateful_memes":
        return write_hateful_memes(root)
    return write_vqa(root, task)
