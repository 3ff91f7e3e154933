"""The converter's command line and its handling of bad input: every failure is specific and leaves no output."""

import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conversion_fixtures import FAMILIES, convert_files, prepare_openflamingo_files
from transformers import AutoModelForImageTextToText

from hf_flamingo.conversion.openflamingo import (
    CheckpointError,
    load_openflamingo_checkpoint,
    normalize_openflamingo_state_dict,
)
from hf_flamingo.conversion.openflamingo_to_hf import (
    model_card,
    push_converted_model,
    resolve_checkpoint,
    save_converted_model,
)
from hf_flamingo.conversion.releases import get_release
from hf_flamingo.conversion.writing import write_directory_atomically

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "conversion" / "convert_openflamingo_to_hf.py"


def run_cli(*args, timeout=300):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=REPO_ROOT,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    oracle, _ = prepare_openflamingo_files(FAMILIES["mosaic_gpt"], directory)
    return directory


def backbone_args(files):
    return [
        "--vision-model",
        files / "vision_model",
        "--language-model",
        files / "language_model",
        "--tokenizer",
        files / "tokenizer",
    ]


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--checkpoint", "--release", "--output-dir", "--push-to-hub", "--dtype", "--overwrite"):
        assert option in result.stdout
    assert "OpenFlamingo-9B-vitl-mpt7b" in result.stdout


def test_cli_converts_and_refuses_to_overwrite(files, tmp_path):
    output_dir = tmp_path / "converted"
    result = run_cli("--checkpoint", files / "checkpoint.pt", *backbone_args(files), "--output-dir", output_dir)
    assert result.returncode == 0, result.stderr
    assert "cross-attention every 1 layers" in result.stdout
    model = AutoModelForImageTextToText.from_pretrained(output_dir)
    assert model.config.cross_attn_every_n_layers == 1
    assert type(model.language_model).__name__ == "MosaicGPTForCausalLM"
    reference, _, _ = convert_files(files)
    expected_state = reference.state_dict()
    assert model.state_dict().keys() == expected_state.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected_state[name]), name

    before = sorted(p.name for p in output_dir.iterdir())
    modified = {p.name: p.stat().st_mtime_ns for p in output_dir.iterdir()}
    again = run_cli("--checkpoint", files / "checkpoint.pt", *backbone_args(files), "--output-dir", output_dir)
    assert again.returncode != 0
    assert "already exists; pass --overwrite" in again.stderr
    assert sorted(p.name for p in output_dir.iterdir()) == before
    assert {p.name: p.stat().st_mtime_ns for p in output_dir.iterdir()} == modified


def test_cli_missing_backbone_directory(files, tmp_path):
    output_dir = tmp_path / "out"
    result = run_cli(
        "--checkpoint",
        files / "checkpoint.pt",
        "--vision-model",
        tmp_path / "no-such-vision-model",
        "--language-model",
        files / "language_model",
        "--output-dir",
        output_dir,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert error_lines == [
        f"convert_openflamingo_to_hf: error: The vision model directory '{tmp_path / 'no-such-vision-model'}' "
        "does not exist."
    ]
    assert not output_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_checkpoint_of_the_wrong_release(files, tmp_path):
    """A MosaicGPT-shaped checkpoint that is not the 3B release (tiny shapes) is refused before any download."""
    output_dir = tmp_path / "out"
    result = run_cli(
        "--checkpoint", files / "checkpoint.pt", "--release", "OpenFlamingo-3B-vitl-mpt1b", "--output-dir", output_dir
    )
    assert result.returncode == 1
    assert "error: The checkpoint is not one of OpenFlamingo-3B-vitl-mpt1b:" in result.stderr
    assert "not every n-th layer of a 24-layer language model" in result.stderr
    assert not output_dir.exists()


def test_failed_upload_through_hf_flamingo_convert_is_one_error_line(files, tmp_path, monkeypatch, capsys):
    """`hf-flamingo convert --push-to-hub` whose upload fails: the directory stays written, the error is one line."""
    from hf_flamingo.conversion import openflamingo_to_hf
    from hf_flamingo_cli import main

    def refuse(directory, repo_id, private=False, token=None):
        raise OSError(f"403 Forbidden:\nno write access to {repo_id}")

    monkeypatch.setattr(openflamingo_to_hf, "push_converted_model", refuse)
    output_dir = tmp_path / "out"
    argv = ["convert", "--checkpoint", files / "checkpoint.pt", *backbone_args(files), "--output-dir", output_dir]
    code = main([str(arg) for arg in [*argv, "--push-to-hub", "me/of-tiny"]])
    err = capsys.readouterr().err
    assert code == 1
    assert [line for line in err.splitlines() if ": error: " in line] == [
        f"hf-flamingo convert: error: wrote {output_dir} but the upload failed: 403 Forbidden: no write access to "
        "me/of-tiny"
    ]
    assert (output_dir / "config.json").is_file()


def test_wrong_interval_is_refused(files):
    with pytest.raises(CheckpointError, match="every 1 layers .* not every 2"):
        convert_files(files, cross_attn_every_n_layers=2)


def test_truncated_checkpoint(files, tmp_path):
    data = (files / "checkpoint.pt").read_bytes()
    truncated = tmp_path / "checkpoint.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="may be truncated or not a checkpoint"):
        load_openflamingo_checkpoint(truncated)


class NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_arbitrary_objects_is_not_unpickled(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as file:
        pickle.dump({"perceiver.latents": NotATensor()}, file)
    with pytest.raises(CheckpointError, match="contains objects other than tensors .* was not unpickled"):
        load_openflamingo_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([torch.zeros(2)], "holds a list, not a state dict"),
        ({"perceiver.latents": 3}, "key 'perceiver.latents' holds a int"),
        ({}, "is an empty state dict"),
        ({"model_state_dict": {"module.perceiver.latents": "x"}}, "holds a str"),
    ],
)
def test_checkpoint_that_is_not_a_tensor_dict(tmp_path, content, message):
    path = tmp_path / "checkpoint.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_openflamingo_checkpoint(path)


def test_training_checkpoint_wrapping_and_module_prefix_are_accepted():
    tensor = torch.ones(2)
    wrapped = {"epoch": 3, "model_state_dict": OrderedDict([("module.perceiver.latents", tensor)])}
    assert normalize_openflamingo_state_dict(wrapped) == {"perceiver.latents": tensor}


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_openflamingo_checkpoint(tmp_path / "checkpoint.pt")


def test_safetensors_checkpoint_is_accepted(files, tmp_path):
    from safetensors.torch import save_file

    state_dict = load_openflamingo_checkpoint(files / "checkpoint.pt")
    save_file({k: v.clone() for k, v in state_dict.items()}, tmp_path / "checkpoint.safetensors")
    loaded = load_openflamingo_checkpoint(tmp_path / "checkpoint.safetensors")
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)


def test_failed_write_leaves_nothing_behind(tmp_path):
    def failing_write(directory):
        (directory / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing the shards

    with pytest.raises(KeyboardInterrupt):
        write_directory_atomically(tmp_path / "out", failing_write)
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        write_directory_atomically(existing, failing_write, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]
    assert (existing / "keep.txt").read_text() == "old"
    with pytest.raises(FileExistsError, match="already exists"):
        write_directory_atomically(existing, lambda directory: None)

    write_directory_atomically(existing, lambda directory: (directory / "new.txt").write_text("new"), overwrite=True)
    assert sorted(p.name for p in existing.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


def test_dtype_and_sharded_output(files, tmp_path):
    model, processor, report = convert_files(files, dtype="bfloat16")
    card = model_card(model, report, release=None, vision_model="tiny", language_model="tiny")
    output_dir = save_converted_model(model, processor, tmp_path / "bf16", card=card, max_shard_size="200KB")
    shards = sorted(p.name for p in output_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (output_dir / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForImageTextToText.from_pretrained(output_dir)
    reference, _, _ = convert_files(files)
    expected = reference.state_dict()
    for name, value in reloaded.state_dict().items():
        assert value.dtype == torch.bfloat16, name
        assert torch.equal(value, expected[name].to(torch.bfloat16)), name


def test_push_to_hub_uploads_the_written_directory(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    class RecordingApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return "commit-url"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    assert push_converted_model(tmp_path, "someone/of-tiny", private=True, token="t") == "commit-url"
    assert calls[0] == ("init", "t")
    assert calls[1] == ("create_repo", "someone/of-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[2][0] == "upload_folder"
    assert calls[2][1]["repo_id"] == "someone/of-tiny" and calls[2][1]["folder_path"] == str(tmp_path)


def test_release_checkpoint_cannot_be_downloaded_offline():
    with pytest.raises(FileNotFoundError, match=r"from the Hub repository 'openflamingo/OpenFlamingo-3B-vitl-mpt1b'"):
        resolve_checkpoint(None, get_release("OpenFlamingo-3B-vitl-mpt1b"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint("no/such/dir/checkpoint.pt", None)
