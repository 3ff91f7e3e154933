"""`save_pretrained` writes the code with the weights: the directory loads with `trust_remote_code=True` in a Python
process where `hf_flamingo` cannot be imported, and computes exactly what the package computes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from model_testers import build_model, interleaved_batch, open_gates

from hf_flamingo import FlamingoProcessor, MosaicGPTConfig

CODE_FILES = {
    "configuration_flamingo.py",
    "modeling_flamingo.py",
    "language_model_hooks.py",
    "configuration_mosaic_gpt.py",
    "modeling_mosaic_gpt.py",
}

REMOTE_SCRIPT = textwrap.dedent(
    """
    import os
    import sys

    sys.modules["hf_flamingo"] = None  # `import hf_flamingo` now raises ImportError, as if it were not installed
    try:
        import hf_flamingo  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_flamingo is importable")

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    directory, inputs_path, outputs_path = sys.argv[1:]
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(config).__module__.startswith("transformers_modules."), type(config).__module__
    inputs = torch.load(inputs_path, weights_only=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=2)
    outputs = {"logits": logits, "generated": generated, "language_model": type(model.language_model).__name__}
    if os.path.exists(os.path.join(directory, "processor_config.json")):
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
        encoded = processor(text=["<image>a photo"], images=[[torch.zeros(3, 30, 30)]], return_tensors="pt")
        outputs["processor_ids"] = encoded["input_ids"]
        outputs["pixel_values"] = encoded["pixel_values"]
        image_processor = type(processor.image_processor)
        outputs["image_processor"] = f"{image_processor.__module__.split('.')[0]}.{image_processor.__name__}"
    torch.save(outputs, outputs_path)
    """
)


def run_without_package(directory, inputs, tmp_path):
    torch.save(inputs, tmp_path / "inputs.pt")
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules_cache"),
    }
    result = subprocess.run(
        [sys.executable, str(script), str(directory), str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt", weights_only=True)


@pytest.mark.parametrize("family", ["llama", "mosaic_gpt"])
def test_saved_directory_loads_with_remote_code_without_the_package(family, tmp_path, tiny_processor):
    if family == "mosaic_gpt":
        text_config = MosaicGPTConfig(d_model=32, n_heads=4, n_layers=4, vocab_size=99, max_seq_len=128)
        model = build_model("llama", text_config=text_config)
    else:
        model = build_model(family)
    open_gates(model)
    directory = tmp_path / "saved"
    model.save_pretrained(directory)
    assert CODE_FILES <= {p.name for p in directory.iterdir()}
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_flamingo.FlamingoConfig",
        "AutoModelForImageTextToText": "modeling_flamingo.FlamingoForConditionalGeneration",
    }
    batch = interleaved_batch()
    inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "pixel_values": batch.pixel_values,
    }
    with torch.no_grad():
        expected_logits = model(**inputs).logits
        expected_generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=2)

    outputs = run_without_package(directory, inputs, tmp_path)
    assert outputs["language_model"] == type(model.language_model).__name__
    assert torch.equal(outputs["logits"], expected_logits)
    assert torch.equal(outputs["generated"], expected_generated)


def test_saved_processor_loads_with_remote_code_without_the_package(tmp_path, tiny_processor):
    assert isinstance(tiny_processor, FlamingoProcessor)
    model = build_model("llama")
    directory = tmp_path / "saved"
    model.save_pretrained(directory)
    tiny_processor.save_pretrained(directory)
    processor_config = json.loads((directory / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_flamingo.FlamingoProcessor"}
    assert (directory / "processing_flamingo.py").is_file()
    batch = interleaved_batch()
    outputs = run_without_package(
        directory,
        {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.pixel_values},
        tmp_path,
    )
    expected = tiny_processor(text=["<image>a photo"], images=[[torch.zeros(3, 30, 30)]], return_tensors="pt")
    assert torch.equal(outputs["processor_ids"], expected["input_ids"])
    assert torch.equal(outputs["pixel_values"], expected["pixel_values"])


def test_converted_openflamingo_directory_loads_with_remote_code_without_the_package(tmp_path):
    """A converted OpenFlamingo-3B-style model (MosaicGPT LM, FlamingoImageProcessor) runs from its own code files."""
    from conversion_fixtures import FAMILIES, convert_files, prepare_openflamingo_files
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from hf_flamingo.conversion.openflamingo_to_hf import model_card, save_converted_model

    prepare_openflamingo_files(FAMILIES["mosaic_gpt"], tmp_path)
    model, processor, report = convert_files(tmp_path)
    card = model_card(model, report, release=None, vision_model="tiny", language_model="tiny")
    directory = save_converted_model(model, processor, tmp_path / "converted", card=card)
    assert {"image_processing_flamingo.py", "processing_flamingo.py"} | CODE_FILES <= {
        p.name for p in directory.iterdir()
    }
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    inputs = dict(processor(text=["<image>Output:"], images=[[torch.rand(3, 40, 48)]], return_tensors="pt"))
    inputs.pop("mm_token_type_ids", None)
    with torch.no_grad():
        expected_logits = model(**inputs).logits
        expected_generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=2)
    outputs = run_without_package(directory, inputs, tmp_path)
    assert outputs["language_model"] == "MosaicGPTForCausalLM"
    assert outputs["image_processor"] == "transformers_modules.FlamingoImageProcessor"
    assert torch.equal(outputs["logits"], expected_logits)
    assert torch.equal(outputs["generated"], expected_generated)
    expected = processor(text=["<image>a photo"], images=[[torch.zeros(3, 30, 30)]], return_tensors="pt")
    assert torch.equal(outputs["pixel_values"], expected["pixel_values"])
