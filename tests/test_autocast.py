"""bf16 autocast, which the scripts turn on only on a GPU, run on a CPU (tests/autocast_probe.py): every script still
trains, and its autocast regions end where their `with` blocks end. `torch.autocast.__enter__` keeps the state it
replaces on the object itself, so one object entered again inside its own region (a helper's `with autocast:` called
from a rollout's `with ..., autocast, ...:`) restores "on" when the outer block exits, and autocast stays on for the
rest of the run: the optimizer steps, the losses and whatever else runs outside the regions."""

import json

import pytest
from conftest import ROOT, SMALL, run_script

GOLD = f"{ROOT}/tiny_world.py:gold_reward"
RL = [*SMALL, "--reward-fn", GOLD, "--save-every", 0, "--eval-every", 1, "--eval-prompts", 8]  # batch 32, 2 minibatches
DPO = ["--lr", "1e-3", "--batch-size", 32, "--local-micro-batch-size", 16, "--max-train-samples", 64, "--max-eval-samples", 16]
DPO += ["--eval-every", 1]  # after the first step too


def ppo(w, sft, data="tldr_sft"):
    return ["--value-model-path", sft, "--dataset-name", w / data, *RL, "--total-episodes", 32]


RUNS = {  # script: its flags, given the tiny world's folder and its SFT model; each run takes 2 optimizer steps or more
    "ppo_baseline.py": ppo,
    "drpo_tldr.py": lambda w, sft: [*ppo(w, sft), "--reset-prob", 0.5],
    "drpo_hh.py": lambda w, sft: [*ppo(w, sft, "hh"), "--reset-prob", 0.5],
    "rebel.py": lambda w, sft: ["--dataset-name", w / "tldr_sft", *RL, "--total-episodes", 64],  # 32 pairs
    "online_dpo.py": lambda w, sft: [
        *("--reward-fn", GOLD, "--dataset-name", w / "tldr_sft", "--response-length", 8, "--total-episodes", 32),
        *("--prompts-per-iteration", 16, "--batch-size", 8, "--local-rollout-forward-batch-size", 8),
        *("--local-micro-batch-size", 4, "--print-sample-every", 0, "--save-every", 0, "--eval-every", 1),
    ],
    "hypo.py": lambda w, sft: ["--dataset-name", w / "tldr_comparisons", *DPO, "--kl-weight", 0.5],
    "dpo_baseline.py": lambda w, sft: ["--dataset-name", w / "tldr_comparisons", *DPO],
    "sft.py": lambda w, sft: [
        *("--base-model", w / "base", "--dataset-name", w / "tldr_sft", "--batch-size", 32, "--local-micro-batch-size", 32),
        *("--max-train-samples", 64, "--max-eval-samples", 16, "--eval-every", 1),
    ],
    "reward_model.py": lambda w, sft: [
        *("--dataset-name", w / "tldr_comparisons", "--norm-dataset-name", w / "tldr_sft", "--batch-size", 32),
        *("--local-micro-batch-size", 16, "--max-train-samples", 64, "--max-eval-samples", 16, "--eval-every", 1),
    ],
}


@pytest.mark.parametrize("script", RUNS)
def test_autocast_ends_with_its_block(script, world, sft_model, tmp_path):
    """Under an enabled CPU bf16 autocast the script runs to its end, autocast regions were entered, and no optimizer
    step (each runs outside every region) sees autocast on."""
    flags = [*RUNS[script](world, sft_model), "--output-dir", tmp_path / "out"]
    flags += [] if script == "sft.py" else ["--sft-model-path", sft_model]
    probe = tmp_path / "probe.json"
    run_script("tests/autocast_probe.py", f"{ROOT}/{script}", *flags, cwd=tmp_path, env={"AUTOCAST_PROBE": str(probe)})
    seen = json.loads(probe.read_text())
    assert seen["entered"] > 0 and len(seen["on_at_step"]) >= 2
    assert not any(seen["on_at_step"]), f"autocast on at {sum(seen['on_at_step'])} of {len(seen['on_at_step'])} steps"
