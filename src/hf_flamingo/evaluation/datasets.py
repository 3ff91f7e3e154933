"""Readers for the standard files of OpenFlamingo's benchmarks, from local paths (nothing is downloaded).

| benchmark | files | image path |
|---|---|---|
| COCO | Karpathy `dataset_coco.json` (`split` "train" for demonstrations, "test" for queries) | `image_dir/<filepath>/<filename>` |
| Flickr30K | Karpathy `dataset_flickr30k.json` | `image_dir/<filename>` |
| VQAv2, OK-VQA | `{"questions": [...]}` + `{"annotations": [...]}` (official VQA format) | `image_dir/COCO_<split>_<image_id:012d>.jpg`, `<split>` = the name of `image_dir` |
| VizWiz | the same formats (OpenFlamingo's reformatted files) | `image_dir/<image_id>` (a file name) |
| TextVQA | the same formats (OpenFlamingo's reformatted files) | `image_dir/<image_id>.jpg` |
| ImageNet | class folders `root/<split>/<class>/<image>` (as torchvision's `ImageFolder`) | the file |
| HatefulMemes | jsonl lines `{"id", "img", "label", "text"}` | `image_dir/<basename of img>` |

Every reader returns a list of [`EvalExample`]; images are opened only when a batch needs them ([`load_image`]).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

__all__ = [
    "DatasetFormatError",
    "EvalExample",
    "UnreadableImageError",
    "load_coco_style_references",
    "load_hateful_memes",
    "load_image",
    "load_image_folder",
    "load_karpathy_captions",
    "load_vqa",
]

VQA_DATASETS = ("vqav2", "ok_vqa", "vizwiz", "textvqa")
_COCO_IMAGE_SPLITS = ("train2014", "val2014", "test2015")
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DatasetFormatError(ValueError):
    """A dataset file is missing, is not valid JSON/JSONL, or lacks a field the benchmark's format has."""


class UnreadableImageError(ValueError):
    """An image file is missing or cannot be decoded."""


@dataclass(frozen=True)
class EvalExample:
    """One benchmark example, usable both as a query and as a demonstration.

    Args:
        id (`Hashable`): Unique id: COCO image id, Flickr30K file stem, VQA question id, HatefulMemes id, or the image
            path for ImageNet-style folders.
        image_path (`Path`): The image file.
        target (`str`): What a demonstration shows as its answer: the first caption, the first annotator answer, or the
            class name.
        question (`str`, *optional*): The VQA question, or the HatefulMemes OCR text.
        references (`tuple[str, ...]`): All reference captions (captioning) or annotator answers (VQA).
        label (`int`, *optional*): The class index (classification).
    """

    id: Hashable
    image_path: Path
    target: str
    question: str | None = None
    references: tuple[str, ...] = ()
    label: int | None = None


def load_image(path: str | Path) -> Image.Image:
    """Opens an image as RGB, or raises [`UnreadableImageError`] naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UnreadableImageError(f"cannot read image {path}: {error}") from error


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"dataset file not found: {path}")
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path} is not valid JSON: {error}") from error


def _field(record: dict, key: str, path: Path, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise DatasetFormatError(f"{path}: {where} has no {key!r} field.")
    return record[key]


def load_karpathy_captions(
    karpathy_json: str | Path, image_dir: str | Path, split: str, dataset: str = "coco"
) -> list[EvalExample]:
    """Reads a Karpathy-split captioning file (`dataset_coco.json` or `dataset_flickr30k.json`).

    Args:
        karpathy_json (`str` or `Path`): The Karpathy file: `{"images": [{"filename", "split", "sentences": [{"raw"}],
            "cocoid", "filepath"}, ...]}` (`cocoid`/`filepath` only for COCO).
        image_dir (`str` or `Path`): COCO: the folder holding `train2014/` and `val2014/`; Flickr30K: the image folder.
        split (`str`): `"train"` (demonstrations, as OpenFlamingo: not "restval") or `"test"` (queries).
        dataset (`str`): `"coco"` or `"flickr30k"`.

    Returns:
        `list[EvalExample]` with `target` = the first raw caption and `references` = all raw captions; ids are COCO
        image ids (`int`) or Flickr30K file stems (`str`).
    """
    if dataset not in ("coco", "flickr30k"):
        raise ValueError(f"dataset must be 'coco' or 'flickr30k', got {dataset!r}.")
    path = Path(karpathy_json)
    images = _field(_read_json(path), "images", path, "the top-level object")
    image_dir = Path(image_dir)
    examples = []
    for index, entry in enumerate(images):
        where = f"images[{index}]"
        if _field(entry, "split", path, where) != split:
            continue
        filename = _field(entry, "filename", path, where)
        sentences = _field(entry, "sentences", path, where)
        references = tuple(_field(sentence, "raw", path, f"{where}.sentences") for sentence in sentences)
        if not references:
            raise DatasetFormatError(f"{path}: {where} has no sentences.")
        if dataset == "coco":
            image_path = image_dir / _field(entry, "filepath", path, where) / filename
            example_id = _field(entry, "cocoid", path, where)
        else:
            image_path = image_dir / filename
            example_id = filename.split(".")[0]
        examples.append(EvalExample(example_id, image_path, references[0], references=references))
    return examples


def load_coco_style_references(annotations_json: str | Path) -> dict[Hashable, list[str]]:
    """Reads COCO-format caption annotations (`captions_val2014.json`, `dataset_flickr30k_coco_style.json`).

    OpenFlamingo scores CIDEr against these files. Ids are returned both as found and as strings, so Flickr30K
    stems match whichever type the file uses.

    Returns:
        `dict`: image id -> reference captions.
    """
    path = Path(annotations_json)
    annotations = _field(_read_json(path), "annotations", path, "the top-level object")
    references: dict[Hashable, list[str]] = {}
    for index, annotation in enumerate(annotations):
        image_id = _field(annotation, "image_id", path, f"annotations[{index}]")
        caption = _field(annotation, "caption", path, f"annotations[{index}]")
        references.setdefault(image_id, []).append(caption)
    for image_id in list(references):
        references.setdefault(str(image_id), references[image_id])
    return references


def _vqa_image_path(dataset: str, image_dir: Path, image_id: Any) -> Path:
    if dataset in ("vqav2", "ok_vqa"):
        coco_split = image_dir.name
        if coco_split not in _COCO_IMAGE_SPLITS:
            raise DatasetFormatError(
                f"for {dataset}, the image folder must be COCO's {'/'.join(_COCO_IMAGE_SPLITS)} (its name gives the "
                f"file names COCO_<split>_<id>.jpg), got {image_dir}."
            )
        return image_dir / f"COCO_{coco_split}_{int(image_id):012d}.jpg"
    if dataset == "vizwiz":
        return image_dir / str(image_id)
    return image_dir / f"{image_id}.jpg"  # textvqa


def load_vqa(
    questions_json: str | Path,
    annotations_json: str | Path | None,
    image_dir: str | Path,
    dataset: str,
) -> list[EvalExample]:
    """Reads VQA-format questions and annotations (VQAv2, OK-VQA, and OpenFlamingo's VizWiz/TextVQA files).

    Args:
        questions_json (`str` or `Path`): `{"questions": [{"question_id", "image_id", "question"}, ...]}`.
        annotations_json (`str` or `Path`, *optional*): `{"annotations": [{"question_id", "answers": [{"answer"},
            ...]}, ...]}`; without it, examples have no answers (they can only be queries without a score).
        image_dir (`str` or `Path`): The image folder (for VQAv2/OK-VQA named `train2014`, `val2014` or `test2015`).
        dataset (`str`): One of `"vqav2"`, `"ok_vqa"`, `"vizwiz"`, `"textvqa"`.

    Returns:
        `list[EvalExample]` with `question`, `references` = the annotator answers, and `target` = the first one.
    """
    if dataset not in VQA_DATASETS:
        raise ValueError(f"dataset must be one of {VQA_DATASETS}, got {dataset!r}.")
    questions_path = Path(questions_json)
    questions = _field(_read_json(questions_path), "questions", questions_path, "the top-level object")
    answers_by_id: dict[Any, tuple[str, ...]] = {}
    if annotations_json is not None:
        annotations_path = Path(annotations_json)
        annotations = _field(_read_json(annotations_path), "annotations", annotations_path, "the top-level object")
        for index, annotation in enumerate(annotations):
            where = f"annotations[{index}]"
            question_id = _field(annotation, "question_id", annotations_path, where)
            answers = _field(annotation, "answers", annotations_path, where)
            answers_by_id[question_id] = tuple(_field(a, "answer", annotations_path, where) for a in answers)
    image_dir = Path(image_dir)
    examples = []
    for index, question in enumerate(questions):
        where = f"questions[{index}]"
        question_id = _field(question, "question_id", questions_path, where)
        image_id = _field(question, "image_id", questions_path, where)
        answers = answers_by_id.get(question_id, ())
        if annotations_json is not None and not answers:
            raise DatasetFormatError(f"{annotations_json}: no answers for question_id {question_id!r}.")
        examples.append(
            EvalExample(
                question_id,
                _vqa_image_path(dataset, image_dir, image_id),
                answers[0] if answers else "",
                question=_field(question, "question", questions_path, where),
                references=answers,
            )
        )
    return examples


def load_image_folder(root: str | Path, class_names: Sequence[str] | None = None) -> list[EvalExample]:
    """Reads an ImageNet-style folder `root/<class folder>/<image>` (classes in sorted folder order, as `ImageFolder`).

    Args:
        root (`str` or `Path`): The split's folder (e.g. `imagenet/val`).
        class_names (`Sequence[str]`, *optional*): Human-readable class names in sorted folder order (for ImageNet, the
            1000 names OpenFlamingo uses); default: the folder names with `_` read as spaces.

    Returns:
        `list[EvalExample]` with `label` = the class index and `target` = its name; the id is the image path.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"image folder not found: {root}")
    folders = sorted(entry for entry in root.iterdir() if entry.is_dir())
    if not folders:
        raise DatasetFormatError(f"{root} has no class folders.")
    if class_names is None:
        class_names = [folder.name.replace("_", " ") for folder in folders]
    elif len(class_names) != len(folders):
        raise DatasetFormatError(f"{root} has {len(folders)} class folders but {len(class_names)} class names.")
    examples = []
    for label, folder in enumerate(folders):
        for image_path in sorted(folder.rglob("*")):
            if image_path.suffix.lower() in _IMAGE_SUFFIXES:
                examples.append(EvalExample(str(image_path), image_path, class_names[label], label=label))
    return examples


HATEFUL_MEMES_CLASS_NAMES = ("no", "yes")


def load_hateful_memes(annotations_jsonl: str | Path, image_dir: str | Path) -> list[EvalExample]:
    """Reads a HatefulMemes jsonl file (`train.jsonl`, `dev_seen.jsonl`, ...).

    Args:
        annotations_jsonl (`str` or `Path`): One `{"id", "img": "img/01235.png", "label": 0 or 1, "text"}` per line.
        image_dir (`str` or `Path`): The folder holding the images (the basename of `img` is looked up there).

    Returns:
        `list[EvalExample]` with `question` = the OCR text, `label` = 0/1 and `target` = "no"/"yes".
    """
    path = Path(annotations_jsonl)
    if not path.is_file():
        raise DatasetFormatError(f"dataset file not found: {path}")
    examples = []
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetFormatError(f"{path}: {where} is not valid JSON: {error}") from error
            label = _field(record, "label", path, where)
            if label not in (0, 1):
                raise DatasetFormatError(f"{path}: {where} has label {label!r}; expected 0 or 1.")
            examples.append(
                EvalExample(
                    _field(record, "id", path, where),
                    Path(image_dir) / Path(_field(record, "img", path, where)).name,
                    HATEFUL_MEMES_CLASS_NAMES[label],
                    question=_field(record, "text", path, where),
                    label=label,
                )
            )
    return examples
