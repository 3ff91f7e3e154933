"""Scale-out: examples/train.py under `torchrun` (2-process DDP, gloo, CPU) ends with identical parameters on both
ranks; `device_map="auto"` (with CPU/disk offload) loads, keeps `_no_split_modules` whole and generates."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_testers import build_model, interleaved_batch, open_gates
from safetensors.torch import load_file

from hf_flamingo import FlamingoForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "examples" / "train.py"


def _load_train_module():
    spec = importlib.util.spec_from_file_location("flamingo_train_example", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torchrun_ddp_gives_identical_parameters_on_both_ranks(tmp_path):
    output_dir = tmp_path / "run"
    prefix = tmp_path / "trainable"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(TRAIN_SCRIPT),
        "--output-dir",
        str(output_dir),
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--num-samples",
        "16",
        "--learning-rate",
        "1e-2",
        "--save-trainable-state",
        str(prefix),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    rank0 = load_file(f"{prefix}-rank0.safetensors")
    rank1 = load_file(f"{prefix}-rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert any(name.startswith("perceiver.") for name in rank0)
    assert any(name.startswith("gated_cross_attn_layers.") for name in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    # Training moved the bridge away from its initialisation (the same on every rank: same seed).
    train = _load_train_module()
    args = train.parse_args(["--output-dir", str(tmp_path / "unused")])
    train.set_seed(args.seed)
    initial, _ = train.build(args, train.synthetic_dataset(args.num_samples, image_size=64, seed=args.seed))
    initial_state = {name: p.detach() for name, p in initial.named_parameters() if p.requires_grad}
    assert initial_state.keys() == rank0.keys()
    assert any(not torch.equal(initial_state[name], rank0[name]) for name in rank0)

    # The main process saved the trained model and processor: they load and match the ranks' parameters.
    saved = FlamingoForConditionalGeneration.from_pretrained(output_dir)
    saved_state = dict(saved.named_parameters())
    for name, value in rank0.items():
        assert torch.equal(saved_state[name].detach(), value), name
    assert (output_dir / "processor_config.json").is_file() or (output_dir / "preprocessor_config.json").is_file()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("device_map") / "flamingo"
    model = build_model("llama")
    open_gates(model)
    model.save_pretrained(directory)
    return directory


def _generate(model) -> torch.Tensor:
    batch = interleaved_batch()
    return model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        max_new_tokens=4,
        do_sample=False,
    )


def test_device_map_auto_loads_and_generates(saved_model):
    reference = _generate(FlamingoForConditionalGeneration.from_pretrained(saved_model))
    model = FlamingoForConditionalGeneration.from_pretrained(saved_model, device_map="auto")
    assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    assert {param.device.type for param in model.parameters()} == {"cpu"}
    assert torch.equal(_generate(model), reference)


def test_device_map_with_disk_offload_keeps_no_split_modules_whole(saved_model, tmp_path):
    reference_model = FlamingoForConditionalGeneration.from_pretrained(saved_model)
    reference = _generate(reference_model)
    no_split = set(reference_model._no_split_modules)
    assert {"FlamingoGatedCrossAttentionBlock", "FlamingoPerceiverLayer", "LlamaDecoderLayer"} <= no_split

    # Room on the CPU for about half of the weights: the rest is offloaded to disk.
    budget = reference_model.get_memory_footprint() // 2
    model = FlamingoForConditionalGeneration.from_pretrained(
        saved_model, device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path / "offload")
    )
    placements = model.hf_device_map
    assert set(placements.values()) == {"cpu", "disk"}
    # No module of a `_no_split_modules` class is split: the map never names anything strictly inside one.
    whole = [name for name, module in model.named_modules() if type(module).__name__ in no_split]
    assert whole
    for key in placements:
        assert not any(key.startswith(name + ".") for name in whole), key
    assert torch.equal(_generate(model), reference)


def test_fsdp_config_wraps_classes_that_exist(monkeypatch):
    """FSDP itself needs GPUs; check that the wrap policy of examples/accelerate_configs/fsdp.yaml resolves: with no
    explicit class list, accelerate wraps `model._no_split_modules`, and every name there must be a class the model
    contains (accelerate raises "Could not find the transformer layer class" otherwise)."""
    yaml = pytest.importorskip("yaml")
    from accelerate.utils.dataclasses import get_module_class_from_name

    config = yaml.safe_load((REPO / "examples" / "accelerate_configs" / "fsdp.yaml").read_text())
    fsdp = config["fsdp_config"]
    assert config["distributed_type"] == "FSDP" and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    model = build_model("llama")
    names = set(model._no_split_modules)
    for name in names:
        assert get_module_class_from_name(model, name) is not None, name
    # The blocks that hold most parameters are wrapped: the LM's decoder layers, the tower's encoder layers and
    # Flamingo's own blocks. CLIP's `CLIPTextEmbeddings` (declared by CLIPVisionModel too) is dropped.
    assert {
        "LlamaDecoderLayer",
        "CLIPEncoderLayer",
        "FlamingoGatedCrossAttentionBlock",
        "FlamingoPerceiverLayer",
    } <= names
    assert "CLIPTextEmbeddings" not in names
    # accelerate's own resolution of the default policy (what `accelerate launch` does before wrapping).
    from accelerate.utils import FullyShardedDataParallelPlugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    wrapped = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
    assert {"LlamaDecoderLayer", "FlamingoGatedCrossAttentionBlock", "FlamingoPerceiverLayer"} <= wrapped

    deepspeed = yaml.safe_load((REPO / "examples" / "accelerate_configs" / "deepspeed_zero3.yaml").read_text())
    assert deepspeed["distributed_type"] == "DEEPSPEED" and deepspeed["deepspeed_config"]["zero_stage"] == 3
