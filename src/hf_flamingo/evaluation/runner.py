"""Few-shot evaluation runner: OpenFlamingo's protocol on a `FlamingoForConditionalGeneration`.

```python
from hf_flamingo.evaluation import EvaluationConfig, evaluate

config = EvaluationConfig(task="coco", karpathy_json="dataset_coco.json", image_dir="coco", shots=(0, 4), seeds=(42,))
results = evaluate(model, processor, config, output_path="coco.json")
print(results.scores)  # {0: 74.9, 4: 77.3}: mean over seeds
```

For each number of shots and each seed, a random subset of the test split (`num_samples`, all by default) is run in
left-padded batches; demonstrations come from the training split, at random (from a `query_set_size` subset) or by
RICES. Captioning and VQA generate with beam search and OpenFlamingo's post-processing; ImageNet and HatefulMemes
rank the class names by mean per-token log-likelihood. Scores are percentages: CIDEr x 100, VQA accuracy, top-1
accuracy x 100, ROC-AUC x 100.

One deliberate difference: for 0-shot ImageNet / HatefulMemes, OpenFlamingo's harness also passes the images of the
two text-only demonstrations (whose `<image>` tokens it removed), so its query text attends to the first
demonstration's image instead of the query's. Here, as OpenFlamingo does for captioning and VQA, a 0-shot prompt gets
only the query image.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import platform
import random
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..cache_compat import cache_from_output
from ..cpu_kernels import cpu_fast_path as fast_path_switch
from . import prompts
from .datasets import (
    HATEFUL_MEMES_CLASS_NAMES,
    EvalExample,
    load_coco_style_references,
    load_hateful_memes,
    load_image,
    load_image_folder,
    load_karpathy_captions,
    load_vqa,
)
from .demonstrations import RICES, ImageEncoder, RandomDemonstrations, VisionTowerEncoder
from .metrics import compute_cider, compute_vqa_accuracy, roc_auc_score, top1_accuracy

__all__ = [
    "CAPTIONING_TASKS",
    "CLASSIFICATION_TASKS",
    "EvaluationConfig",
    "EvaluationResults",
    "ShotResult",
    "TASKS",
    "VQA_TASKS",
    "class_log_likelihoods",
    "evaluate",
    "generate_batch",
]

CAPTIONING_TASKS = ("coco", "flickr30k")
VQA_TASKS = ("vqav2", "ok_vqa", "vizwiz", "textvqa")
CLASSIFICATION_TASKS = ("imagenet", "hateful_memes")
TASKS = CAPTIONING_TASKS + VQA_TASKS + CLASSIFICATION_TASKS
METRICS = {
    **dict.fromkeys(CAPTIONING_TASKS, "CIDEr"),
    **dict.fromkeys(VQA_TASKS, "VQA accuracy"),
    "imagenet": "top-1 accuracy",
    "hateful_memes": "ROC-AUC",
}


@dataclass
class EvaluationConfig:
    """What to evaluate and how. Paths are local files; which ones a task needs:

    - `coco` / `flickr30k`: `karpathy_json`, `image_dir` (COCO: the folder with `train2014/`, `val2014/`), optionally
      `references_json` (COCO-format captions, as OpenFlamingo scores against; default: the Karpathy sentences).
    - `vqav2` / `ok_vqa` / `vizwiz` / `textvqa`: `train_questions`, `train_annotations`, `train_image_dir`,
      `test_questions`, `test_annotations`, `test_image_dir`.
    - `imagenet`: `imagenet_root` (with `train/` and `val/` class folders), optionally `class_names_file`.
    - `hateful_memes`: `train_annotations`, `test_annotations` (jsonl), `image_dir`.

    Args:
        task (`str`): One of `TASKS`.
        shots (`Sequence[int]`, defaults to `(0, 4, 8, 16, 32)`): Numbers of demonstrations (0: 2 text-only ones).
        seeds (`Sequence[int]`, defaults to `(42,)`): One trial per seed (the paper used 3).
        num_samples (`int`, defaults to -1): Test examples per trial, drawn with the trial's seed; -1: all.
        batch_size (`int`, defaults to 8): Prompts per batch.
        query_set_size (`int`, defaults to 2048): Random demonstrations come from this many training examples.
        rices (`bool`, defaults to False): Choose demonstrations by RICES on the model's vision tower features.
        rices_cache_dir (`str`, *optional*): Folder for the cached RICES features (`<task>.safetensors`).
        rices_vision_model (`str`, *optional*): A CLIP model (directory or Hub id) whose projected image embeddings
            RICES compares (OpenFlamingo: `openai/clip-vit-large-patch14`); default: the Flamingo's own vision tower.
        precision (`str`, defaults to `"fp32"`): `"fp32"`, or `"amp_bf16"` (bf16 autocast, OpenFlamingo's setting).
        max_new_tokens (`int`, *optional*): Overrides the task's generation length (20 / 5 / TextVQA 10).
        num_beams (`int`, defaults to 3): Beams for captioning and VQA.
        ok_vqa_stemming (`bool`, defaults to True): Stem OK-VQA predictions (needs nltk and its data, `inflection`).
        classification_kv_cache (`bool`, defaults to True): Reuse the prompt's KV cache across class names.
        classification_prompt_ensembling (`bool`, defaults to False): Average the class log-likelihoods over
            min(6, k!) random orders of the k demonstrations (OpenFlamingo's `--classification_prompt_ensembling`).
        save_predictions (`bool`, defaults to True): Keep every trial's predictions in the results.
    """

    task: str
    shots: Sequence[int] = (0, 4, 8, 16, 32)
    seeds: Sequence[int] = (42,)
    num_samples: int = -1
    batch_size: int = 8
    query_set_size: int = 2048
    rices: bool = False
    rices_cache_dir: str | None = None
    rices_vision_model: str | None = None
    precision: str = "fp32"
    max_new_tokens: int | None = None
    num_beams: int = 3
    ok_vqa_stemming: bool = True
    classification_kv_cache: bool = True
    classification_prompt_ensembling: bool = False
    save_predictions: bool = True
    karpathy_json: str | None = None
    references_json: str | None = None
    image_dir: str | None = None
    train_questions: str | None = None
    train_annotations: str | None = None
    train_image_dir: str | None = None
    test_questions: str | None = None
    test_annotations: str | None = None
    test_image_dir: str | None = None
    imagenet_root: str | None = None
    class_names_file: str | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}.")
        if not self.shots or any(shot < 0 for shot in self.shots):
            raise ValueError(f"shots must be a non-empty list of numbers >= 0, got {list(self.shots)}.")
        if not self.seeds:
            raise ValueError("seeds must not be empty.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.precision not in ("fp32", "amp_bf16"):
            raise ValueError(f"precision must be 'fp32' or 'amp_bf16', got {self.precision!r}.")
        self.shots = tuple(int(shot) for shot in self.shots)
        self.seeds = tuple(int(seed) for seed in self.seeds)
        required = self.required_paths()
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise ValueError(f"task {self.task!r} needs {', '.join(missing)}.")

    def required_paths(self) -> tuple[str, ...]:
        """Names of the path fields this task cannot run without."""
        if self.task in CAPTIONING_TASKS:
            return ("karpathy_json", "image_dir")
        if self.task in VQA_TASKS:
            return ("train_questions", "train_annotations", "train_image_dir", "test_questions", "test_annotations")
        if self.task == "imagenet":
            return ("imagenet_root",)
        return ("train_annotations", "test_annotations", "image_dir")

    def generation_settings(self) -> prompts.GenerationSettings:
        """The task's decoding settings (OpenFlamingo's), with the overrides of this config."""
        default = {
            "textvqa": prompts.TEXTVQA_GENERATION,
            **dict.fromkeys(CAPTIONING_TASKS, prompts.CAPTION_GENERATION),
        }.get(self.task, prompts.VQA_GENERATION)
        return prompts.GenerationSettings(
            max_new_tokens=self.max_new_tokens or default.max_new_tokens,
            min_new_tokens=default.min_new_tokens,
            num_beams=self.num_beams,
            length_penalty=default.length_penalty,
        )


@dataclass
class ShotResult:
    """The trials of one number of shots.

    Args:
        shots (`int`): Number of demonstrations requested.
        trials (`list[float]`): One score per seed, in `EvaluationConfig.seeds` order.
        mean (`float`): Mean of the trials.
        stddev (`float`): Population standard deviation of the trials (as OpenFlamingo's `np.nanstd`).
        predictions (`dict[int, list[dict]]`): seed -> predictions, if kept.
    """

    shots: int
    trials: list[float]
    mean: float
    stddev: float
    predictions: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class EvaluationResults:
    """Scores of one task, with everything needed to reproduce them.

    Args:
        task (`str`): The task.
        metric (`str`): The metric (scores are percentages).
        results (`list[ShotResult]`): One entry per number of shots.
        config (`dict`): The [`EvaluationConfig`] as a dict.
        generation (`dict`): The decoding settings used (captioning / VQA).
        environment (`dict`): Model and library versions.
    """

    task: str
    metric: str
    results: list[ShotResult]
    config: dict[str, Any]
    generation: dict[str, Any]
    environment: dict[str, Any]

    @property
    def scores(self) -> dict[int, float]:
        """`dict[int, float]`: shots -> mean score over the seeds."""
        return {result.shots: result.mean for result in self.results}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        """Writes the results as JSON (creating the parent folder)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------------
# Data


def _load_task_data(config: EvaluationConfig) -> tuple[list[EvalExample], list[EvalExample], list[str] | None]:
    """(demonstration pool, test examples, class names or None)."""
    task = config.task
    if task in CAPTIONING_TASKS:
        pool = load_karpathy_captions(config.karpathy_json, config.image_dir, "train", task)
        test = load_karpathy_captions(config.karpathy_json, config.image_dir, "test", task)
        return pool, test, None
    if task in VQA_TASKS:
        pool = load_vqa(config.train_questions, config.train_annotations, config.train_image_dir, task)
        test_image_dir = config.test_image_dir or config.train_image_dir
        test = load_vqa(config.test_questions, config.test_annotations, test_image_dir, task)
        return pool, test, None
    if task == "imagenet":
        class_names = None
        if config.class_names_file is not None:
            names_path = Path(config.class_names_file)
            if not names_path.is_file():
                raise FileNotFoundError(f"class names file not found: {names_path}")
            class_names = [
                line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        pool = load_image_folder(Path(config.imagenet_root) / "train", class_names)
        test = load_image_folder(Path(config.imagenet_root) / "val", class_names)
        names: dict[int, str] = {example.label: example.target for example in pool + test}
        return pool, test, [names[label] for label in sorted(names)] if class_names is None else list(class_names)
    pool = load_hateful_memes(config.train_annotations, config.image_dir)
    test = load_hateful_memes(config.test_annotations, config.image_dir)
    return pool, test, list(HATEFUL_MEMES_CLASS_NAMES)


def _demonstration_prompt(task: str, example: EvalExample) -> str:
    if task in CAPTIONING_TASKS:
        return prompts.caption_prompt(example.target.strip())
    if task in VQA_TASKS:
        return prompts.vqa_prompt(example.question, example.target)
    if task == "imagenet":
        return prompts.imagenet_prompt(example.target)
    return prompts.hateful_memes_prompt(example.question, example.target)


def _query_prompt(task: str, example: EvalExample) -> str:
    if task in CAPTIONING_TASKS:
        return prompts.caption_prompt()
    if task in VQA_TASKS:
        return prompts.vqa_prompt(example.question)
    if task == "imagenet":
        return prompts.imagenet_prompt()
    return prompts.hateful_memes_prompt(example.question)


def _separator(task: str) -> str:
    return "" if task in CLASSIFICATION_TASKS else "\n"


def _batches(items: Sequence[EvalExample], size: int) -> Iterator[list[EvalExample]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


# --------------------------------------------------------------------------------------------------------------------
# Model calls


def _autocast(model: torch.nn.Module, precision: str):
    if precision != "amp_bf16":
        return contextlib.nullcontext()
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


@torch.no_grad()
def generate_batch(
    model,
    processor,
    texts: list[str],
    images: list[list[Image.Image]],
    settings: prompts.GenerationSettings,
    precision: str = "fp32",
) -> list[str]:
    """Generates a continuation of each prompt, like OpenFlamingo's `get_outputs` (stops at `<|endofchunk|>`).

    Args:
        model (`FlamingoForConditionalGeneration`): The model.
        processor (`FlamingoProcessor`): Its processor (pads on the left).
        texts (`list[str]`): The prompts, one `<image>` per image.
        images (`list[list[PIL.Image.Image]]`): The images of each prompt.
        settings (`GenerationSettings`): Beams, lengths, length penalty.
        precision (`str`, defaults to `"fp32"`): `"fp32"` or `"amp_bf16"`.

    Returns:
        `list[str]`: The decoded new tokens of each prompt (special tokens skipped).
    """
    device = next(model.parameters()).device
    inputs = processor(images=images, text=texts, return_tensors="pt", padding_side="left").to(device)
    with _autocast(model, precision):
        output_ids = model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            min_new_tokens=settings.min_new_tokens,
            num_beams=settings.num_beams,
            length_penalty=settings.length_penalty,
            do_sample=False,
            eos_token_id=processor.eoc_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    return processor.batch_decode(output_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _is_full_dynamic_cache(cache) -> bool:
    """A `DynamicCache` whose layers all keep every token: cropping it restores the prompt's cache exactly."""
    layers = getattr(cache, "layers", None)
    return (
        type(cache).__name__ == "DynamicCache"
        and bool(layers)
        and all(type(layer).__name__ == "DynamicLayer" for layer in layers)
    )


@torch.no_grad()
def class_log_likelihoods(
    model,
    processor,
    texts: list[str],
    images: list[list[Image.Image]],
    class_names: Sequence[str],
    use_cache: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Mean per-token log-probability of each class name appended to each prompt (OpenFlamingo's rank classification).

    The class name is tokenised on its own (no special tokens) and appended to the prompt. With `use_cache`, the
    prompt minus its last token runs once and every class name continues from its cache (cropped back afterwards, or
    a copy for caches that cannot be cropped exactly); the result is the same as one full forward per class name.

    Args:
        model (`FlamingoForConditionalGeneration`): The model.
        processor (`FlamingoProcessor`): Its processor.
        texts (`list[str]`): The prompts (ending where the class name goes).
        images (`list[list[PIL.Image.Image]]`): The images of each prompt.
        class_names (`Sequence[str]`): The candidate names.
        use_cache (`bool`, defaults to True): Reuse the prompt's KV cache across class names.
        precision (`str`, defaults to `"fp32"`): `"fp32"` or `"amp_bf16"`.

    Returns:
        `torch.FloatTensor` of shape `(batch, num_classes)`.
    """
    device = next(model.parameters()).device
    inputs = processor(images=images, text=texts, return_tensors="pt", padding_side="left").to(device)
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    batch, prompt_length = input_ids.shape
    scores = torch.empty(batch, len(class_names))
    with _autocast(model, precision):
        image_hidden_states = model.get_image_features(inputs["pixel_values"])
        if use_cache:
            prefix = model(
                input_ids=input_ids[:, :-1],
                attention_mask=attention_mask[:, :-1],
                position_ids=(attention_mask[:, :-1].cumsum(-1) - 1).clamp_min(0),
                image_hidden_states=image_hidden_states,
                use_cache=True,
            )
            cache = cache_from_output(prefix)
            cache_can_crop = _is_full_dynamic_cache(cache)
            last_image_index = (input_ids == model.config.media_token_id).sum(-1)
        for index, name in enumerate(class_names):
            name_ids = processor.tokenizer(name, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            if name_ids.shape[1] == 0:
                raise ValueError(f"class name {name!r} tokenises to nothing.")
            name_ids = name_ids.expand(batch, -1)
            num_name_tokens = name_ids.shape[1]
            full_mask = torch.cat([attention_mask, torch.ones_like(name_ids)], dim=1)
            positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
            if use_cache:
                continuing_ids = torch.cat([input_ids[:, -1:], name_ids], dim=1)
                outputs = model(
                    input_ids=continuing_ids,
                    attention_mask=full_mask,
                    position_ids=positions[:, prompt_length - 1 :],
                    image_hidden_states=image_hidden_states,
                    cache=cache if cache_can_crop else copy.deepcopy(cache),
                    token_image_index=last_image_index[:, None].expand_as(continuing_ids),
                    use_cache=True,
                )
                if cache_can_crop:
                    cache.crop(-(num_name_tokens + 1))  # back to the prompt minus its last token
                logits = outputs.logits[:, :num_name_tokens]
            else:
                outputs = model(
                    input_ids=torch.cat([input_ids, name_ids], dim=1),
                    attention_mask=full_mask,
                    position_ids=positions,
                    image_hidden_states=image_hidden_states,
                )
                logits = outputs.logits[:, prompt_length - 1 : prompt_length - 1 + num_name_tokens]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            token_log_probs = log_probs.gather(-1, name_ids.unsqueeze(-1)).squeeze(-1)
            scores[:, index] = token_log_probs.mean(-1).cpu()
    return scores


# --------------------------------------------------------------------------------------------------------------------
# The runner


def _build_prompts(
    task: str, batch: list[EvalExample], batch_images: list[Image.Image], demonstrations, num_shots: int
) -> tuple[list[str], list[list[Image.Image]]]:
    texts, images = [], []
    for query, query_image, demos in zip(batch, batch_images, demonstrations, strict=True):
        texts.append(
            prompts.build_prompt(
                [_demonstration_prompt(task, demo) for demo in demos],
                _query_prompt(task, query),
                separator=_separator(task),
                num_shots=num_shots,
            )
        )
        context_images = [load_image(demo.image_path) for demo in demos] if num_shots > 0 else []
        images.append(context_images + [query_image])
    return texts, images


def _classify_batch(
    model,
    processor,
    config: EvaluationConfig,
    batch: list[EvalExample],
    batch_images: list[Image.Image],
    demonstrations: list[list[EvalExample]],
    class_names: list[str],
    num_shots: int,
    shuffler: random.Random,
) -> torch.Tensor:
    """Class log-likelihoods `(batch, num_classes)`, averaged over shuffled demonstration orders when ensembling."""
    orders = min(6, math.factorial(len(demonstrations[0]))) if config.classification_prompt_ensembling else 1
    per_order = []
    for _ in range(orders):
        if orders > 1:  # like OpenFlamingo, a fresh random order each time (orders may repeat)
            demonstrations = [shuffler.sample(demos, len(demos)) for demos in demonstrations]
        texts, images = _build_prompts(config.task, batch, batch_images, demonstrations, num_shots)
        per_order.append(
            class_log_likelihoods(
                model, processor, texts, images, class_names, config.classification_kv_cache, config.precision
            )
        )
    return torch.stack(per_order, dim=-1).mean(-1)


def _run_trial(
    model,
    processor,
    config: EvaluationConfig,
    pool: list[EvalExample],
    test: list[EvalExample],
    class_names: list[str] | None,
    num_shots: int,
    seed: int,
    rices: RICES | None,
    references: dict | None,
    stemmer,
    progress: bool,
) -> tuple[float, list[dict[str, Any]]]:
    """One number of shots with one seed: (score, predictions)."""
    task = config.task
    rng = random.Random(seed)
    queries = test if config.num_samples <= 0 else rng.sample(test, min(config.num_samples, len(test)))
    sampler = None if rices is not None else RandomDemonstrations(pool, config.query_set_size, seed)
    shuffler = random.Random(seed + 2)  # demonstration orders for prompt ensembling
    num_demonstrations = prompts.effective_num_shots(num_shots)
    predictions: list[dict[str, Any]] = []
    log_likelihoods: list[torch.Tensor] = []
    description = f"{task} {num_shots}-shot seed {seed}"
    for batch in tqdm(list(_batches(queries, config.batch_size)), desc=description, disable=not progress):
        batch_images = [load_image(example.image_path) for example in batch]
        if rices is not None:
            demonstrations = rices.find(batch, num_demonstrations, batch_images)
        else:
            demonstrations = [sampler.sample(example, num_demonstrations) for example in batch]
        if task in CLASSIFICATION_TASKS:
            scores = _classify_batch(
                model, processor, config, batch, batch_images, demonstrations, class_names, num_shots, shuffler
            )
            log_likelihoods.append(scores)
            for example, row in zip(batch, scores, strict=True):
                predicted = int(row.argmax())
                predictions.append(
                    {
                        "id": example.id,
                        "label": example.label,
                        "prediction": predicted,
                        "class": class_names[predicted],
                    }
                )
            continue
        texts, images = _build_prompts(task, batch, batch_images, demonstrations, num_shots)
        outputs = generate_batch(model, processor, texts, images, config.generation_settings(), config.precision)
        for example, output in zip(batch, outputs, strict=True):
            if task in CAPTIONING_TASKS:
                prediction = prompts.postprocess_caption(output)
            else:
                prediction = prompts.postprocess_vqa(output)
                if stemmer is not None:
                    prediction = stemmer(prediction)
            predictions.append({"id": example.id, "output": output, "prediction": prediction})

    return _score(task, predictions, log_likelihoods, queries, references), predictions


def _score(
    task: str,
    predictions: list[dict[str, Any]],
    log_likelihoods: list[torch.Tensor],
    queries: list[EvalExample],
    references: dict | None,
) -> float:
    """The trial's metric (a percentage); adds each HatefulMemes prediction's "yes" probability to it."""
    if task in CAPTIONING_TASKS:
        return compute_cider({p["id"]: p["prediction"] for p in predictions}, references)
    if task in VQA_TASKS:
        answers = {example.id: example.references for example in queries}
        return compute_vqa_accuracy({p["id"]: p["prediction"] for p in predictions}, answers)
    if task == "imagenet":
        return 100 * top1_accuracy([p["prediction"] for p in predictions], [p["label"] for p in predictions])
    # OpenFlamingo's score: the probability of the top class among the two, turned into a probability of "yes".
    all_scores = torch.cat(log_likelihoods)  # (num_queries, 2)
    top = all_scores.argmax(-1)
    top_probability = torch.exp(all_scores.max(-1).values - torch.logsumexp(all_scores, dim=-1))
    yes = HATEFUL_MEMES_CLASS_NAMES.index("yes")
    yes_probability = torch.where(top == yes, top_probability, 1 - top_probability).tolist()
    for prediction, probability in zip(predictions, yes_probability, strict=True):
        prediction["yes_score"] = probability
    return 100 * roc_auc_score([p["label"] for p in predictions], yes_probability)


def _environment(model) -> dict[str, Any]:
    import transformers

    from .. import __version__

    return {
        "model": getattr(model, "name_or_path", None) or type(model).__name__,
        "model_dtype": str(next(model.parameters()).dtype),
        "hf_flamingo": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def evaluate(
    model,
    processor,
    config: EvaluationConfig,
    output_path: str | Path | None = None,
    progress: bool = True,
    rices_encoder: ImageEncoder | None = None,
    cpu_fast_path: bool = True,
) -> EvaluationResults:
    """Runs one task at every number of shots and seed of `config`.

    Args:
        model (`FlamingoForConditionalGeneration`): The model (put in eval mode here).
        processor (`FlamingoProcessor`): Its processor.
        config (`EvaluationConfig`): Task, data paths and protocol.
        output_path (`str` or `Path`, *optional*): Where to write the results as JSON.
        progress (`bool`, defaults to True): Show tqdm progress bars.
        rices_encoder (`ImageEncoder`, *optional*): Image features for RICES, instead of the model's vision tower or
            `config.rices_vision_model`.
        cpu_fast_path (`bool`, defaults to True): Run the trials inside [`hf_flamingo.cpu_fast_path`] (float32 CPU
            inference products on oneDNN; no effect on other devices or dtypes).

    Returns:
        [`EvaluationResults`].
    """
    model.eval()
    pool, test, class_names = _load_task_data(config)
    if not test:
        raise ValueError(f"the {config.task} test split is empty.")
    references = None
    if config.task in CAPTIONING_TASKS:
        if config.references_json is not None:
            by_id = load_coco_style_references(config.references_json)
            references = {e.id: by_id.get(e.id) or by_id.get(str(e.id)) or [] for e in test}
        else:
            references = {example.id: list(example.references) for example in test}
    stemmer = prompts.OKVQAStemmer() if config.task == "ok_vqa" and config.ok_vqa_stemming else None
    rices = None
    if config.rices:
        cache_path = None
        if config.rices_cache_dir is not None:
            cache_path = Path(config.rices_cache_dir) / f"{config.task}.safetensors"
        encoder_name = "custom" if rices_encoder is not None else config.rices_vision_model or "flamingo_vision_tower"
        if rices_encoder is None:
            tower = model.vision_model
            if config.rices_vision_model is not None:
                from transformers import CLIPVisionModelWithProjection

                device = next(model.parameters()).device
                tower = CLIPVisionModelWithProjection.from_pretrained(config.rices_vision_model).to(device).eval()
            rices_encoder = VisionTowerEncoder(tower, processor.image_processor, batch_size=config.batch_size)
        rices = RICES(
            pool, rices_encoder, cache_path=cache_path, batch_size=config.batch_size, encoder_name=encoder_name
        )

    with fast_path_switch(enabled=cpu_fast_path):
        results = []
        for num_shots in config.shots:
            trials, kept = [], {}
            for seed in config.seeds:
                score, predictions = _run_trial(
                    model,
                    processor,
                    config,
                    pool,
                    test,
                    class_names,
                    num_shots,
                    seed,
                    rices,
                    references,
                    stemmer,
                    progress,
                )
                trials.append(score)
                if config.save_predictions:
                    kept[seed] = predictions
            finite = [score for score in trials if not math.isnan(score)]
            mean = statistics.fmean(finite) if finite else float("nan")
            stddev = statistics.pstdev(finite) if finite else float("nan")
            results.append(ShotResult(num_shots, trials, mean, stddev, kept))

    generation = asdict(config.generation_settings()) if config.task not in CLASSIFICATION_TASKS else {}
    if generation:
        generation["eos_token"] = prompts.END_OF_CHUNK_TOKEN
    evaluation = EvaluationResults(
        task=config.task,
        metric=METRICS[config.task],
        results=results,
        config=asdict(config),
        generation=generation,
        environment=_environment(model),
    )
    if output_path is not None:
        evaluation.save(output_path)
    return evaluation
