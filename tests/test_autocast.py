"""bf16 autocast, which the scripts turn on only on a GPU, run on a CPU (tests/autocast_probe.py): every script still
trains, and its autocast regions end where their `with` blocks end. `torch.autocast.__enter__` keeps the state it
replaces on the object itself, so one object entered again inside its own region (a helper's `with autocast:` called
from a rollout's `with ..., autocast, ...:`) restores "on" when the outer block exits, and autocast stays on for the
rest of the run: the optimizer steps, the losses and whatever else runs outside the regions."""

import json

import pytest
import torch
from conftest import ROOT, SMALL, newest_run, run_script, torchrun
from safetensors.torch import load_file

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


@pytest.mark.slow
def test_fsdp_in_the_gpu_precision_trains_and_resumes_bit_for_bit(world, sft_model, tmp_path):
    """What a GPU job runs, on 2 CPU processes: torchrun, --fsdp with the GPU's FSDP2 policy (bf16 weights gathered,
    gradients reduced in fp32), bf16 autocast and bf16 frozen models. DR-PO trains (its first ratio within the README's
    tolerance of 1, no step under autocast), its checkpoint holds fp32 CPU tensors, and resumed from it the run ends
    with the straight run's weights, bit for bit."""
    flags = ["--sft-model-path", sft_model, "--value-model-path", sft_model, "--dataset-name", world / "tldr_sft"]
    flags += [*SMALL, "--local-micro-batch-size", 8, "--local-rollout-forward-batch-size", 16]  # later flags win
    flags += ["--reward-fn", GOLD, "--reset-prob", 0.5, "--frozen-dtype", "bfloat16", "--fsdp"]
    flags += ["--total-episodes", 128, "--save-every", 2]  # 4 updates, a checkpoint after the second
    env = {"GPU_MIXED_PRECISION": "1", "AUTOCAST_PROBE": str(tmp_path / "probe{rank}.json")}
    probe = f"{ROOT}/tests/autocast_probe.py"
    torchrun(probe, f"{ROOT}/drpo_tldr.py", *flags, "--output-dir", tmp_path / "straight", cwd=tmp_path, env=env)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"probe{rank}.json").read_text())
        steps = 4 * 4 * 2  # updates x PPO epochs x minibatches
        assert seen["gpu_policies"] == 2 and seen["entered"] > 0 and len(seen["on_at_step"]) == steps
        assert not any(seen["on_at_step"])
    run = newest_run(tmp_path)
    log = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    assert [m["update"] for m in log] == [1, 2, 3, 4] and all(abs(m["policy/first_ratio"] - 1) < 1e-2 for m in log)
    checkpoint = torch.load(f"{run}/checkpoints/update_0000002.pt", map_location="cpu", weights_only=True)
    assert {(t.dtype, t.device.type) for t in checkpoint["model"].values()} == {(torch.float32, "cpu")}
    resume = ["--resume-from", f"{run}/checkpoints/update_0000002.pt", "--output-dir", tmp_path / "resumed"]
    proc = torchrun(probe, f"{ROOT}/drpo_tldr.py", *resume, cwd=tmp_path, env=env)
    assert "at update 3" in proc.stdout
    straight, resumed = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
