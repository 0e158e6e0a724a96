"""dpo_baseline.py: the loss against hand-computed values, the response-only log-probs, the reference cache, and
learning on the tiny world."""

import glob
import json
import math
import os
import shutil

import pytest
import torch
from conftest import policy_gold, run_script
from transformers import AutoModelForCausalLM

import dpo_baseline as dpo
import tiny_world

PAD, EOS = 1, 0


def test_dpo_ipo_and_label_smoothing_by_hand():
    args = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])]
    # h = (logp_c - ref_c) - (logp_r - ref_r) = 1 - (-1) = 2
    loss, rc, rr = dpo.dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    loss, _, _ = dpo.dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log(1 + math.exp(-0.2)) + 0.1 * math.log(1 + math.exp(0.2)), abs=1e-6)
    loss, _, _ = dpo.dpo_loss(*args, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx((2 - 1 / 0.2) ** 2, abs=1e-5)
    # RPO: plus alpha * the chosen NLL per token (logp_c = -1 over 4 tokens: 0.25)
    loss, _, _ = dpo.dpo_loss(*args, beta=0.1, rpo_alpha=0.5, chosen_lengths=torch.tensor([4]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)) + 0.5 * 0.25, abs=1e-6)


def test_sequence_logprobs_mask_prompt_and_padding_exactly(sft_model):
    model = AutoModelForCausalLM.from_pretrained(sft_model).eval()
    pairs = [([30, 31, 32, 33, 34], [40, 41, EOS], [50, EOS]), ([30, 31], [42, 43, 44, 45, EOS], [51, 52, 53, EOS])]
    with torch.no_grad():
        chosen, rejected = dpo.sequence_logprobs(model, pairs, PAD, "cpu")
        for i, (q, c, r) in enumerate(pairs):  # reference: one example at a time, no padding, full logits
            for resp, got in ((c, chosen[i]), (r, rejected[i])):
                ids = torch.tensor([q + resp])
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
                assert got.item() == pytest.approx(logp[len(q) - 1 :].sum().item(), abs=1e-4)


FLAGS = [
    "--lr",
    "1e-3",
    "--beta",
    "0.1",
    "--batch-size",
    "32",
    "--local-micro-batch-size",
    "16",
    "--eval-every",
    "20",
    "--max-grad-norm",
    "1",
]


def last_log(cwd):
    return [json.loads(x) for x in open(sorted(glob.glob(f"{cwd}/runs/*/metrics.jsonl"), key=os.path.getmtime)[-1])]


@pytest.mark.slow
def test_dpo_learns_on_the_tiny_world(world, bland_sft_model, tmp_path):
    # The DPO task of the tiny world (bland/): half the SFT references are one bland answer, so the SFT policy's
    # greedy answer is that answer (gold 0); the comparisons prefer specific on-topic answers to it.
    data = world / "bland"
    proc = run_script(
        "dpo_baseline.py",
        "--sft-model-path",
        bland_sft_model,
        "--dataset-name",
        data / "tldr_comparisons",
        "--output-dir",
        tmp_path / "dpo",
        "--lr",
        "3e-4",
        *FLAGS[2:],
        cwd=tmp_path,
    )
    log = last_log(tmp_path)
    # step 0: the policy is the reference: implicit rewards 0, loss log 2 (to float tolerance: the reference's
    # log-probs were computed in other micro-batches, whose padding can move the last bits)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and abs(log[0]["rewards/margins"]) < 1e-4
    assert abs(log[0]["rewards/chosen"]) < 1e-4 and abs(log[0]["rewards/rejected"]) < 1e-4
    evals = [m["eval/rewards/accuracies"] for m in log if "eval/rewards/accuracies" in m]
    assert evals[-1] > 0.95 and log[-1]["rewards/margins"] > 0.5  # held-out implicit-reward accuracy
    assert log[-1]["logps/rejected"] < log[0]["logps/rejected"] - 5  # the rejected answers lost most of their probability
    assert "computed the reference log-probs" in proc.stdout
    # the gold rule on greedy answers to 100 held-out prompts, DPO against SFT
    (sft, sft_answers), (tuned, _) = (policy_gold(m, data, 100, do_sample=False) for m in (bland_sft_model, tmp_path / "dpo"))
    wins = sum((t > s) + 0.5 * (t == s) for s, t in zip(sft, tuned)) / len(sft)
    print(f"greedy gold: SFT {sum(sft) / len(sft):.3f}, DPO {sum(tuned) / len(tuned):.3f}, win rate {wins:.3f}")
    assert sft_answers.count(tiny_world.BLAND) > 90  # the premise: SFT's greedy answer is the bland one
    assert sum(tuned) / len(tuned) > sum(sft) / len(sft) + 0.3 and wins > 0.7


def test_reference_cache_is_reused_and_invalidated(world, sft_model, tmp_path):
    base = [
        "--dataset-name",
        world / "tldr_comparisons",
        "--max-train-samples",
        32,
        "--max-eval-samples",
        8,
        "--output-dir",
        tmp_path / "o",
        *FLAGS,
    ]
    model = tmp_path / "sft"
    shutil.copytree(sft_model, model)
    first = run_script("dpo_baseline.py", "--sft-model-path", model, *base, cwd=tmp_path).stdout
    second = run_script("dpo_baseline.py", "--sft-model-path", model, *base, cwd=tmp_path).stdout
    assert "computed the reference log-probs" in first
    assert "from the cache" in second and "the reference model is not loaded" in second
    assert last_log(tmp_path)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the cached values fit the policy
    tokens = run_script("dpo_baseline.py", "--sft-model-path", model, *base, "--query-length", 40, cwd=tmp_path).stdout
    assert "query_truncated': 32" in tokens and "computed the reference log-probs" in tokens  # other token ids: a miss
    data = run_script(
        "dpo_baseline.py", "--sft-model-path", model, *base[:2], "--max-train-samples", 64, *base[4:], cwd=tmp_path
    ).stdout
    assert "computed the reference log-probs" in data  # other data: a miss
    os.utime(model / "model.safetensors", ns=(1, 1))  # a changed model file
    assert (
        "computed the reference log-probs"
        in run_script("dpo_baseline.py", "--sft-model-path", model, *base, cwd=tmp_path).stdout
    )
    assert len(os.listdir(tmp_path / "cache" / "ref_logprobs")) == 4


def test_reference_cache_misses_when_the_hub_model_or_its_dtype_changes(world, sft_model, tmp_path):
    """A Hub id is keyed on the commit it resolves to: here an offline Hub cache whose refs/main moves to a new commit,
    as when the model is updated on the Hub. And on the dtype the reference runs in (fp32 on CPU, bf16 on CUDA)."""
    repo = tmp_path / "hub" / "models--tiny--sft"

    def publish(commit):
        shutil.copytree(sft_model, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    def run(*extra):
        return run_script(
            "dpo_baseline.py",
            "--sft-model-path",
            "tiny/sft",
            "--dataset-name",
            world / "tldr_comparisons",
            "--max-train-samples",
            32,
            "--max-eval-samples",
            8,
            "--output-dir",
            tmp_path / "o",
            *FLAGS,
            *extra,
            cwd=tmp_path,
            env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
        ).stdout

    publish("a" * 40)
    assert "computed the reference log-probs" in run() and "from the cache" in run()
    publish("b" * 40)  # the same name, another commit
    assert "computed the reference log-probs" in run()
    assert "computed the reference log-probs" in run("--frozen-dtype", "bfloat16")  # another precision
    assert len(os.listdir(tmp_path / "cache" / "ref_logprobs")) == 3


def test_a_missing_column_is_named(tmp_path, world):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b"}) + "\n")
    proc = run_script(
        "dpo_baseline.py",
        "--task",
        "hh",
        "--sft-model-path",
        world / "base",
        "--dataset-name",
        path,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "lacks column(s) ['rejected']" in proc.stdout and str(path) in proc.stdout


def test_dpo_lora_saves_a_merged_plain_model_and_resumes_from_its_adapter(world, sft_model, tmp_path):
    """With --use-lora a checkpoint holds the adapter alone; a run resumed from it equals the straight run.
    (The fault injection of dpo_baseline.py without LoRA is in test_checkpoints.py.)"""
    proc = run_script(
        "dpo_baseline.py",
        "--sft-model-path",
        sft_model,
        "--dataset-name",
        world / "tldr_comparisons",
        "--max-train-samples",
        96,
        "--max-eval-samples",
        8,
        "--use-lora",
        "--lora-r",
        4,
        "--gradient-checkpointing",
        "--output-dir",
        tmp_path / "o",
        *FLAGS,
        "--save-every",
        2,
        cwd=tmp_path,
    )
    assert "trainable params" in proc.stdout
    log = last_log(tmp_path)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and log[-1]["loss"] < log[0]["loss"] and len(log) == 3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "o").state_dict()
    base = AutoModelForCausalLM.from_pretrained(sft_model).state_dict()
    assert set(merged) == set(base) and any(not torch.equal(merged[k], base[k]) for k in base)
    checkpoint = glob.glob(f"{tmp_path}/runs/*/checkpoints/update_0000002.pt")[0]
    weights = torch.load(checkpoint, weights_only=True)["model"]  # the adapters alone: the base is the SFT model
    assert weights and all("lora_" in k for k in weights) and len(weights) < len(base)
    resumed = run_script("dpo_baseline.py", "--resume-from", checkpoint, "--output-dir", tmp_path / "r", cwd=tmp_path)
    assert f"resumed from {checkpoint} at update 3" in resumed.stdout and "from the cache" in resumed.stdout
    assert [m["loss"] for m in last_log(tmp_path)] == [m["loss"] for m in log]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "r").state_dict()
    assert all(torch.equal(merged[k], again[k]) for k in merged)
