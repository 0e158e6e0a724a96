"""--track and --tensorboard: every script hands W&B the run's name, its whole config and, at every update, the same
metrics it writes to metrics.jsonl, at the step the README states (episodes for the RL scripts, the update otherwise);
TensorBoard gets the same scalars at the same steps, in runs/{run_name}. Neither is installed here: a stand-in `wandb`
module next to a copy of the script (scripts stand alone) records what it is given, and the copy's one TensorBoard
import is pointed at a stand-in SummaryWriter (the real one, tensorboard 2.21, was checked by hand: README)."""

import importlib
import json
import os

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
class SummaryWriter:  # torch.utils.tensorboard's, as the scripts use it
    def __init__(self, log_dir):
        _write({"tensorboard": log_dir})
    def add_scalar(self, tag, value, step):
        _write({"tag": tag, "value": value, "step": step})
"""
TENSORBOARD_IMPORT = "from torch.utils.tensorboard import SummaryWriter"


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
def test_track_and_tensorboard_log_every_update(script, flags, world, sft_model, tmp_path):
    (tmp_path / "code").mkdir()
    source = open(os.path.join(ROOT, script)).read()
    assert source.count(TENSORBOARD_IMPORT) == 1
    (tmp_path / "code" / script).write_text(source.replace(TENSORBOARD_IMPORT, "from wandb import SummaryWriter"))
    (tmp_path / "code" / "wandb.py").write_text(FAKE_WANDB)
    record = tmp_path / "wandb.jsonl"
    run_script(str(tmp_path / "code" / script), *flags(world, sft_model), "--track", "--tensorboard", "--output-dir",
               tmp_path / "out", cwd=tmp_path, env={"FAKE_WANDB_LOG": str(record)})  # fmt: skip
    (run,) = os.listdir(tmp_path / "runs")
    logged = [json.loads(line) for line in open(tmp_path / "runs" / run / "metrics.jsonl")]
    init, tensorboard, *records = [json.loads(line) for line in open(record)]
    assert init["init"] == {"project": "drpo", "name": run, "resume": "allow", "id": run}
    assert init["config"] == json.load(open(tmp_path / "runs" / run / "args.json"))
    assert tensorboard == {"tensorboard": f"runs/{run}"}
    steps = [r for r in records if "metrics" in r]
    assert len(logged) >= 2 and [s["metrics"] for s in steps] == logged
    assert [s["step"] for s in steps] == [m.get("episodes", m["update"]) for m in logged]
    scalars = [{"tag": k, "value": v, "step": m.get("episodes", m["update"])} for m in logged for k, v in m.items()]
    assert [r for r in records if "tag" in r] == scalars  # every metric, in the order of metrics.jsonl
