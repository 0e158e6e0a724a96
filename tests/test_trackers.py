"""--track: every script hands W&B the run's name, its whole config and, at every update, the same metrics it writes to
metrics.jsonl, at the step the README states (episodes for the RL scripts, the update otherwise). W&B is not installed
here: a stand-in `wandb` module next to a copy of the script (scripts stand alone) records what it is given."""

import importlib
import json
import os
import shutil

import pytest
from conftest import ROOT, SMALL, run_script

SCRIPTS = "sft reward_model ppo_baseline drpo_tldr drpo_hh dpo_baseline rebel online_dpo hypo".split()

FAKE_WANDB = """import json, os
def _write(record):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")
class Run:
    def log(self, metrics, step):
        _write({"step": step, "metrics": metrics})
def init(project, name, config, resume, id):
    _write({"init": {"project": project, "name": name, "resume": resume, "id": id}, "config": config})
    return Run()
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_both_tracker_flags(script):
    fields = importlib.import_module(script).Args.__dataclass_fields__
    assert fields["track"].default is False and fields["tensorboard"].default is False


@pytest.mark.parametrize(
    "script,flags",
    [
        ("sft.py", lambda w, sft: ["--base-model", w / "base", "--dataset-name", w / "tldr_sft", "--lr", 1e-3,
                                   "--num-train-epochs", 1, "--batch-size", 32, "--local-micro-batch-size", 32]),
        ("reward_model.py", lambda w, sft: ["--sft-model-path", sft, "--dataset-name", w / "tldr_comparisons",
                                            "--norm-dataset-name", w / "tldr_sft", "--max-train-samples", 64,
                                            "--batch-size", 32, "--local-micro-batch-size", 32]),
        ("drpo_tldr.py", lambda w, sft: ["--sft-model-path", sft, "--reward-model-path", sft, "--dataset-name",
                                         w / "tldr_sft", "--total-episodes", 64, *SMALL]),
    ],
)  # fmt: skip
def test_track_logs_every_update_to_wandb(script, flags, world, sft_model, tmp_path):
    (tmp_path / "code").mkdir()
    shutil.copy(os.path.join(ROOT, script), tmp_path / "code" / script)
    (tmp_path / "code" / "wandb.py").write_text(FAKE_WANDB)
    record = tmp_path / "wandb.jsonl"
    run_script(str(tmp_path / "code" / script), *flags(world, sft_model), "--track", "--output-dir", tmp_path / "out",
               cwd=tmp_path, env={"FAKE_WANDB_LOG": str(record)})  # fmt: skip
    (run,) = os.listdir(tmp_path / "runs")
    logged = [json.loads(line) for line in open(tmp_path / "runs" / run / "metrics.jsonl")]
    init, *steps = [json.loads(line) for line in open(record)]
    assert init["init"] == {"project": "drpo", "name": run, "resume": "allow", "id": run}
    assert init["config"] == json.load(open(tmp_path / "runs" / run / "args.json"))
    assert len(logged) >= 2 and [s["metrics"] for s in steps] == logged
    assert [s["step"] for s in steps] == [m.get("episodes", m["update"]) for m in logged]
