"""hypo.py: the online KL's RLOO estimate by hand and its gradient against the estimator computed sample by sample,
the samples' log-probs, --kl-weight 0 against dpo_baseline.py, the online KL logged from 0, kill and resume (torchrun:
tests/test_distributed.py). HyPO's KL against DPO's is measured by benchmarks/paper_table.py, not here."""

import json
import math
import os

import pytest
import torch
from conftest import ROOT, kill_and_resume, metrics_file, newest_run, run_script, untimed
from transformers import AutoModelForCausalLM, GPT2Config

import hypo

# the tiny world's DPO recipe (tests/test_dpo.py), on 320 pairs: 10 steps of 32 pairs in micro-batches of 16
FLAGS = [
    *("--lr", "1e-3", "--beta", "0.1", "--batch-size", "32", "--local-micro-batch-size", "16", "--eval-every", "20"),
    *("--max-grad-norm", "1", "--max-train-samples", "320", "--max-eval-samples", "32", "--response-length", "8"),
]


def test_rloo_kl_loss_by_hand():
    """2 prompts, k 3: kl = logp - ref_logp per sample; the advantage is kl minus the mean of the prompt's other two;
    the loss mean(advantage * logp) and its gradient advantage / (n k) with respect to each logp."""
    logp = torch.tensor([-2.0, -3.0, -1.0, -4.0, -4.0, -1.0], requires_grad=True)
    ref = torch.tensor([-2.5, -2.0, -2.0, -5.0, -3.0, -1.0])
    loss, kl = hypo.rloo_kl_loss(logp, ref, 3)
    assert kl.tolist() == [[0.5, -1.0, 1.0], [1.0, -1.0, 0.0]]
    advantage = [0.5 - 0.0, -1.0 - 0.75, 1.0 + 0.25, 1.0 + 0.5, -1.0 - 0.5, 0.0 - 0.0]
    assert loss.item() == pytest.approx(sum(a * v for a, v in zip(advantage, logp.tolist())) / 6, abs=1e-6)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([a / 6 for a in advantage], abs=1e-7)
    # k 2: each sample's baseline is the other's kl, so the two advantages are opposite
    _, kl = hypo.rloo_kl_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), 2)
    assert kl.tolist() == [[0.5, -1.0]]


def test_the_online_term_is_the_rloo_estimator_of_the_kl_gradient():
    """On fixed samples of a tiny model: the gradient of rloo_kl_loss on sample_logprobs equals the RLOO estimator
    computed sample by sample, (1 / nk) sum_i (kl_i - mean_{j != i} kl_j) grad log pi(y_i), each sample in its own
    unpadded forward pass; and sample_logprobs equals a full-logits log-prob of the response tokens, of the distribution
    the samples come from (the non-tokens at probability 0)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    policy, ref = AutoModelForCausalLM.from_config(config).eval(), AutoModelForCausalLM.from_config(config).eval()
    samples = [([5, 6, 7], [8, 9, 3]), ([5, 6, 7], [10, 3]), ([5, 6, 7], [11, 12, 13, 3]), ([20, 21], [22, 3])]
    samples += [([20, 21], [23, 24, 3]), ([20, 21], [25, 26, 27, 28])]  # 2 prompts, k 3 (the last has no EOS)
    non_tokens = torch.tensor([0, 38, 39])  # the pad (0, also padding the short rows) and two rows past a vocabulary
    logp = hypo.sample_logprobs(policy, samples, 0, "cpu", non_tokens)
    with torch.no_grad():
        ref_logp = hypo.sample_logprobs(ref, samples, 0, "cpu", non_tokens)
    loss, kl = hypo.rloo_kl_loss(logp, ref_logp, 3)
    loss.backward()
    ours = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    def one(model, q, r, allowed=True):  # a sample's summed log-prob, alone and unpadded, from the full logits
        ids = torch.tensor([q + r])
        logits = model(ids).logits[0, :-1]
        if allowed:  # sampling never writes them
            logits[:, non_tokens] = float("-inf")
        return logits.log_softmax(-1).gather(1, ids[0, 1:, None])[len(q) - 1 :].sum()

    with torch.no_grad():  # this test tells the two apart: the non-tokens' probability is not negligible here
        assert min(abs(one(policy, q, r) - one(policy, q, r, allowed=False)).item() for q, r in samples) > 1e-2

    direct = [torch.zeros_like(p) for p in policy.parameters()]
    kls = []
    for q, r in samples:
        with torch.no_grad():
            kls.append((one(policy, q, r) - one(ref, q, r)).item())
    for i, (q, r) in enumerate(samples):
        others = [kls[j] for j in range(3 * (i // 3), 3 * (i // 3) + 3) if j != i]
        advantage = kls[i] - sum(others) / 2
        grads = torch.autograd.grad(one(policy, q, r), list(policy.parameters()))
        direct = [d + advantage * g / len(samples) for d, g in zip(direct, grads)]
    assert kl.flatten().tolist() == pytest.approx(kls, abs=1e-5)
    for a, b in zip(ours, direct):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_kl_weight_0_is_dpo_baseline(world, sft_model, tmp_path):
    """With --kl-weight 0 no sample is drawn and hypo.py's updates are dpo_baseline.py's: the same log and bit-identical
    final weights."""
    common = ["--sft-model-path", sft_model, "--dataset-name", world / "tldr_comparisons", *FLAGS]
    logs = {}
    for script, extra in (("hypo.py", ["--kl-weight", 0]), ("dpo_baseline.py", [])):
        os.makedirs(tmp_path / script)
        proc = run_script(script, *common, *extra, "--output-dir", tmp_path / script / "out", cwd=tmp_path / script)
        logs[script] = untimed([json.loads(x) for x in open(metrics_file(proc.stdout, tmp_path / script))])
    assert len(logs["hypo.py"]) == 10 and logs["hypo.py"] == logs["dpo_baseline.py"]
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / s / "out").state_dict() for s in ("hypo.py", "dpo_baseline.py"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hypo_logs_the_online_kl_and_it_starts_at_zero(world, sft_model, tmp_path):
    """The first step's samples come from the policy before any update, which is the reference: every sample's kl is 0
    (to float precision), and so are its variance and the online loss; online/response_length is the mean length of
    the update's samples, each cut after its first EOS (the samples recorded from outside the script as they are
    generated); later steps move the policy and the KL away from 0."""
    env = {"RECORD_FN": "truncate_response", "RECORD_TO": str(tmp_path / "calls.jsonl")}
    proc = run_script("tests/record_calls.py", f"{ROOT}/hypo.py", "--sft-model-path", sft_model, "--dataset-name",
                      world / "tldr_comparisons", *FLAGS, "--kl-weight", 0.5, "--num-generations", 3, "--output-dir",
                      tmp_path / "out", cwd=tmp_path, env=env)  # fmt: skip
    log = [json.loads(x) for x in open(metrics_file(proc.stdout, tmp_path))]
    first = log[0]
    assert abs(first["online/kl"]) < 1e-5 and first["online/kl_var"] < 1e-9 and abs(first["online/kl_loss"]) < 1e-5
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    calls = [json.loads(line) for line in open(tmp_path / "calls.jsonl")]  # [responses, eos_id, pad_id] per micro-batch
    assert len(calls) == 2 * len(log) == 20 and all(len(responses) == 16 * 3 for responses, _, _ in calls)
    lengths = [[r.index(eos) + 1 if eos in r else len(r) for r in responses] for responses, eos, _ in calls]
    for m, (a, b) in zip(log, zip(lengths[0::2], lengths[1::2])):
        assert m["online/response_length"] == pytest.approx(sum(a + b) / len(a + b), abs=1e-6)
    assert len({n for rows in lengths for n in rows}) > 1 and abs(log[-1]["online/kl"]) > 1e-3  # lengths vary


@pytest.mark.slow
def test_killed_anywhere_the_run_resumes_to_the_straight_run(world, sft_model, tmp_path):
    """Fault injection: SIGKILL twice (once while a checkpoint is being written), resume with --resume-from auto; the
    log and the final model equal a straight run's, bit for bit (the samples are a function of the seed and the step)."""
    flags = ["--sft-model-path", sft_model, "--dataset-name", world / "tldr_comparisons", *FLAGS, "--kl-weight", 0.5]
    flags += ["--max-train-samples", 224, "--save-every", 2, "--keep-checkpoints", 1, "--output-dir", "out"]
    for d in ("straight", "killed"):
        os.makedirs(tmp_path / d)
    run_script("hypo.py", *flags, cwd=tmp_path / "straight")
    kills = kill_and_resume("hypo.py", flags, tmp_path / "killed", seed=1, updates=7, save_every=2, kills=2)
    assert sum(k["during_save"] for k in kills) >= 1 and all(k["lost"] <= 2 for k in kills), kills
    a_run, b_run = (newest_run(tmp_path / d) for d in ("straight", "killed"))
    a_log, b_log = ([json.loads(x) for x in open(f"{r}/metrics.jsonl")] for r in (a_run, b_run))
    assert [m["update"] for m in b_log] == list(range(1, 8)) and untimed(a_log) == untimed(b_log)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "out").state_dict() for d in ("straight", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
