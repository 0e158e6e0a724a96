"""ppo_baseline.py: the N+ details against hand-computed values, then short runs on the tiny world."""

import json
import math
import os
import re

import pytest
import torch
from conftest import (
    RECORDER,
    ROOT,
    SHARED,
    SMALL,
    assert_same_checkpoint,
    kill_and_resume,
    metrics_file,
    newest_run,
    policy_gold,
    requires_shared,
    run_script,
    torchrun,
    untimed,
)
from transformers import AutoModelForCausalLM

import ppo_baseline as ppo

PAD, EOS = 1, 0


def test_compute_gae_three_steps_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.7  # last step: the value after the end is 0
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    advantages, returns = ppo.compute_gae(rewards, values, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7]]))


def test_whiten_masked():
    values = torch.tensor([[1.0, 3.0, 5.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the 100 is padding and must not count
    # over the mask: mean 3, unbiased variance (4 + 0 + 4) / 2 = 4, std 2
    torch.testing.assert_close(ppo.whiten(values, mask)[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    # the rewards' whitening (the default --whiten-rewards): scaled to unit variance, the mean kept
    torch.testing.assert_close(
        ppo.whiten(values, mask, shift_mean=False)[0, :3], torch.tensor([2.0, 3.0, 4.0]), atol=1e-6, rtol=0
    )


def test_truncate_response_first_true_and_mask():
    responses = torch.tensor([[5, EOS, 6, EOS], [5, 6, 7, 8], [EOS, 5, 5, 5]])
    out = ppo.truncate_response(responses, EOS, PAD)
    assert out.tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]]
    sequence_lengths = ppo.first_true_indices(out == PAD) - 1
    assert sequence_lengths.tolist() == [1, 3, 0]  # index of the EOS, or the last token when there is none
    mask = torch.arange(4).repeat(3, 1) <= sequence_lengths.unsqueeze(1)
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_reward_index_is_the_eos_after_left_padding():
    query_responses = torch.tensor([[PAD, PAD, 7, 8, 5, EOS, PAD], [9, 7, 8, 8, 5, 6, 4]])
    assert ppo.last_token_index(query_responses, PAD).tolist() == [5, 6]


def test_missing_eos_penalty_checks_the_response_only():
    scores = torch.tensor([2.0, 3.0])
    responses = torch.tensor([[5, EOS, PAD], [5, 6, 7]])  # the second has no EOS (its prompt may have one)
    assert ppo.penalize_missing_eos(scores, responses, EOS, -1.0).tolist() == [2.0, -1.0]
    assert ppo.penalize_missing_eos(scores, responses, EOS, None).tolist() == [2.0, 3.0]


def test_kl_penalty_and_score_placement():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5, -1.0]])  # the padding's log-probs differ: its KL must not count
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # EOS at index 2, then padding
    rewards, kl, non_score = ppo.per_token_rewards(torch.tensor([4.0]), logprobs, ref_logprobs, mask, torch.tensor([2]), 0.1)
    assert kl.tolist() == [[0.5, -1.0, 0.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 4.0, 0.0]]))  # score at the EOS, nothing after


def test_masked_statistics_of_an_empty_mask_are_finite():
    """A batch with no action token (every response cut before its first token) must never produce NaN."""
    values, empty = torch.randn(2, 4), torch.zeros(2, 4)
    assert ppo.masked_mean(values, empty).item() == 0.0 and ppo.masked_var(values, empty).item() == 0.0
    one = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert ppo.masked_var(values, one).item() == 0.0 and torch.isfinite(ppo.whiten(values, one)).all()
    new = torch.randn(2, 4, requires_grad=True)
    pg_loss, vf_loss, stats = ppo.ppo_losses(new, new.detach(), values, new, new.detach(), values, empty, 0.2, 0.2)
    (pg_loss + vf_loss).backward()
    assert pg_loss.item() == 0.0 and vf_loss.item() == 0.0 and torch.isfinite(stats).all() and len(stats) == len(ppo.PPO_STATS)
    assert torch.equal(new.grad, torch.zeros(2, 4))
    # with a non-empty mask nothing changes: the mean over 3 tokens, Bessel's correction
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0] * 4])
    x = torch.tensor([[1.0, 2.0, 6.0, 50.0], [7.0] * 4])
    assert ppo.masked_mean(x, mask).item() == 3.0 and ppo.masked_var(x, mask).item() == 7.0


def raise_pad_logit(model_dir, out_dir, margin: float = 20.0):
    """A copy of a tiny-world policy whose pad logit is the largest everywhere: unit 0 of the final LayerNorm becomes
    a constant 1 and only the pad token's output row reads it, with weight `margin`."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight[0], model.gpt_neox.final_layer_norm.bias[0] = 0.0, 1.0
        model.get_output_embeddings().weight[:, 0] = 0.0
        model.get_output_embeddings().weight[PAD, 0] = margin
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return model


@pytest.mark.parametrize("script", ["ppo_baseline.py", "drpo_tldr.py"])
def test_a_policy_whose_pad_logit_is_largest_never_writes_it(script, world, sft_model, tmp_path):
    """The pad token is read as padding, so a sampled one would end the response unseen and untrained (an absorbing
    action; before the fix such a policy stopped PPO at update 1 with a non-finite loss). It is never sampled and has
    probability 0 in every log-prob: the rollout writes real tokens, the first ratio is 1, and the run goes on."""
    policy = raise_pad_logit(sft_model, tmp_path / "pad_policy").eval()
    batch = ppo.left_pad(
        [
            ppo.tldr_query(ppo.load_tokenizer(str(sft_model)), r, 512)[0]
            for r in map(json.loads, open(world / "tldr_sft" / "validation.jsonl").readlines()[:16])
        ],
        PAD,
    )
    with torch.no_grad():  # the premise: sampled as transformers would by default, it writes pad tokens almost only
        free = policy.generate(
            input_ids=batch,
            attention_mask=(batch != PAD).long(),
            max_new_tokens=8,
            do_sample=True,
            pad_token_id=PAD,
            eos_token_id=None,
        )[:, batch.shape[1] :]
    assert (free == PAD).float().mean() > 0.9
    (tmp_path / "record.py").write_text(RECORDER)
    proc = run_script(
        script,
        "--sft-model-path",
        tmp_path / "pad_policy",
        "--value-model-path",
        tmp_path / "pad_policy",
        "--reward-fn",
        f"{tmp_path}/record.py:record",
        "--dataset-name",
        world / "tldr_sft",
        "--output-dir",
        tmp_path / "out",
        *SMALL,
        "--total-episodes",
        3 * 32,
        *(["--reset-prob", 0.5, "--eval-every", 1, "--eval-prompts", 8] if script == "drpo_tldr.py" else []),
        cwd=tmp_path,
        env={"RECORD_FILE": str(tmp_path / "scored.jsonl")},
    )
    log = [json.loads(x) for x in open(metrics_file(proc.stdout, tmp_path))]
    assert len(log) == 3
    for m in log:
        assert (
            abs(m["policy/first_ratio"] - 1) < 1e-5
            and m["policy/first_approxkl"] < 1e-9
            and math.isfinite(m["objective/entropy"])
        )
        assert m["val/response_length"] > 2  # a pad token would end a response before it (length 0)
    # every scored response (rollout and, for DR-PO, the greedy evaluation) is real text: a pad token decodes to nothing
    scored = [json.loads(x)[1] for x in open(tmp_path / "scored.jsonl")]
    assert len(scored) == 3 * 32 + (3 * 8 if script == "drpo_tldr.py" else 0)
    assert sum(not s.strip() for s in scored) <= 2, scored


def test_adaptive_kl_controller():
    # KL 12 vs target 6: error clipped to +0.2; 512 episodes over a 10000 horizon
    assert ppo.adaptive_kl_coef(0.05, 12.0, 512, 6.0, 10000) == pytest.approx(0.05 * (1 + 0.2 * 512 / 10000))
    assert ppo.adaptive_kl_coef(0.05, 5.4, 512, 6.0, 10000) == pytest.approx(0.05 * (1 - 0.1 * 512 / 10000))


def test_batch_indices_cover_the_data_and_are_pure():
    a = [ppo.batch_indices(u, 4, 10, seed=3) for u in range(1, 6)]
    assert sorted(a[0] + a[1] + a[2][:2]) == list(range(10))  # the first pass is a permutation
    assert a == [ppo.batch_indices(u, 4, 10, seed=3) for u in range(1, 6)]


def test_response_logprobs_match_a_manual_temperature_softmax_without_the_pad_token(sft_model):
    model = AutoModelForCausalLM.from_pretrained(sft_model).eval()
    qr = torch.tensor([[PAD, PAD, 30, 31, 32, 40, 41, 42], [20, 21, 22, 23, 24, 50, 51, 52]])
    responses = qr[:, 5:]
    with torch.no_grad():
        ours = ppo.response_logprobs(model, qr, responses, PAD, 0.7, [PAD])
        # reference: no padding trick needed for the row without padding; the pad token is not an action (probability 0)
        logits = model(input_ids=qr[1:]).logits[0, 4:7] / (0.7 + 1e-7)
        logits[:, PAD] = float("-inf")
        manual = logits.log_softmax(-1).gather(1, responses[1].unsqueeze(1)).squeeze(1)
        # the left-padded row equals the same tokens without padding
        unpadded = ppo.response_logprobs(model, qr[:1, 2:], responses[:1], PAD, 0.7, [PAD])
        # the pad token's own log-prob is -inf, and the other tokens' probabilities sum to 1
        vocab = model.config.vocab_size  # row v asks for the log-prob of token v at each of the 3 response positions
        every_token = ppo.response_logprobs(
            model, qr[1:].repeat(vocab, 1), torch.arange(vocab).unsqueeze(1).repeat(1, 3), PAD, 0.7, [PAD]
        )
    assert torch.isneginf(every_token[PAD]).all()
    torch.testing.assert_close(every_token.exp().sum(0), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1], manual, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[0], unpadded[0], atol=1e-5, rtol=0)


GOLD = f"{ROOT}/tiny_world.py:gold_reward"


def ppo_run(world, sft_model, out, *flags, dataset=None, script="ppo_baseline.py", launch=run_script):
    dataset = dataset or world / "tldr_sft"
    proc = launch(
        script,
        "--sft-model-path",
        sft_model,
        "--reward-model-path",
        world / "rm",
        "--dataset-name",
        dataset,
        "--output-dir",
        out,
        *SMALL,
        *flags,
        cwd=out.parent,
    )
    metrics = [json.loads(line) for line in open(metrics_file(proc.stdout, out.parent))]
    return proc, metrics


@pytest.mark.slow
def test_first_ratio_is_one_and_gold_reward_rises(world, sft_model, reward_run, tmp_path):
    """PPO learns the tiny world's gold rule, run under torchrun on 2 processes (gloo): a 2-process run is a 1-process
    run to float tolerance (tests/test_distributed.py), so this one run shows both that PPO learns and that it learns
    on several processes."""
    # the gold rule scores in [-1, 1]: the value model starts from the SFT model with a fresh head, not from the RM
    proc, metrics = ppo_run(
        world,
        sft_model,
        tmp_path / "ppo",
        "--reward-fn",
        GOLD,
        "--value-model-path",
        sft_model,
        "--lr",
        1e-3,
        "--batch-size",
        64,
        "--local-rollout-forward-batch-size",
        32,
        "--total-episodes",
        20 * 64,
        launch=torchrun,
    )
    assert len(metrics) == 20
    for m in metrics:  # first PPO epoch, first minibatch: the policy has not moved yet (fp32 on CPU)
        assert abs(m["policy/first_ratio"] - 1) < 1e-5 and m["policy/first_approxkl"] < 1e-9
    assert all(m["val/eos_fraction"] > 0.5 for m in metrics) and metrics[-1]["objective/kl"] > 0
    before, after = (
        sum(policy_gold(m, world, 96, do_sample=True, temperature=0.7, top_k=0)[0]) / 96 for m in (sft_model, tmp_path / "ppo")
    )
    assert after > before + 0.2, (before, after)
    first, last = [sum(m["objective/scores"] for m in metrics[i : i + 5]) / 5 for i in (0, 15)]
    assert last > first + 0.25, (first, last)


@pytest.mark.slow
def test_killed_anywhere_the_run_resumes_to_the_straight_run(world, sft_model, reward_run, tmp_path):
    """Fault injection: SIGKILL twice (once while a checkpoint is being written, once at random), resume with
    --resume-from auto each time; the final model, the last checkpoint's optimizer state and the log equal a straight
    run's, bit for bit."""
    flags = [
        "--sft-model-path",
        sft_model,
        "--reward-model-path",
        world / "rm",
        "--dataset-name",
        world / "tldr_sft",
        *SMALL,
        "--total-episodes",
        7 * 32,
        "--save-every",
        2,
        "--keep-checkpoints",
        1,
        "--output-dir",
        "ppo",
    ]
    for d in ("straight", "killed"):
        os.makedirs(tmp_path / d)
    run_script("ppo_baseline.py", *flags, cwd=tmp_path / "straight", env={"OMP_NUM_THREADS": "1"})
    kills = kill_and_resume("ppo_baseline.py", flags, tmp_path / "killed", seed=0, updates=7, save_every=2, kills=2)
    assert sum(k["during_save"] for k in kills) >= 1 and all(k["lost"] <= 2 for k in kills), kills
    print(kills)
    a_run, b_run = (newest_run(tmp_path / d) for d in ("straight", "killed"))
    a_log, b_log = ([json.loads(x) for x in open(f"{r}/metrics.jsonl")] for r in (a_run, b_run))
    assert [m["update"] for m in b_log] == list(range(1, 8)) and untimed(a_log) == untimed(b_log)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "ppo").state_dict() for d in ("straight", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_same_checkpoint(a_run, b_run, "update_0000006.pt")  # --keep-checkpoints 1; kl_coef among the counters


def test_a_damaged_or_foreign_checkpoint_is_refused(world, sft_model, reward_run, tmp_path):
    """A checkpoint of a run with other flags, or an output folder that cannot be written: refused before any model is
    loaded. A truncated weights file: named, and the previous checkpoint is used; resuming needs no flag but those
    that may change. A state.pt that would run code on load is refused (weights_only)."""
    os.makedirs(tmp_path / "a")
    proc, _ = ppo_run(world, sft_model, tmp_path / "a" / "ppo", "--total-episodes", 5 * 32, "--save-every", 2)
    run = os.path.join(tmp_path / "a", "runs", re.search(r"^run (\S+): ", proc.stdout, re.M).group(1))
    proc = run_script("ppo_baseline.py", "--resume-from", run, "--batch-size", 64, check=False, cwd=tmp_path / "a")
    assert proc.returncode != 0 and "the run was started with other flags: --batch-size 64 (saved: 32)" in proc.stdout
    assert "dtypes:" not in proc.stdout  # refused before any model was loaded
    proc = run_script("ppo_baseline.py", "--resume-from", run, "--output-dir", "/proc/no", check=False, cwd=tmp_path / "a")
    assert proc.returncode != 0 and "cannot write to /proc/no" in proc.stdout and "dtypes:" not in proc.stdout

    newest = f"{run}/checkpoints/update_0000004.pt"
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    proc = run_script("ppo_baseline.py", "--resume-from", run, "--total-episodes", 4 * 32, cwd=tmp_path / "a")
    assert f"checkpoint {newest} does not load (RuntimeError" in proc.stdout
    assert "resumed from" in proc.stdout and "at update 3" in proc.stdout
    assert [json.loads(x)["update"] for x in open(f"{run}/metrics.jsonl")] == [1, 2, 3, 4]

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    state = f"{run}/checkpoints/update_0000002.pt"
    torch.save({"config": {}, "x": Exploit()}, state)
    proc = run_script("ppo_baseline.py", "--resume-from", state, check=False, cwd=tmp_path / "a")
    assert proc.returncode != 0 and "UnpicklingError" in proc.stdout and "no checkpoint loads" in proc.stdout
    assert not os.path.exists(tmp_path / "pwned")


def test_the_rollouts_mask_ends_at_the_eos_and_masks_the_log_probs(world, sft_model, reward_run, tmp_path):
    """ppo_baseline.py's mask, built inline in its loop, as per_token_rewards receives it (recorded from outside the
    script): 1 up to and including each response's last real token, 0 after; the log-probs and the reference's are 0
    wherever the mask is, and are not 0 where it is 1. Some responses end early at an EOS, so the test can fail."""
    env = {"RECORD_FN": "per_token_rewards", "RECORD_TO": str(tmp_path / "calls.jsonl")}
    flags = ("--total-episodes", 2 * 32)
    ppo_run(world, sft_model, tmp_path / "out", *flags, launch=lambda *a, **k: run_script("tests/record_calls.py",
            f"{ROOT}/ppo_baseline.py", *a[1:], **k, env=env))  # fmt: skip
    calls = [json.loads(line) for line in open(tmp_path / "calls.jsonl")]
    assert len(calls) == 2
    for scores, logprobs, ref_logprobs, mask, sequence_lengths, kl_coef in calls:
        mask, lengths = torch.tensor(mask), torch.tensor(sequence_lengths)
        assert mask.shape == (32, 8) and kl_coef == 0.01  # SMALL's --kl-coef
        assert torch.equal(mask, (torch.arange(8) <= lengths.unsqueeze(1)).float())
        for values in (torch.tensor(logprobs), torch.tensor(ref_logprobs)):
            assert torch.equal(values == 0, mask == 0)
    assert any(n < 7 for _, _, _, _, lengths, _ in calls for n in lengths)  # an EOS before the last token


@pytest.mark.parametrize("script", ["ppo_baseline.py", "drpo_hh.py"])
def test_the_periodic_evaluation_spreads_its_prompts_over_the_data(script, world, sft_model, reward_run, tmp_path):
    """--eval-prompts 4 of the tiny world's 2,000 prompts: every 500th (0, 500, 1000, 1500), not the first 4 (on HH the
    first thousands are harmless-base's alone). The prompts the evaluation scores are recorded by --reward-fn."""
    (tmp_path / "record.py").write_text(RECORDER)
    dataset = world / ("hh" if script == "drpo_hh.py" else "tldr_sft")
    flags = ("--reward-fn", f"{tmp_path}/record.py:record", "--total-episodes", 32, "--eval-every", 1, "--eval-prompts", 4)
    extra = ("--reset-prob", 0) if script == "drpo_hh.py" else ()
    ppo_run(world, sft_model, tmp_path / "out", *flags, *extra, script=script, dataset=dataset,
            launch=lambda *a, **k: run_script(*a, **k, env={"RECORD_FILE": str(tmp_path / "scored.jsonl")}))  # fmt: skip
    scored = [json.loads(line)[0] for line in open(tmp_path / "scored.jsonl")]
    assert len(scored) == 32 + 4
    module = __import__(script[:-3])
    args = module.Args(dataset_name=str(dataset), sft_model_path=str(sft_model), response_length=8)
    tokenizer = module.load_tokenizer(str(sft_model))
    queries = (
        module.build_queries(args, tokenizer) if script == "ppo_baseline.py" else module.build_episodes(args, tokenizer)[0]
    )
    assert len(queries) == 2000
    assert scored[32:] == [tokenizer.decode(queries[i], skip_special_tokens=True) for i in (0, 500, 1000, 1500)]


# PPO on HH is drpo_hh.py --reset-prob 0 (equal to ppo_baseline.py's loop on HH prompts: test_drpo.py)
def test_hh_runs_on_the_tiny_world(world, sft_model, reward_run, tmp_path):
    flags = ("--reset-prob", 0, "--total-episodes", 2 * 32)
    proc, metrics = ppo_run(world, sft_model, tmp_path / "ppo", *flags, script="drpo_hh.py", dataset=world / "hh")
    assert len(metrics) == 2 and all(abs(m["policy/first_ratio"] - 1) < 1e-5 for m in metrics)
    assert "prompts kept" in proc.stdout


@requires_shared
def test_hh_runs_on_the_real_slice(world, sft_model, reward_run, tmp_path):
    proc, metrics = ppo_run(
        world,
        sft_model,
        tmp_path / "ppo",
        "--total-episodes",
        32,
        "--query-length",
        96,
        "--reset-prob",
        0,
        script="drpo_hh.py",
        dataset=f"{SHARED}/data/hh/harmless_base_test_dev.jsonl",
    )
    import drpo_hh

    tokenizer = drpo_hh.load_tokenizer(str(sft_model))
    rows = [json.loads(line) for line in open(f"{SHARED}/data/hh/harmless_base_test_dev.jsonl")]
    prompts = [drpo_hh.hh_split(r["chosen"], r["rejected"])[0] for r in rows]
    long = sum(len(tokenizer.encode("")) + len(drpo_hh.encode(tokenizer, p, special=False)) > 96 for p in prompts)
    kept = re.search(r"(\d+) prompts kept; \{'rows': 1600, 'query_truncated': (\d+)", proc.stdout)
    assert (int(kept.group(1)), int(kept.group(2))) == (1600, long) and long > 1000  # real prompts: cut to 96 tokens
    assert len(metrics) == 1 and all(math.isfinite(v) for v in metrics[0].values() if isinstance(v, float))
    assert abs(metrics[0]["policy/first_ratio"] - 1) < 1e-5 and metrics[0]["reset/fraction"] == 0


def test_lora_reference_is_the_adapter_off(world, sft_model, reward_run, tmp_path):
    proc, metrics = ppo_run(
        world,
        sft_model,
        tmp_path / "ppo",
        "--use-lora",
        "--lora-r",
        4,
        "--lr",
        3e-3,
        "--gradient-checkpointing",
        "--total-episodes",
        3 * 32,
    )
    assert "trainable params" in proc.stdout and len(metrics) == 3
    assert metrics[0]["objective/kl"] == 0.0 and metrics[-1]["objective/kl"] != 0.0  # the adapter starts as a no-op
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo").state_dict()
    base = AutoModelForCausalLM.from_pretrained(sft_model).state_dict()
    assert set(merged) == set(base) and any(not torch.equal(merged[k], base[k]) for k in base)  # a plain, merged model


def test_lora_on_the_value_model_as_the_authors_checkpoints_and_resumes(world, sft_model, reward_run, tmp_path):
    """The authors' setup: adapters on query_key_value only, on the policy and on the value model (its head frozen).
    Only the adapters are checkpointed, and a resumed run equals a straight one."""
    flags = [
        "--use-lora",
        "--lora-r",
        4,
        "--lora-target-modules",
        "query_key_value",
        "--lora-value",
        "--lr",
        3e-3,
        "--total-episodes",
        3 * 32,
        "--save-every",
        2,
    ]
    os.makedirs(tmp_path / "a")
    proc, straight = ppo_run(world, sft_model, tmp_path / "a" / "ppo", *flags)
    run = os.path.join(tmp_path / "a", "runs", re.search(r"^run (\S+): ", proc.stdout, re.M).group(1))
    checkpoint = f"{run}/checkpoints/update_0000002.pt"
    weights = torch.load(checkpoint, weights_only=True)["model"]  # what training changes: the adapters alone
    policy_lora, value_lora = ({k: v for k, v in weights.items() if k.startswith(m)} for m in ("policy.", "value."))
    assert len(value_lora) == len(policy_lora) == 2 * 2 and len(weights) == 8  # A and B, 2 layers, each model
    assert all("query_key_value.lora_" in k for k in weights)  # nothing else, the value head included
    assert any(v.abs().sum() > 0 for k, v in value_lora.items() if "lora_B" in k)  # the value adapters were trained
    resumed = run_script(
        "ppo_baseline.py", "--output-dir", tmp_path / "b" / "ppo", "--resume-from", checkpoint, cwd=tmp_path / "a"
    )
    assert f"resumed from {checkpoint} at update 3" in resumed.stdout  # a restart from update 1 would log the same
    log = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    assert [m["update"] for m in log] == [1, 2, 3] and untimed(log) == untimed(straight)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "ppo").state_dict() for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_value_all_linear_covers_a_deeper_value_model_and_not_its_head(world, sft_model, reward_run, tmp_path):
    """--use-lora --lora-value at the default `all-linear`, with a value model one layer deeper than the policy: peft's
    get_peft_model writes the policy's own module names into the config it is given, so the value model must get a
    config of its own, or its extra layer gets no adapter. Every linear layer of the value model's decoder gets one, its
    head none (frozen, as the flag says); the checkpoint holds the adapters alone. Under --dtype bfloat16 the value
    model's adapters are fp32, as peft makes the policy's (in bf16, AdamW's small steps were rounded away)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(sft_model, num_labels=1)
    config.num_hidden_layers += 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "deeper_value")
    flags = [
        "--use-lora",
        "--lora-r",
        4,
        "--lora-value",
        "--value-model-path",
        tmp_path / "deeper_value",
        "--dtype",
        "bfloat16",
    ]
    proc, _ = ppo_run(world, sft_model, tmp_path / "ppo", *flags, "--total-episodes", 2 * 32, "--save-every", 1)
    run = os.path.join(tmp_path, "runs", re.search(r"^run (\S+): ", proc.stdout, re.M).group(1))
    weights = torch.load(f"{run}/checkpoints/update_0000001.pt", weights_only=True)["model"]
    value = [k for k in weights if k.startswith("value.")]
    assert all(".lora_" in k for k in weights) and not any("score" in k for k in value)
    layers = {int(re.search(r"\.layers\.(\d+)\.", k).group(1)) for k in value}
    assert layers == set(range(config.num_hidden_layers)) and len(value) == 2 * 4 * config.num_hidden_layers  # A, B
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}  # the backbones are bf16, the adapters not


def test_a_bad_reward_fn_is_named(tmp_path):
    proc = run_script("ppo_baseline.py", "--reward-fn", "nowhere.py:f", "--sft-model-path", "x", check=False, cwd=tmp_path)
    assert proc.returncode != 0 and "--reward-fn nowhere.py:f: no file 'nowhere.py'" in proc.stdout
    proc = run_script("ppo_baseline.py", "--reward-fn", f"{ROOT}/tiny_world.py:nope", check=False, cwd=tmp_path)
    assert "has no function 'nope'" in proc.stdout
