"""Checkpoints of sft.py, reward_model.py and dpo_baseline.py: SIGKILLed anywhere (during a save too) and resumed, a
run equals a straight one bit for bit; a sharded or damaged checkpoint; flags that clash with the checkpoint's.
(The RL scripts' fault injection is in test_ppo.py and test_drpo.py; the harness, kill_and_resume, in conftest.py.)"""

import json
import os

import pytest
import torch
from conftest import ROOT, SMALL, kill_and_resume, newest_run, run_script, untimed
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

UPDATES = 10  # of 32 examples (or pairs), a checkpoint every 2


def short_run(script, world, sft_model):
    """Flags of a 10-update run of `script` on the tiny world, evaluated every 3 updates."""
    common = [
        "--lr",
        "1e-3",
        "--batch-size",
        32,
        "--local-micro-batch-size",
        16,
        "--max-train-samples",
        32 * UPDATES,
        "--max-eval-samples",
        32,
        "--eval-every",
        3,
        "--output-dir",
        "out",
    ]
    if script == "sft.py":
        return ["--base-model", world / "base", "--dataset-name", world / "tldr_sft", *common]
    if script == "reward_model.py":
        return [
            "--sft-model-path",
            sft_model,
            "--dataset-name",
            world / "tldr_comparisons",
            "--norm-dataset-name",
            world / "tldr_sft",
            "--max-norm-samples",
            64,
            *common,
        ]
    return ["--sft-model-path", sft_model, "--dataset-name", world / "tldr_comparisons", "--beta", 0.1, *common]


def final_weights(script, folder):
    cls = AutoModelForSequenceClassification if script == "reward_model.py" else AutoModelForCausalLM
    return cls.from_pretrained(folder).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "dpo_baseline.py"])
def test_killed_anywhere_the_run_resumes_to_the_straight_run(script, world, sft_model, tmp_path):
    """Fault injection (conftest.py, kill_and_resume): one SIGKILL while a checkpoint is being written, one at random,
    each resumed with --resume-from auto. The final model (the reward model after its normalisation, which runs once),
    the last checkpoint's optimizer state and schedule, and the log equal a straight run's, bit for bit; no kill left
    the run without its newest complete checkpoint, and a kill loses at most one checkpoint interval."""
    flags = [*short_run(script, world, sft_model), "--save-every", 2, "--keep-checkpoints", 1]
    for d in ("straight", "killed"):
        os.makedirs(tmp_path / d)
    run_script(script, *flags, cwd=tmp_path / "straight", env={"OMP_NUM_THREADS": "1"})
    kills = kill_and_resume(script, flags, tmp_path / "killed", seed=2, updates=UPDATES, save_every=2, kills=2)
    print(kills)
    assert kills[0]["during_save"] and all(k["lost"] <= 2 for k in kills), kills
    a_run, b_run = (newest_run(tmp_path / d) for d in ("straight", "killed"))
    a_log, b_log = ([json.loads(x) for x in open(f"{r}/metrics.jsonl")] for r in (a_run, b_run))
    assert [m["update"] for m in b_log] == list(range(1, UPDATES + 1)) and untimed(a_log) == untimed(b_log)
    assert sum("eval_loss" in m or "eval/rewards/accuracies" in m for m in b_log) == 4  # updates 3, 6, 9 and the last
    a, b = (final_weights(script, tmp_path / d / "out") for d in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if script == "reward_model.py":  # normalised once, by the same shift
        a_cfg, b_cfg = (json.load(open(tmp_path / d / "out" / "config.json")) for d in ("straight", "killed"))
        assert a_cfg["reward_bias"] == b_cfg["reward_bias"] != 0 and a_cfg["reward_bias_in_weights"]
    assert os.listdir(f"{a_run}/checkpoints") == os.listdir(f"{b_run}/checkpoints") == ["update_0000008.pt"]  # --keep 1
    a_state, b_state = (torch.load(f"{r}/checkpoints/update_0000008.pt", weights_only=True) for r in (a_run, b_run))
    a_opt, b_opt = a_state["optimizer"]["state"], b_state["optimizer"]["state"]
    assert len(a_opt) > 0 and all(torch.equal(a_opt[i][k], b_opt[i][k]) for i in a_opt for k in a_opt[i])
    assert a_state["update"] == b_state["update"] == 8 and a_state["model"].keys() == b_state["model"].keys()
    assert all(torch.equal(a_state["model"][k], b_state["model"][k]) for k in a_state["model"])


def sft_flags(world):
    return [
        *("--base-model", world / "base", "--dataset-name", world / "tldr_sft", "--lr", "1e-3", "--batch-size", 32),
        *("--local-micro-batch-size", 32, "--max-train-samples", 192, "--max-eval-samples", 16, "--eval-every", 100),
    ]


def test_a_damaged_checkpoint_is_passed_over_and_other_flags_are_refused(world, tmp_path):
    """A checkpoint cut short (a full disk, a broken copy) is named and the previous one is used; the run still ends
    where a straight run ends. A flag that differs from the checkpoint's is refused before any model is loaded; one
    that may change on resume (--output-dir) is not."""
    run_script("sft.py", *sft_flags(world), "--save-every", 2, "--output-dir", tmp_path / "straight", cwd=tmp_path)
    run = newest_run(tmp_path)
    assert sorted(os.listdir(f"{run}/checkpoints")) == ["update_0000002.pt", "update_0000004.pt"]
    newest, straight = f"{run}/checkpoints/update_0000004.pt", final_weights("sft.py", tmp_path / "straight")
    proc = run_script("sft.py", "--resume-from", run, "--output-dir", tmp_path / "resumed", cwd=tmp_path)
    assert f"resumed from {newest} at update 5" in proc.stdout and "WARNING" not in proc.stdout
    resumed = final_weights("sft.py", tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    with open(newest, "r+b") as f:  # a kill of the copy, half way
        f.truncate(os.path.getsize(newest) // 2)
    proc = run_script("sft.py", "--resume-from", run, "--output-dir", tmp_path / "damaged", cwd=tmp_path)
    assert f"WARNING: checkpoint {newest} does not load (RuntimeError" in proc.stdout and "at update 3" in proc.stdout
    resumed = final_weights("sft.py", tmp_path / "damaged")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [json.loads(x)["update"] for x in open(f"{run}/metrics.jsonl")] == [1, 2, 3, 4, 5, 6]

    proc = run_script("sft.py", "--resume-from", run, "--lr", "1e-4", "--batch-size", 16, check=False, cwd=tmp_path)
    assert (
        proc.returncode != 0
        and "the run was started with other flags: --lr 0.0001 (saved: 0.001); --batch-size 16 (saved: 32)" in proc.stdout
        and "dtypes:" not in proc.stdout
    )


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_cpu(world, tmp_path, monkeypatch):
    """A checkpoint holds CPU tensors and is read with map_location="cpu": a file whose tensors say they lived on
    cuda:0 (as torch.save writes them from a GPU) resumes on a machine without one, to the straight run's model. No RNG
    state is saved: every draw of the scripts is a function of the seed and the update."""
    run_script("sft.py", *sft_flags(world), "--save-every", 2, "--output-dir", tmp_path / "straight", cwd=tmp_path)
    run = newest_run(tmp_path)
    path = f"{run}/checkpoints/update_0000004.pt"
    state = torch.load(path, weights_only=True)
    assert set(state) == {"model", "optimizer", "update", "config"} and state["update"] == 4
    tensors = [*state["model"].values(), *(v for s in state["optimizer"]["state"].values() for v in s.values())]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    with monkeypatch.context() as m:  # what a GPU's torch.save records for each storage
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # without map_location: the failure the scripts used to meet
    proc = run_script("sft.py", "--resume-from", run, "--output-dir", tmp_path / "resumed", cwd=tmp_path)
    assert f"resumed from {path} at update 5" in proc.stdout and "WARNING" not in proc.stdout
    straight, resumed = (final_weights("sft.py", tmp_path / d) for d in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("script", ["dpo_baseline.py", "drpo_tldr.py"])
def test_frozen_dtype_auto_stays_auto_and_the_same_command_resumes(script, world, sft_model, tmp_path):
    """`--frozen-dtype auto` is resolved for the machine a run starts on (bf16 on CUDA, fp32 on CPU), not written over
    the run's flags: the checkpoint holds `auto`, so the same command, `--frozen-dtype auto` spelled out, resumes with
    `--resume-from auto` (it was refused as a changed flag), and a GPU run resumed on a CPU takes the CPU's precision."""
    if script == "dpo_baseline.py":
        flags = ["--dataset-name", world / "tldr_comparisons", "--beta", 0.1, "--lr", 1e-3, "--batch-size", 32]
        flags += ["--local-micro-batch-size", 16, "--max-train-samples", 64, "--max-eval-samples", 16]
    else:
        flags = ["--value-model-path", sft_model, "--reward-fn", f"{ROOT}/tiny_world.py:gold_reward", *SMALL]
        flags += ["--dataset-name", world / "tldr_sft", "--total-episodes", 64]
    flags = ["--sft-model-path", sft_model, *flags, "--frozen-dtype", "auto", "--save-every", 1, "--output-dir", "out"]
    assert "frozen models float32" in run_script(script, *flags, cwd=tmp_path).stdout
    checkpoint = torch.load(f"{newest_run(tmp_path)}/checkpoints/update_0000001.pt", weights_only=True)
    assert checkpoint["config"]["frozen_dtype"] == "auto"
    assert "at update 2" in run_script(script, *flags, "--resume-from", "auto", cwd=tmp_path).stdout


def test_restore_keeps_no_reference_to_the_checkpoints_tensors():
    """set_model_state_dict writes the tensors it loads back into the dict it is given (torch 2.13), so a restore
    that passed `checkpoint["model"]` kept a second copy of the trained weights (on the GPU, under torchrun) and the
    AdamW state alive for the whole resumed run. After restore nothing holds them: the weights are the loaded ones and
    the checkpoint's tensors are freed."""
    import io
    import weakref

    import drpo_tldr

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(2, 1)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model["b"](model["a"](torch.ones(1, 3))).sum().backward()
    optimizer.step()
    saved = {"model": {k: v.detach() + 1 for k, v in model.state_dict().items()}, "update": 1}
    saved["optimizer"] = drpo_tldr.dist_state.get_optimizer_state_dict(model, optimizer)
    torch.save(saved, buffer := io.BytesIO())
    checkpoint = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)  # as resume reads it
    expected = {k: v.clone() for k, v in checkpoint["model"].items()}
    watched = [weakref.ref(t) for t in checkpoint["model"].values()]
    drpo_tldr.restore(model, optimizer, checkpoint)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert checkpoint == {"update": 1} and all(ref() is None for ref in watched)


def test_a_checkpoint_holds_no_frozen_weight_not_even_a_tied_one(tmp_path, monkeypatch):
    """--use-lora: a checkpoint holds the adapters (and their AdamW state) alone. torch's ignore_frozen_params drops the
    frozen parameters named_parameters() lists, and it lists a tied weight once: the LM head tied to the embeddings
    (GPT-2, Llama 3.2, ...) stayed in every checkpoint under its second name, 1 GB in fp32 at Llama-3.2-1B's vocabulary.
    The smaller checkpoint restores the same model (the frozen weights are the ones the run starts from)."""
    import drpo_tldr

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.adapter, self.head = torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 5)
            self.head.weight = self.embed.weight  # tied, as the Hub's GPT-2 and Llama 3.2

        def forward(self, ids):
            return self.head(self.adapter(self.embed(ids)))

    def trained():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"policy": Tied()})
        model.policy.embed.requires_grad_(False)  # the tied head with it; its bias trains
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)

    model, optimizer = trained()
    model.policy(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    monkeypatch.chdir(tmp_path)
    drpo_tldr.save_checkpoint(drpo_tldr.Args(run_name="r"), 1, model, optimizer)
    state = torch.load("runs/r/checkpoints/update_0000001.pt", weights_only=True)
    assert sorted(state["model"]) == ["policy.adapter.bias", "policy.adapter.weight", "policy.head.bias"]
    fresh, fresh_optimizer = trained()
    drpo_tldr.restore(fresh, fresh_optimizer, state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
