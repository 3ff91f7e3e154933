"""Runs the evaluations of a plan file under `torchrun` (for `test_evaluation_distributed.py`).

    torchrun --standalone --nproc-per-node 2 evaluation_distributed_script.py PLAN.json OUT_DIR

`PLAN.json`: `{"model": <saved Flamingo + processor>, "runs": {name: EvaluationConfig kwargs}, "failing": {...}}`.
For each run, every process calls `evaluate(..., output_path=OUT_DIR/<name>.json)`, writes what it returned to
`OUT_DIR/<name>.returned-rank<r>.json`, and appends its rank to `OUT_DIR/saves.txt` whenever it saves results;
`OUT_DIR/process-rank<r>.json` records the process group (world size, backend). In the "failing" runs the task's
model call raises on the last process; each process writes the error `evaluate` raised to `<name>.error-rank<r>.txt`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from transformers import AutoProcessor

from hf_flamingo import FlamingoForConditionalGeneration
from hf_flamingo.evaluation import EvaluationConfig, EvaluationResults, evaluate, tasks
from hf_flamingo.evaluation.runner import end_processes


def _fail(*args, **kwargs):
    raise ValueError(f"injected failure on rank {os.environ['RANK']}")


def main(plan_path: str, out_dir: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    out = Path(out_dir)
    rank = int(os.environ.get("RANK", "0"))
    original_save = EvaluationResults.save

    def recording_save(self, path):
        with (out / "saves.txt").open("a") as file:
            file.write(f"{rank} {Path(path).name}\n")
        original_save(self, path)

    EvaluationResults.save = recording_save
    model = FlamingoForConditionalGeneration.from_pretrained(plan["model"]).eval()
    processor = AutoProcessor.from_pretrained(plan["model"])
    for name, kwargs in plan["runs"].items():
        config = EvaluationConfig(**kwargs)
        results = evaluate(model, processor, config, output_path=out / f"{name}.json", progress=False)
        returned = json.dumps(results.to_dict(), indent=2, default=str)
        (out / f"{name}.returned-rank{rank}.json").write_text(returned)
    for name, kwargs in plan.get("failing", {}).items():  # the model call fails on the last process only
        config = EvaluationConfig(**kwargs)
        if rank == dist.get_world_size() - 1:
            tasks.TASK_CLASSES[config.task].predict = _fail
        try:
            evaluate(model, processor, config, output_path=out / f"{name}.json", progress=False)
        except Exception as error:
            (out / f"{name}.error-rank{rank}.txt").write_text(f"{type(error).__name__}: {error}")
    group = {"world_size": dist.get_world_size(), "backend": dist.get_backend()} if dist.is_initialized() else {}
    (out / f"process-rank{rank}.json").write_text(json.dumps(group))
    end_processes()


if __name__ == "__main__":
    main(*sys.argv[1:])
