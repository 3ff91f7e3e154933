"""Choosing in-context demonstrations: at random from a query set, or by RICES (nearest neighbours on image features).

Both samplers skip the query itself (same id or same image file) when the demonstration pool contains it, so a query
never sees its own answer.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .datasets import EvalExample, load_image

logger = logging.getLogger(__name__)

ImageEncoder = Callable[[list[Image.Image]], torch.Tensor]
"""Maps a list of images to a `(num_images, feature_dim)` tensor of features."""

__all__ = ["ImageEncoder", "RICES", "RandomDemonstrations", "VisionTowerEncoder"]


def _is_same_example(candidate: EvalExample, query: EvalExample) -> bool:
    return candidate.id == query.id or candidate.image_path == query.image_path


class RandomDemonstrations:
    """Random demonstrations from a fixed random query set, as OpenFlamingo's harness (`--query_set_size 2048`).

    Args:
        pool (`Sequence[EvalExample]`): The training examples.
        query_set_size (`int`, defaults to 2048): Size of the subset drawn once from `pool` (all of it if smaller).
        seed (`int`, defaults to 42): Seeds both the query set and the per-query draws: the same seed and the same
            sequence of calls give the same demonstrations.
    """

    def __init__(self, pool: Sequence[EvalExample], query_set_size: int = 2048, seed: int = 42):
        if not pool:
            raise ValueError("the demonstration pool is empty.")
        self.query_set = random.Random(seed).sample(list(pool), min(query_set_size, len(pool)))
        self._rng = random.Random(seed + 1)

    def sample(self, query: EvalExample, num_demonstrations: int) -> list[EvalExample]:
        """Draws `num_demonstrations` distinct demonstrations for `query`, never the query itself."""
        candidates = [example for example in self.query_set if not _is_same_example(example, query)]
        if len(candidates) < num_demonstrations:
            raise ValueError(
                f"{num_demonstrations} demonstrations requested but the query set has only {len(candidates)} "
                f"examples other than the query {query.id!r}."
            )
        return self._rng.sample(candidates, num_demonstrations)


class VisionTowerEncoder:
    """Image features from a Flamingo's own vision tower, for RICES.

    The feature is the tower's projected embedding if it has one (`CLIPVisionModelWithProjection`: `image_embeds`,
    which for `openai/clip-vit-large-patch14` is OpenFlamingo's RICES feature, open_clip's `encode_image`), else its
    pooled output (CLIP: the post-layernorm CLS token), else the mean of the last hidden states.

    Args:
        vision_model (`torch.nn.Module`): E.g. `model.vision_model`, or a `CLIPVisionModelWithProjection`.
        image_processor: Turns a list of PIL images into `pixel_values` of shape `(num_images, 3, H, W)`.
        batch_size (`int`, defaults to 32): Images per forward.
    """

    def __init__(self, vision_model: torch.nn.Module, image_processor, batch_size: int = 32):
        self.vision_model = vision_model
        self.image_processor = image_processor
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        parameter = next(self.vision_model.parameters())
        features = []
        for start in range(0, len(images), self.batch_size):
            pixel_values = self.image_processor(images[start : start + self.batch_size], return_tensors="pt")
            pixel_values = pixel_values["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
            outputs = self.vision_model(pixel_values=pixel_values)
            feature = getattr(outputs, "image_embeds", None)
            if feature is None:
                feature = getattr(outputs, "pooler_output", None)
            if feature is None:
                feature = outputs.last_hidden_state.mean(1)
            features.append(feature.float().cpu())
        return torch.cat(features)


class RICES:
    """Retrieval-based In-Context Example Selection: the pool examples whose images are most similar to the query's.

    Features are L2-normalised and compared by cosine similarity; the most similar demonstration is placed **last**
    (closest to the query), as in OpenFlamingo. Pool features can be cached in a safetensors file, tagged with the
    pool's ids and the encoder's name; a cache written for a different pool or encoder is recomputed.

    Args:
        pool (`Sequence[EvalExample]`): The training examples.
        encode_images (`ImageEncoder`): Images -> `(num_images, feature_dim)` features (e.g. [`VisionTowerEncoder`]).
        cache_path (`str` or `Path`, *optional*): A `.safetensors` file to read the pool features from, or write them
            to.
        batch_size (`int`, defaults to 32): Images encoded at a time while computing the pool features.
        encoder_name (`str`, *optional*): Names the encoder in the cache: a cache written by another encoder is
            recomputed.
    """

    def __init__(
        self,
        pool: Sequence[EvalExample],
        encode_images: ImageEncoder,
        cache_path: str | Path | None = None,
        batch_size: int = 32,
        encoder_name: str = "",
    ):
        if not pool:
            raise ValueError("the demonstration pool is empty.")
        self.pool = list(pool)
        self.encode_images = encode_images
        self.batch_size = batch_size
        self.encoder_name = encoder_name
        self._positions: dict[object, list[int]] = {}
        for position, example in enumerate(self.pool):
            for key in {("id", example.id), ("image", example.image_path)}:
                self._positions.setdefault(key, []).append(position)
        self.features = self._load_or_compute_features(None if cache_path is None else Path(cache_path))

    def _cache_metadata(self) -> dict[str, str]:
        return {"ids": json.dumps([str(example.id) for example in self.pool]), "encoder": self.encoder_name}

    def _load_or_compute_features(self, cache_path: Path | None) -> torch.Tensor:
        from safetensors import safe_open
        from safetensors.torch import save_file

        if cache_path is not None and cache_path.is_file():
            with safe_open(str(cache_path), framework="pt") as file:
                if (file.metadata() or {}) == self._cache_metadata():
                    return file.get_tensor("features")
            logger.warning(
                "RICES cache %s was written for other examples or another encoder; recomputing it.", cache_path
            )
        features = self._compute_features()
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"features": features.contiguous()}, str(cache_path), metadata=self._cache_metadata())
        return features

    def _compute_features(self) -> torch.Tensor:
        chunks = []
        for start in tqdm(range(0, len(self.pool), self.batch_size), desc="RICES features", leave=False):
            images = [load_image(example.image_path) for example in self.pool[start : start + self.batch_size]]
            chunks.append(self._normalized(self.encode_images(images)))
        return torch.cat(chunks)

    @staticmethod
    def _normalized(features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def find(
        self,
        queries: Sequence[EvalExample],
        num_demonstrations: int,
        query_images: list[Image.Image] | None = None,
    ) -> list[list[EvalExample]]:
        """The `num_demonstrations` nearest pool examples of each query, most similar last, never the query itself.

        Args:
            queries (`Sequence[EvalExample]`): The queries.
            num_demonstrations (`int`): Demonstrations per query.
            query_images (`list[PIL.Image.Image]`, *optional*): The queries' images, if already loaded.

        Returns:
            `list[list[EvalExample]]`: For each query, its demonstrations in increasing similarity.
        """
        if query_images is None:
            query_images = [load_image(query.image_path) for query in queries]
        similarity = self._normalized(self.encode_images(query_images)) @ self.features.T  # (num_queries, pool)
        for row, query in enumerate(queries):
            excluded = set(self._positions.get(("id", query.id), [])) | set(
                self._positions.get(("image", query.image_path), [])
            )
            if num_demonstrations > len(self.pool) - len(excluded):
                raise ValueError(
                    f"{num_demonstrations} demonstrations requested but the pool has only "
                    f"{len(self.pool) - len(excluded)} examples other than the query {query.id!r}."
                )
            similarity[row, sorted(excluded)] = float("-inf")
        order = torch.argsort(similarity, dim=-1, descending=True, stable=True)[:, :num_demonstrations]
        return [[self.pool[index] for index in reversed(row.tolist())] for row in order]
