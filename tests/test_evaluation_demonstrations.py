"""Demonstration samplers: random (never the query, reproducible) and RICES (true nearest neighbours, cached)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_tiny_image_processor
from model_testers import vision_config_for
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from hf_flamingo.evaluation import RICES, EvalExample, RandomDemonstrations, VisionTowerEncoder


def _examples(count: int, tmp_path: Path | None = None) -> list[EvalExample]:
    return [
        EvalExample(i, Path(f"/data/{i}.png") if tmp_path is None else tmp_path / f"{i}.png", f"t{i}")
        for i in range(count)
    ]


def test_random_demonstrations_never_contain_the_query():
    pool = _examples(6)
    sampler = RandomDemonstrations(pool, query_set_size=6, seed=3)
    for _ in range(200):
        for query in pool:
            demos = sampler.sample(query, 5)  # all 5 others: the query must be the one left out
            assert query not in demos
            assert len({demo.id for demo in demos}) == 5
    # A demonstration with the same image file as the query is skipped too (e.g. another question on the image).
    same_image = EvalExample("other-question", pool[0].image_path, "x")
    assert all(demo.image_path != same_image.image_path for demo in sampler.sample(same_image, 5))


def test_random_demonstrations_reproducible_for_a_seed():
    pool = _examples(50)

    def draws(seed):
        sampler = RandomDemonstrations(pool, query_set_size=20, seed=seed)
        return [sampler.query_set] + [sampler.sample(pool[k], 4) for k in range(10)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(RandomDemonstrations(pool, query_set_size=20, seed=0).query_set) == 20


def test_random_demonstrations_too_few_examples():
    pool = _examples(3)
    with pytest.raises(ValueError, match="only 2 examples other than the query 0"):
        RandomDemonstrations(pool, seed=0).sample(pool[0], 3)


# --------------------------------------------------------------------------------------------------------------------
# RICES on a constructed example: each image is one colour, and its feature is that colour minus grey, so the cosine
# similarity of two images is the cosine of the angle between their colour directions.

ANGLES = [0, 30, 45, 60, 80, 120, 150, 180]


def _colour_image(angle_degrees: float) -> Image.Image:
    radians = math.radians(angle_degrees)
    colour = (round(128 + 100 * math.cos(radians)), round(128 + 100 * math.sin(radians)), 128)
    return Image.new("RGB", (8, 8), colour)


class ColourEncoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return torch.tensor(np.stack([np.asarray(image, dtype=np.float32).mean((0, 1)) - 128 for image in images]))


@pytest.fixture
def colour_pool(tmp_path):
    pool = []
    for angle in ANGLES:
        path = tmp_path / f"angle_{angle}.png"
        _colour_image(angle).save(path)
        pool.append(EvalExample(f"angle_{angle}", path, str(angle)))
    return pool


def test_rices_returns_true_nearest_neighbours_most_similar_last(colour_pool, tmp_path):
    rices = RICES(colour_pool, ColourEncoder(), batch_size=3)
    query_path = tmp_path / "query.png"
    _colour_image(50).save(query_path)
    query = EvalExample("query", query_path, "")
    # Angular distances from 50 degrees: 45 (5), 60 (10), 30 (20), 80 (30), 0 (50), ...
    demos = rices.find([query], 4)[0]
    assert [demo.target for demo in demos] == ["80", "30", "60", "45"]


def test_rices_never_returns_the_query(colour_pool):
    rices = RICES(colour_pool, ColourEncoder())
    query = colour_pool[3]  # 60 degrees, itself in the pool: next are 45 (15) and 80 (20), then 30 (30)
    assert [demo.target for demo in rices.find([query], 3)[0]] == ["30", "80", "45"]
    # Two queries in one batch, each excluded from its own row only.
    rows = rices.find([colour_pool[0], colour_pool[-1]], 2)
    assert [demo.target for demo in rows[0]] == ["45", "30"]
    assert [demo.target for demo in rows[1]] == ["120", "150"]


def test_rices_features_cached_to_disk_and_reloaded(colour_pool, tmp_path):
    cache = tmp_path / "cache" / "features.safetensors"
    first_encoder = ColourEncoder()
    first = RICES(colour_pool, first_encoder, cache_path=cache, batch_size=3)
    assert cache.is_file() and first_encoder.calls == 3  # 8 images in batches of 3

    class MustNotEncode:
        def __call__(self, images):
            raise AssertionError("the pool features should come from the cache")

    reloaded = RICES(colour_pool, MustNotEncode(), cache_path=cache)
    torch.testing.assert_close(reloaded.features, first.features, rtol=0, atol=0)
    assert reloaded.features.norm(dim=-1).sub(1).abs().max() < 1e-6

    # A cache written for another pool, or by another encoder, is recomputed, not silently reused.
    other_encoder = ColourEncoder()
    smaller = RICES(colour_pool[:5], other_encoder, cache_path=cache)
    assert other_encoder.calls == 1 and smaller.features.shape == (5, 3)
    renamed_encoder = ColourEncoder()
    RICES(colour_pool[:5], renamed_encoder, cache_path=cache, encoder_name="another CLIP")
    assert renamed_encoder.calls == 1


def test_vision_tower_encoder_features():
    torch.manual_seed(0)
    tower = CLIPVisionModel(vision_config_for("clip")).eval()
    encoder = VisionTowerEncoder(tower, build_tiny_image_processor(), batch_size=2)
    images = [Image.new("RGB", (40, 40), (10 * k, 200 - 10 * k, 50)) for k in range(3)]
    features = encoder(images)
    assert features.shape == (3, 32)
    expected = tower(pixel_values=build_tiny_image_processor()(images, return_tensors="pt").pixel_values).pooler_output
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_vision_tower_encoder_uses_projected_embeddings():
    # OpenFlamingo's RICES feature is CLIP's projected image embedding (open_clip `encode_image`).
    torch.manual_seed(0)
    config = CLIPVisionConfig(**{**vision_config_for("clip").to_dict(), "projection_dim": 12})
    tower = CLIPVisionModelWithProjection(config).eval()
    images = [Image.new("RGB", (40, 40), (30 * k, 90, 200 - 30 * k)) for k in range(2)]
    features = VisionTowerEncoder(tower, build_tiny_image_processor())(images)
    expected = tower(pixel_values=build_tiny_image_processor()(images, return_tensors="pt").pixel_values).image_embeds
    assert features.shape == (2, 12)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
