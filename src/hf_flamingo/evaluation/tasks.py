"""One object per task family, behind the runner: captioning, VQA and rank classification (ImageNet, HatefulMemes).

A task reads its data, writes the prompts of its demonstrations and queries, turns a batch of prompts into
predictions through the model (`inference.py`) and scores a trial's predictions. The runner (`runner.py`) only
draws queries and demonstrations, batches them and aggregates the scores; it knows no task names.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

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
from .inference import class_log_likelihoods, generate_batch
from .metrics import compute_cider, compute_vqa_accuracy, roc_auc_score, top1_accuracy

if TYPE_CHECKING:
    from .runner import EvaluationConfig

__all__ = [
    "CaptioningTask",
    "ClassificationTask",
    "EvaluationTask",
    "HatefulMemesTask",
    "ImageNetTask",
    "TASK_CLASSES",
    "VQATask",
]

Prediction = dict[str, Any]


class EvaluationTask(ABC):
    """A benchmark: its data, prompts, model call and metric.

    Args:
        config (`EvaluationConfig`): The evaluation's configuration (task name, data paths, protocol).
    """

    metric: ClassVar[str]
    """The metric's name (scores are percentages)."""
    required_paths: ClassVar[tuple[str, ...]]
    """The `EvaluationConfig` path fields the task cannot run without."""
    separator: ClassVar[str] = "\n"
    """Appended after every demonstration."""

    def __init__(self, config: EvaluationConfig):
        self.config = config
        self.name = config.task

    @classmethod
    def default_generation(cls, name: str) -> prompts.GenerationSettings | None:
        """The decoding settings of task `name` (OpenFlamingo's); `None` for tasks that do not generate."""
        return None

    @abstractmethod
    def load(self) -> tuple[list[EvalExample], list[EvalExample]]:
        """(demonstration pool, test examples)."""

    @abstractmethod
    def demonstration_prompt(self, example: EvalExample) -> str:
        """The prompt of one demonstration, answer included."""

    @abstractmethod
    def query_prompt(self, example: EvalExample) -> str:
        """The prompt of one query, ending where the answer goes."""

    def begin_trial(self, seed: int) -> None:  # noqa: B027 (optional hook)
        """Called before each trial (one number of shots with one seed)."""

    @abstractmethod
    def predict(
        self,
        model,
        processor,
        queries: list[EvalExample],
        query_images: list[Image.Image],
        demonstrations: list[list[EvalExample]],
        num_shots: int,
    ) -> list[Prediction]:
        """One prediction record per query (its `"id"` first)."""

    @abstractmethod
    def score(self, predictions: list[Prediction], queries: list[EvalExample]) -> float:
        """The trial's metric, a percentage."""

    def build_prompts(
        self,
        queries: list[EvalExample],
        query_images: list[Image.Image],
        demonstrations: list[list[EvalExample]],
        num_shots: int,
    ) -> tuple[list[str], list[list[Image.Image]]]:
        """The prompt texts and images of a batch (0 shots: text-only demonstrations and the query image only)."""
        texts, images = [], []
        for query, query_image, demos in zip(queries, query_images, demonstrations, strict=True):
            texts.append(
                prompts.build_prompt(
                    [self.demonstration_prompt(demo) for demo in demos],
                    self.query_prompt(query),
                    separator=self.separator,
                    num_shots=num_shots,
                )
            )
            context_images = [load_image(demo.image_path) for demo in demos] if num_shots > 0 else []
            images.append(context_images + [query_image])
        return texts, images


class _GenerationTask(EvaluationTask):
    """A task answered by beam-search generation, then post-processed."""

    def generation_settings(self) -> prompts.GenerationSettings:
        return self.config.generation_settings()

    def predict(self, model, processor, queries, query_images, demonstrations, num_shots) -> list[Prediction]:
        texts, images = self.build_prompts(queries, query_images, demonstrations, num_shots)
        outputs = generate_batch(model, processor, texts, images, self.generation_settings(), self.config.precision)
        return [
            {"id": query.id, "output": output, "prediction": self.postprocess(output)}
            for query, output in zip(queries, outputs, strict=True)
        ]

    @abstractmethod
    def postprocess(self, output: str) -> str:
        """The prediction in a generated text."""


class CaptioningTask(_GenerationTask):
    """COCO and Flickr30K captioning, scored by CIDEr against the Karpathy sentences or `references_json`."""

    metric = "CIDEr"
    required_paths = ("karpathy_json", "image_dir")

    @classmethod
    def default_generation(cls, name: str) -> prompts.GenerationSettings:
        return prompts.CAPTION_GENERATION

    def load(self) -> tuple[list[EvalExample], list[EvalExample]]:
        config = self.config
        pool = load_karpathy_captions(config.karpathy_json, config.image_dir, "train", self.name)
        test = load_karpathy_captions(config.karpathy_json, config.image_dir, "test", self.name)
        if config.references_json is not None:
            by_id = load_coco_style_references(config.references_json)
            self.references = {e.id: by_id.get(e.id) or by_id.get(str(e.id)) or [] for e in test}
        else:
            self.references = {example.id: list(example.references) for example in test}
        return pool, test

    def demonstration_prompt(self, example: EvalExample) -> str:
        return prompts.caption_prompt(example.target.strip())

    def query_prompt(self, example: EvalExample) -> str:
        return prompts.caption_prompt()

    def postprocess(self, output: str) -> str:
        return prompts.postprocess_caption(output)

    def score(self, predictions: list[Prediction], queries: list[EvalExample]) -> float:
        return compute_cider({p["id"]: p["prediction"] for p in predictions}, self.references)


class VQATask(_GenerationTask):
    """VQAv2, OK-VQA (answers stemmed unless `ok_vqa_stemming=False`), VizWiz and TextVQA, scored by VQA accuracy."""

    metric = "VQA accuracy"
    required_paths = ("train_questions", "train_annotations", "train_image_dir", "test_questions", "test_annotations")

    def __init__(self, config: EvaluationConfig):
        super().__init__(config)
        self.stemmer = prompts.OKVQAStemmer() if self.name == "ok_vqa" and config.ok_vqa_stemming else None

    @classmethod
    def default_generation(cls, name: str) -> prompts.GenerationSettings:
        return prompts.TEXTVQA_GENERATION if name == "textvqa" else prompts.VQA_GENERATION

    def load(self) -> tuple[list[EvalExample], list[EvalExample]]:
        config = self.config
        pool = load_vqa(config.train_questions, config.train_annotations, config.train_image_dir, self.name)
        test_image_dir = config.test_image_dir or config.train_image_dir
        return pool, load_vqa(config.test_questions, config.test_annotations, test_image_dir, self.name)

    def demonstration_prompt(self, example: EvalExample) -> str:
        return prompts.vqa_prompt(example.question, example.target)

    def query_prompt(self, example: EvalExample) -> str:
        return prompts.vqa_prompt(example.question)

    def postprocess(self, output: str) -> str:
        answer = prompts.postprocess_vqa(output)
        return answer if self.stemmer is None else self.stemmer(answer)

    def score(self, predictions: list[Prediction], queries: list[EvalExample]) -> float:
        answers = {example.id: example.references for example in queries}
        return compute_vqa_accuracy({p["id"]: p["prediction"] for p in predictions}, answers)


class ClassificationTask(EvaluationTask):
    """Rank classification: every class name is scored by its mean per-token log-likelihood after the prompt
    (averaged over min(6, k!) random demonstration orders with `classification_prompt_ensembling`; a query's orders
    depend only on the trial's seed and the query's id, not on its batch or process)."""

    separator = ""

    def __init__(self, config: EvaluationConfig):
        super().__init__(config)
        self.class_names: list[str] = []
        self._trial_seed = 0

    def begin_trial(self, seed: int) -> None:
        self._trial_seed = seed  # seeds the demonstration orders for prompt ensembling

    def predict(self, model, processor, queries, query_images, demonstrations, num_shots) -> list[Prediction]:
        scores = self.class_scores(model, processor, queries, query_images, demonstrations, num_shots)
        return self.predictions_from_scores(queries, scores)

    def predictions_from_scores(self, queries: list[EvalExample], scores: torch.Tensor) -> list[Prediction]:
        """The prediction records of a batch from its class log-likelihoods `(batch, num_classes)`."""
        predicted = scores.argmax(-1).tolist()
        return [
            {"id": query.id, "label": query.label, "prediction": index, "class": self.class_names[index]}
            for query, index in zip(queries, predicted, strict=True)
        ]

    def class_scores(
        self,
        model,
        processor,
        queries: list[EvalExample],
        query_images: list[Image.Image],
        demonstrations: list[list[EvalExample]],
        num_shots: int,
    ) -> torch.Tensor:
        """Class log-likelihoods `(batch, num_classes)`, averaged over shuffled demonstration orders when
        ensembling."""
        config = self.config
        orders = min(6, math.factorial(len(demonstrations[0]))) if config.classification_prompt_ensembling else 1
        shufflers = [random.Random(f"{self._trial_seed}:{query.id}") for query in queries]
        per_order = []
        for _ in range(orders):
            if orders > 1:  # like OpenFlamingo, a fresh random order each time (orders may repeat)
                pairs = zip(shufflers, demonstrations, strict=True)
                demonstrations = [shuffler.sample(demos, len(demos)) for shuffler, demos in pairs]
            texts, images = self.build_prompts(queries, query_images, demonstrations, num_shots)
            per_order.append(
                class_log_likelihoods(
                    model,
                    processor,
                    texts,
                    images,
                    self.class_names,
                    config.classification_kv_cache,
                    config.precision,
                )
            )
        return torch.stack(per_order, dim=-1).mean(-1)


class ImageNetTask(ClassificationTask):
    """ImageNet (class folders), scored by top-1 accuracy."""

    metric = "top-1 accuracy"
    required_paths = ("imagenet_root",)

    def load(self) -> tuple[list[EvalExample], list[EvalExample]]:
        class_names = self._class_names_file()
        root = Path(self.config.imagenet_root)
        pool = load_image_folder(root / "train", class_names)
        test = load_image_folder(root / "val", class_names)
        if class_names is None:
            names = {example.label: example.target for example in pool + test}
            class_names = [names[label] for label in sorted(names)]
        self.class_names = list(class_names)
        return pool, test

    def _class_names_file(self) -> list[str] | None:
        if self.config.class_names_file is None:
            return None
        names_path = Path(self.config.class_names_file)
        if not names_path.is_file():
            raise FileNotFoundError(f"class names file not found: {names_path}")
        return [line.strip() for line in names_path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def demonstration_prompt(self, example: EvalExample) -> str:
        return prompts.imagenet_prompt(example.target)

    def query_prompt(self, example: EvalExample) -> str:
        return prompts.imagenet_prompt()

    def score(self, predictions: list[Prediction], queries: list[EvalExample]) -> float:
        return 100 * top1_accuracy([p["prediction"] for p in predictions], [p["label"] for p in predictions])


class HatefulMemesTask(ClassificationTask):
    """HatefulMemes ("no"/"yes" after the meme's text), scored by ROC-AUC of each prediction's "yes" probability."""

    metric = "ROC-AUC"
    required_paths = ("train_annotations", "test_annotations", "image_dir")

    def load(self) -> tuple[list[EvalExample], list[EvalExample]]:
        self.class_names = list(HATEFUL_MEMES_CLASS_NAMES)
        pool = load_hateful_memes(self.config.train_annotations, self.config.image_dir)
        return pool, load_hateful_memes(self.config.test_annotations, self.config.image_dir)

    def demonstration_prompt(self, example: EvalExample) -> str:
        return prompts.hateful_memes_prompt(example.question, example.target)

    def query_prompt(self, example: EvalExample) -> str:
        return prompts.hateful_memes_prompt(example.question)

    def predictions_from_scores(self, queries: list[EvalExample], scores: torch.Tensor) -> list[Prediction]:
        predictions = super().predictions_from_scores(queries, scores)
        # OpenFlamingo's score: the probability of the top class among the two, turned into a probability of "yes".
        top = scores.argmax(-1)
        top_probability = torch.exp(scores.max(-1).values - torch.logsumexp(scores, dim=-1))
        yes = HATEFUL_MEMES_CLASS_NAMES.index("yes")
        yes_probability = torch.where(top == yes, top_probability, 1 - top_probability).tolist()
        for prediction, probability in zip(predictions, yes_probability, strict=True):
            prediction["yes_score"] = probability
        return predictions

    def score(self, predictions: list[Prediction], queries: list[EvalExample]) -> float:
        return 100 * roc_auc_score([p["label"] for p in predictions], [p["yes_score"] for p in predictions])


TASK_CLASSES: dict[str, type[EvaluationTask]] = {
    "coco": CaptioningTask,
    "flickr30k": CaptioningTask,
    "vqav2": VQATask,
    "ok_vqa": VQATask,
    "vizwiz": VQATask,
    "textvqa": VQATask,
    "imagenet": ImageNetTask,
    "hateful_memes": HatefulMemesTask,
}
"""Task name -> its family."""
