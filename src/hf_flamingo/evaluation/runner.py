"""Few-shot evaluation runner: OpenFlamingo's protocol on a `FlamingoForConditionalGeneration`.

```python
from hf_flamingo.evaluation import EvaluationConfig, evaluate

config = EvaluationConfig(task="coco", karpathy_json="dataset_coco.json", image_dir="coco", shots=(0, 4), seeds=(42,))
results = evaluate(model, processor, config, output_path="coco.json")
print(results.scores)  # {0: 74.9, 4: 77.3}: mean over seeds
```

For each number of shots and each seed, a random subset of the test split (`num_samples`, all by default) is run in
left-padded batches; demonstrations come from the training split, at random (from a `query_set_size` subset) or by
RICES. What a task does with a batch (prompts, model call, post-processing, metric) is its task object's
(`tasks.py`): captioning and VQA generate with beam search and OpenFlamingo's post-processing; ImageNet and
HatefulMemes rank the class names by mean per-token log-likelihood. Scores are percentages: CIDEr x 100, VQA
accuracy, top-1 accuracy x 100, ROC-AUC x 100.

One deliberate difference: for 0-shot ImageNet / HatefulMemes, OpenFlamingo's harness also passes the images of the
two text-only demonstrations (whose `<image>` tokens it removed), so its query text attends to the first
demonstration's image instead of the query's. Here, as OpenFlamingo does for captioning and VQA, a 0-shot prompt gets
only the query image.

Data-parallel evaluation: the same call runs unchanged under `torchrun --nproc-per-node N` or `accelerate launch
--num_processes N` (accelerate's `PartialState` reads the launcher's environment; without a launcher, or without
accelerate installed, it is one process). Every process loads the data, draws each trial's queries and
demonstrations with the trial's seed exactly as a single process does, and runs the model on its own contiguous share
of the trial's batches: the batches themselves are those of a single-process run (same queries, same padding), so the
predictions are the same. The predictions are gathered in their original order, the metric is computed once, on the
main process, and sent to the others: every process returns the same [`EvaluationResults`], and only the main process
writes `output_path`. Each process runs the model where the caller put it: give each its own accelerator
(`PartialState().device`, what `hf-flamingo eval --device cuda` does); the model is not wrapped in DDP (inference
only). With RICES and `rices_cache_dir`, the main process computes and caches the pool features first and the others
read them; without a cache folder every process computes them.

```bash
torchrun --nproc-per-node 8 -m hf_flamingo_cli eval of-9b --device cuda --task coco ... --output coco.json
```
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import platform
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..cpu_kernels import cpu_fast_path as fast_path_switch
from . import prompts
from .datasets import EvalExample, load_image
from .demonstrations import RICES, ImageEncoder, RandomDemonstrations, VisionTowerEncoder
from .tasks import TASK_CLASSES, EvaluationTask

__all__ = [
    "EvaluationConfig",
    "EvaluationData",
    "EvaluationResults",
    "ShotResult",
    "TASKS",
    "end_processes",
    "evaluate",
    "is_main_process",
    "load_evaluation_data",
    "process_device",
]

logger = logging.getLogger(__name__)

TASKS = tuple(TASK_CLASSES)
"""The task names `EvaluationConfig.task` accepts."""


def _check_integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")


def _check_at_least(name: str, value: Any, minimum: int) -> None:
    _check_integer(name, value)
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def _unique_integers(name: str, values: Sequence[int], minimum: int | None = None) -> tuple[int, ...]:
    """`values` as a tuple, refusing an empty list, non-integers, values below `minimum` and duplicates (a repeated
    number of shots or seed would run the same trials twice and count them twice in the mean)."""
    try:
        items = [] if isinstance(values, (numbers.Number, str)) else list(values)
    except TypeError:
        items = []
    if not items:
        raise ValueError(f"`{name}` must be a non-empty list of integers, got {values!r}.")
    values = items
    for value in values:
        if minimum is None:
            _check_integer(name, value)
        else:
            _check_at_least(name, value, minimum)
    values = [int(value) for value in values]
    duplicates = sorted({value for value in values if values.count(value) > 1})
    if duplicates:
        raise ValueError(f"`{name}` lists {duplicates} more than once ({values}); give each value once.")
    return tuple(values)


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
        shots (`Sequence[int]`, defaults to `(0, 4, 8, 16, 32)`): Numbers of demonstrations (0: 2 text-only ones),
            each at most once.
        seeds (`Sequence[int]`, defaults to `(42,)`): One trial per seed (the paper used 3), each at most once.
        num_samples (`int`, defaults to -1): Test examples per trial (>= 1), drawn with the trial's seed; -1: all.
        batch_size (`int`, defaults to 8): Prompts per batch.
        query_set_size (`int`, defaults to 2048): Random demonstrations come from this many training examples.
        rices (`bool`, defaults to False): Choose demonstrations by RICES on the model's vision tower features.
        rices_cache_dir (`str`, *optional*): Folder for the cached RICES features (`<task>.safetensors`); only
            with `rices=True`.
        rices_vision_model (`str`, *optional*): A CLIP model (directory or Hub id) whose projected image embeddings
            RICES compares (OpenFlamingo: `openai/clip-vit-large-patch14`); default: the Flamingo's own vision tower.
            Only with `rices=True`.
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
        self.shots = _unique_integers("shots", self.shots, minimum=0)
        self.seeds = _unique_integers("seeds", self.seeds)
        for name in ("batch_size", "query_set_size", "num_beams"):
            _check_at_least(name, getattr(self, name), 1)
        if self.max_new_tokens is not None:
            _check_at_least("max_new_tokens", self.max_new_tokens, 1)
        _check_integer("num_samples", self.num_samples)
        if self.num_samples < 1 and self.num_samples != -1:
            raise ValueError(f"`num_samples` must be >= 1, or -1 for all test examples, got {self.num_samples}.")
        if self.precision not in ("fp32", "amp_bf16"):
            raise ValueError(f"`precision` must be 'fp32' or 'amp_bf16', got {self.precision!r}.")
        self._check_rices_options()
        required = self.required_paths()
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise ValueError(f"task {self.task!r} needs {', '.join(missing)}.")

    def _check_rices_options(self) -> None:
        for name in ("rices_cache_dir", "rices_vision_model"):
            if getattr(self, name) is not None and not self.rices:
                raise ValueError(
                    f"`{name}` is set but demonstrations are chosen at random; pass `rices=True` to use RICES, or "
                    f"drop `{name}`."
                )
        if self.rices_cache_dir is not None and Path(self.rices_cache_dir).is_file():
            raise ValueError(
                f"`rices_cache_dir` {self.rices_cache_dir!r} is a file; expected a folder (it is created if missing) "
                f"for the cached features `{self.task}.safetensors`."
            )

    def required_paths(self) -> tuple[str, ...]:
        """Names of the path fields this task cannot run without."""
        return TASK_CLASSES[self.task].required_paths

    def generation_settings(self) -> prompts.GenerationSettings | None:
        """The task's decoding settings (OpenFlamingo's), with the overrides of this config; `None` for tasks that
        do not generate (classification)."""
        default = TASK_CLASSES[self.task].default_generation(self.task)
        if default is None:
            return None
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


@dataclass
class EvaluationData:
    """A task with its data loaded and checked against the configuration (see [`load_evaluation_data`]).

    Args:
        task (`EvaluationTask`): The task object (it keeps what its `load` read, e.g. class names).
        pool (`list[EvalExample]`): The demonstration pool (training split).
        test (`list[EvalExample]`): The test examples.
    """

    task: EvaluationTask
    pool: list[EvalExample]
    test: list[EvalExample]


def load_evaluation_data(config: EvaluationConfig) -> EvaluationData:
    """Reads the task's data set files and checks them against `config`, without any model.

    Call it before loading a model to find bad data files, an empty test split or too few demonstrations at once;
    [`evaluate`] calls it when it is not given the result.

    Raises:
        DatasetFormatError: if a data set file is missing or malformed.
        ValueError: if the test split is empty, or the demonstration pool is smaller than the largest number of
            demonstrations `config.shots` asks for.
    """
    task = TASK_CLASSES[config.task](config)
    pool, test = task.load()
    if not test:
        raise ValueError(f"the {config.task} test split is empty.")
    _check_demonstration_pool(config, len(pool))
    return EvaluationData(task, pool, test)


def _check_demonstration_pool(config: EvaluationConfig, pool_size: int) -> None:
    """Every trial draws `effective_num_shots(shots)` demonstrations per query from the pool (random: from a query
    set of `min(query_set_size, pool size)` examples)."""
    largest = max(config.shots, key=prompts.effective_num_shots)
    needed = prompts.effective_num_shots(largest)
    available = pool_size if config.rices else min(config.query_set_size, pool_size)
    if needed <= available:
        return
    if largest:
        what = f"{largest} shots need {needed} demonstrations per query"
    else:
        what = f"0 shots use {needed} text-only demonstrations per query"
    if available < pool_size:
        where = f"only {available} of the {pool_size} examples of the {config.task} demonstration pool are drawn"
        fix = f"raise `query_set_size` (currently {config.query_set_size}) or use fewer `shots`"
    else:
        where = f"the {config.task} demonstration pool (its training split) has only {pool_size} examples"
        fix = f"use at most {pool_size} `shots`" if largest else f"0-shot prompts need at least {needed} examples"
    raise ValueError(f"{what}, but {where}; {fix}.")


class _Processes:
    """The processes evaluating together: accelerate's `PartialState` (set up from the `torchrun` / `accelerate
    launch` environment), or this process alone when accelerate is not installed."""

    def __init__(self):
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        try:
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env
        except ImportError:
            if launched:
                raise ImportError(
                    f"evaluating with {os.environ['WORLD_SIZE']} processes needs accelerate: `pip install accelerate`."
                ) from None
            self.state = None
        else:
            # CPU processes (gloo): accelerate only sets them up when told, as `accelerate launch --cpu` does.
            cpu = launched and (parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available())
            self.state = PartialState(cpu=cpu)

    @property
    def num_processes(self) -> int:
        return 1 if self.state is None else self.state.num_processes

    @property
    def is_main_process(self) -> bool:
        return self.state is None or self.state.is_main_process

    def shard(self, items: list) -> list:
        """This process's contiguous share of `items` (the first processes take one more when it does not divide)."""
        if self.num_processes == 1:
            return items
        # Not `PartialState.split_between_processes`: with fewer items than processes, accelerate 1.6 hands the
        # processes without a share a copy of the last item instead of nothing, which would count it twice.
        size, remainder = divmod(len(items), self.num_processes)
        index = self.state.process_index
        start = index * size + min(index, remainder)
        return items[start : start + size + (1 if index < remainder else 0)]

    def gather(self, items: list) -> list:
        """The lists of every process, concatenated in process order, on every process."""
        if self.num_processes == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def broadcast(self, value: Any) -> Any:
        """The main process's `value`, on every process."""
        if self.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def check(self, error: BaseException | None) -> None:
        """Raises on every process if any process failed (`error`: this process's failure), instead of leaving the
        others waiting for it at the next exchange."""
        failures = self.gather([(self.state.process_index if self.state else 0, repr(error)) if error else None])
        failures = [failure for failure in failures if failure is not None]
        if error is not None:
            raise error
        if failures:
            index, message = failures[0]
            raise RuntimeError(f"evaluation failed on process {index}: {message}")

    def main_first(self, function, *args):
        """`function(*args)` on the main process, then on the others (e.g. to let the main process write a cache the
        others read)."""
        if self.num_processes == 1:
            return function(*args)
        result = None
        for turn in (True, False):
            error = None
            if self.is_main_process == turn:
                try:
                    result = function(*args)
                except Exception as caught:  # re-raised by `check`, once the others know
                    error = caught
            self.check(error)
        return result


def is_main_process() -> bool:
    """Whether this is the process that writes results and prints (always, outside `torchrun` / `accelerate launch`)."""
    return _Processes().is_main_process


def end_processes() -> None:
    """Destroys the process group that evaluation set up under `torchrun` / `accelerate launch`; call it once, when
    a program is done evaluating. A process that exits with the group still alive can abort in the collective
    backend's destructor ("terminate called without an active exception") while the others finish. Does nothing in
    a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def process_device(device: str) -> str:
    """The device this process evaluates on: under several processes, an accelerator type without an index (`"cuda"`)
    becomes this process's own one (`PartialState().device`, e.g. `"cuda:3"`); anything else is returned unchanged."""
    processes = _Processes()
    if processes.num_processes == 1 or ":" in device or device == "cpu":
        return device
    own = processes.state.device
    return str(own) if own.type == torch.device(device).type else device


def _batches(items: Sequence[EvalExample], size: int) -> list[list[EvalExample]]:
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def _run_trial(
    model,
    processor,
    task: EvaluationTask,
    pool: list[EvalExample],
    test: list[EvalExample],
    rices: RICES | None,
    num_shots: int,
    seed: int,
    progress: bool,
    processes: _Processes,
) -> tuple[float, list[dict[str, Any]]]:
    """One number of shots with one seed: (score, predictions), on every process.

    Every process draws the queries and the random demonstrations of every batch (the draws follow one another), and
    runs the model on its own share of the batches; the main process scores the gathered predictions."""
    config = task.config
    rng = random.Random(seed)
    queries = test if config.num_samples <= 0 else rng.sample(test, min(config.num_samples, len(test)))
    sampler = None if rices is not None else RandomDemonstrations(pool, config.query_set_size, seed)
    num_demonstrations = prompts.effective_num_shots(num_shots)
    task.begin_trial(seed)
    batches = _batches(queries, config.batch_size)
    own = set(processes.shard(list(range(len(batches)))))
    predictions: list[dict[str, Any]] = []
    error = None
    description = f"{task.name} {num_shots}-shot seed {seed}"
    with tqdm(total=len(own), desc=description, disable=not (progress and processes.is_main_process)) as bar:
        try:
            for index, batch in enumerate(batches):
                if sampler is not None:
                    demonstrations = [sampler.sample(example, num_demonstrations) for example in batch]
                if index not in own:
                    continue
                batch_images = [load_image(example.image_path) for example in batch]
                if rices is not None:
                    demonstrations = rices.find(batch, num_demonstrations, batch_images)
                predictions.extend(task.predict(model, processor, batch, batch_images, demonstrations, num_shots))
                bar.update()
        except Exception as caught:  # re-raised by `check`, once the other processes know
            error = caught
    processes.check(error)
    predictions = processes.gather(predictions)
    if [prediction["id"] for prediction in predictions] != [query.id for query in queries]:
        raise RuntimeError(f"{description}: the gathered predictions do not match the queries one for one.")
    score, error = None, None
    if processes.is_main_process:
        try:
            score = task.score(predictions, queries)
        except Exception as caught:
            error = caught
    processes.check(error)
    return processes.broadcast(score), predictions


def _build_rices(
    model, processor, config: EvaluationConfig, pool: list[EvalExample], encoder: ImageEncoder | None
) -> RICES:
    """RICES over the demonstration pool, on `encoder`, `config.rices_vision_model` or the model's vision tower."""
    cache_path = None
    if config.rices_cache_dir is not None:
        cache_path = Path(config.rices_cache_dir) / f"{config.task}.safetensors"
    encoder_name = "custom" if encoder is not None else config.rices_vision_model or "flamingo_vision_tower"
    if encoder is None:
        tower = model.vision_model
        if config.rices_vision_model is not None:
            from transformers import CLIPVisionModelWithProjection

            device = next(model.parameters()).device
            tower = CLIPVisionModelWithProjection.from_pretrained(config.rices_vision_model).to(device).eval()
        encoder = VisionTowerEncoder(tower, processor.image_processor, batch_size=config.batch_size)
    return RICES(pool, encoder, cache_path=cache_path, batch_size=config.batch_size, encoder_name=encoder_name)


def _shot_result(num_shots: int, trials: list[float], predictions: dict[int, list[dict[str, Any]]]) -> ShotResult:
    finite = [score for score in trials if not math.isnan(score)]
    mean = statistics.fmean(finite) if finite else float("nan")
    stddev = statistics.pstdev(finite) if finite else float("nan")
    return ShotResult(num_shots, trials, mean, stddev, predictions)


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
    data: EvaluationData | None = None,
) -> EvaluationResults:
    """Runs one task at every number of shots and seed of `config`.

    Args:
        model (`FlamingoForConditionalGeneration`): The model (put in eval mode here).
        processor (`FlamingoProcessor`): Its processor.
        config (`EvaluationConfig`): Task, data paths and protocol.
        output_path (`str` or `Path`, *optional*): Where to write the results as JSON (by the main process only,
            under several processes).
        progress (`bool`, defaults to True): Show tqdm progress bars (on the main process).
        rices_encoder (`ImageEncoder`, *optional*): Image features for RICES, instead of the model's vision tower or
            `config.rices_vision_model`.
        cpu_fast_path (`bool`, defaults to True): Run the trials inside [`hf_flamingo.cpu_fast_path`] (float32 CPU
            inference products on oneDNN; no effect on other devices or dtypes).
        data ([`EvaluationData`], *optional*): The task's data, from [`load_evaluation_data`]`(config)` (e.g. loaded
            before the model, to find data problems first); default: loaded here, before any model call.

    Returns:
        [`EvaluationResults`]: the same on every process under `torchrun` / `accelerate launch` (the gathered
        predictions and the main process's scores; `environment["num_processes"]` records how many processes ran).
    """
    if data is None:
        data = load_evaluation_data(config)
    elif data.task.config is not config:
        raise ValueError("`data` was loaded for another `EvaluationConfig`; pass `load_evaluation_data(config)`.")
    model.eval()
    task, pool, test = data.task, data.pool, data.test
    processes = _Processes()
    _warn_about_shared_devices(model, processes)
    rices = None
    if config.rices:  # the main process first: it writes the feature cache that the others then read
        rices = processes.main_first(_build_rices, model, processor, config, pool, rices_encoder)

    results = []
    with fast_path_switch(enabled=cpu_fast_path):
        for num_shots in config.shots:
            trials, kept = [], {}
            for seed in config.seeds:
                score, predictions = _run_trial(
                    model, processor, task, pool, test, rices, num_shots, seed, progress, processes
                )
                trials.append(score)
                if config.save_predictions:
                    kept[seed] = predictions
            results.append(_shot_result(num_shots, trials, kept))

    settings = config.generation_settings()
    generation = {} if settings is None else {**asdict(settings), "eos_token": prompts.END_OF_CHUNK_TOKEN}
    evaluation = EvaluationResults(
        task=config.task,
        metric=task.metric,
        results=results,
        config=asdict(config),
        generation=generation,
        environment={**_environment(model), "num_processes": processes.num_processes},
    )
    error = None
    if output_path is not None and processes.is_main_process:
        try:
            evaluation.save(output_path)
        except Exception as caught:
            error = caught
    processes.check(error)  # also waits for the file: it exists when any process returns
    return evaluation


def _warn_about_shared_devices(model, processes: _Processes) -> None:
    """Warns (main process) when several processes run their model on the same accelerator."""
    if processes.num_processes == 1:
        return
    devices = processes.gather([str(next(model.parameters()).device)])
    shared = sorted({device for device in devices if device != "cpu" and devices.count(device) > 1})
    if shared and processes.is_main_process:
        logger.warning(
            "%d processes share %s; put each process's model on its own device (`PartialState().device`, or "
            "`hf-flamingo eval --device cuda`).",
            max(devices.count(device) for device in shared),
            ", ".join(shared),
        )
