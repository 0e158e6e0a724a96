"""rebel.py: REBEL's loss by hand, one update against REBEL written out here, the reset pairs, learning, kill and
resume (torchrun: tests/test_distributed.py)."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import (
    RECORDER,
    ROOT,
    assert_same_checkpoint,
    kill_and_resume,
    metrics_file,
    newest_run,
    policy_gold,
    run_script,
    untimed,
)
from transformers import AutoModelForCausalLM

import rebel
import tiny_world

GOLD = f"{ROOT}/tiny_world.py:gold_reward"
# the tiny world's recipe for REBEL: batches of 16 pairs, two minibatches of two micro-batches of 4 pairs
SMALL_REBEL = [
    *("--response-length", 8, "--batch-size", 16, "--local-rollout-forward-batch-size", 8, "--local-micro-batch-size", 4),
    *("--num-mini-batches", 2, "--lr", 3e-4, "--kl-coef", 0.01, "--temperature", 1.0, "--print-sample-every", 0),
    *("--max-grad-norm", 1.0, "--save-every", 0),
]


def test_rebel_loss_by_hand():
    """Pairs in rows (2i, 2i+1): d = (new - old)[y] - (new - old)[y'], loss = mean((d - eta * (r - r'))^2)."""
    new = torch.tensor([-1.0, -3.0, -2.0, -2.5])
    old = torch.tensor([-1.5, -2.0, -2.0, -3.0])
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.5])
    loss, d = rebel.rebel_loss(new, old, rewards, eta=2.0)
    # pair 0: d = 0.5 - (-1.0) = 1.5, target 2 * 1 = 2 -> (-0.5)^2; pair 1: d = 0 - 0.5 = -0.5, target -2 -> 1.5^2
    assert d.tolist() == [1.5, -0.5] and loss.item() == pytest.approx((0.25 + 2.25) / 2)
    # before the first step the policy is the one that wrote the responses: d = 0 and the loss is mean((eta dr)^2)
    loss, d = rebel.rebel_loss(old, old, rewards, eta=2.0)
    assert d.tolist() == [0.0, 0.0] and loss.item() == pytest.approx((4.0 + 4.0) / 2)
    # the gradient pushes the better response's log-prob up and the other's down, by the same amount
    new = old.clone().requires_grad_(True)
    rebel.rebel_loss(new, old, rewards, eta=2.0)[0].backward()
    assert new.grad.tolist() == [-2.0, 2.0, 2.0, -2.0]  # d loss / d new = 2 (d - eta dr) * (+-1) / n_pairs


def rebel_flags(world, sft_model, *extra):
    return ["--sft-model-path", sft_model, "--reward-fn", GOLD, "--dataset-name", world / "tldr_sft", *SMALL_REBEL, *extra]


def test_one_update_equals_rebel_written_out_here(world, sft_model, tmp_path):
    """One update of rebel.py (--reset-prob 0) against REBEL computed here from the paper's loss on the same samples
    (the script's seeding redone here): the SFT policy's sequence log-probs over each response up to its EOS, at the
    sampling temperature and with the pad token out of the distribution; r = the gold score (-1 without an EOS) minus
    kl_coef * KL (0 at the first update); then for each epoch and minibatch of pairs, one AdamW step on
    mean((d - eta * dr)^2) over the minibatch. The final weights agree to float tolerance."""
    eta, lr = 0.5, 1e-3
    flags = rebel_flags(world, sft_model, "--total-episodes", 32, "--eta", eta, "--lr", lr, "--num-ppo-epochs", 2)
    run_script("rebel.py", *flags, "--output-dir", tmp_path / "out", cwd=tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()

    args = rebel.Args(task="tldr", dataset_name=str(world / "tldr_sft"), response_length=8)
    tokenizer = rebel.load_tokenizer(str(sft_model))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    queries, _ = rebel.build_episodes(args, tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(sft_model, dtype=torch.float32)
    policy.generation_config.eos_token_id = policy.generation_config.bos_token_id = None
    non_tokens = [pad] + list(range(len(tokenizer), policy.get_input_embeddings().num_embeddings))
    batch = rebel.batch_indices(1, 16, len(queries), seed=1)
    prompts = rebel.left_pad([queries[i] for i in batch for _ in (0, 1)], pad)  # pairs in rows (2i, 2i+1)
    chunks, sampling = [], dict(do_sample=True, temperature=1.0 + 1e-7, top_k=0, top_p=1.0, suppress_tokens=non_tokens)
    with torch.no_grad():
        for i in (0, 16):  # the script's rollout: chunks of 8 pairs (16 generations), each seeded by its place in the batch
            torch.manual_seed(int(np.random.default_rng([1, 1, i]).integers(2**62)))
            chunk = prompts[i : i + 16]
            mask = (chunk != pad).long()
            chunks.append(
                policy.generate(chunk, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=pad, **sampling)
            )
    out = torch.cat(chunks)
    responses = out[:, prompts.shape[1] :]
    ends = [(r == eos).nonzero()[0, 0].item() if (r == eos).any() else 7 for r in responses]
    upto = torch.tensor([[t <= e for t in range(8)] for e in ends], dtype=torch.float)  # each response up to its EOS
    texts = [tokenizer.decode(r[: e + 1], skip_special_tokens=True) for r, e in zip(responses, ends)]
    gold = tiny_world.gold_reward(tokenizer.batch_decode(prompts, skip_special_tokens=True), texts)
    rewards = torch.tensor([g if (r == eos).any() else -1.0 for g, r in zip(gold, responses)])

    def sequence_logprobs(model, rows):
        seq, attention = out[rows], (out[rows] != pad)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=seq.masked_fill(~attention, 0), attention_mask=attention, position_ids=positions).logits
        logits = logits[:, prompts.shape[1] - 1 : -1] / (1.0 + 1e-7)
        logits[..., non_tokens] = float("-inf")
        logp = logits.log_softmax(-1).gather(2, responses[rows].unsqueeze(-1)).squeeze(-1)
        return (logp * upto[rows]).sum(1)

    with torch.no_grad():
        old = sequence_logprobs(policy, list(range(32)))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, eps=1e-5)
    right = []  # the last epoch's micro-batches: (pairs whose d has the sign of dr, pairs of unequal rewards)
    for epoch in range(2):
        order = np.random.default_rng([1, 1, epoch]).permutation(16)
        for start in (0, 8):  # two minibatches of 8 pairs, each accumulated from two micro-batches of 4
            for micro in (start, start + 4):
                pairs = order[micro : micro + 4]
                y, y_ = [2 * p for p in pairs], [2 * p + 1 for p in pairs]
                d = (sequence_logprobs(policy, y) - old[y]) - (sequence_logprobs(policy, y_) - old[y_])
                dr = rewards[y] - rewards[y_]
                loss = ((d - eta * dr) ** 2).mean()
                (loss / 2).backward()
                if epoch == 1:
                    right.append((((torch.sign(d) == torch.sign(dr)) & (dr != 0)).sum().item(), (dr != 0).sum().item()))
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    theirs = policy.state_dict()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    moved = max(
        (theirs[k] - AutoModelForCausalLM.from_pretrained(sft_model).state_dict()[k]).abs().max().item() for k in theirs
    )
    assert worst < 1e-5 and moved > 1e-4, (worst, moved)
    # order_right: the share of the last epoch's pairs of unequal rewards, pooled (gold scores tie often: a micro-batch's
    # own share, averaged, would weigh its few pairs as many; this batch tells the two apart)
    (logged,) = [json.loads(line) for line in open(os.path.join(newest_run(tmp_path), "metrics.jsonl"))]
    pooled = sum(a for a, _ in right) / sum(n for _, n in right)
    assert abs(pooled - np.mean([a / max(n, 1) for a, n in right])) > 0.01
    assert logged["rebel/order_right"] == pytest.approx(pooled, abs=1e-12)


def test_the_adaptive_kl_controller_counts_prompts(world, sft_model, tmp_path):
    """--adaptive-kl steps the controller by the update's prompts (pairs), as the authors' code (kl_ctl.update(mean_kl,
    batch_size)), not by its generations: at the first update the KL is 0, so kl_coef * (1 - 0.2 * 16 / horizon). The
    second update's KL penalty is logged with the coefficient its rewards were built with, the one the first update
    logged (the controller steps after the rewards), so that scores + non_score_reward = rlhf_reward."""
    flags = rebel_flags(world, sft_model, "--total-episodes", 64, "--adaptive-kl", "--kl-horizon", 100, "--target-kl", 3)
    run_script("rebel.py", *flags, "--output-dir", tmp_path / "out", cwd=tmp_path)
    logged, second = [json.loads(line) for line in open(os.path.join(newest_run(tmp_path), "metrics.jsonl"))]
    assert logged["objective/kl"] == 0.0
    assert logged["objective/kl_coef"] == pytest.approx(0.01 * (1 - 0.2 * 16 / 100), rel=1e-12)
    assert abs(second["objective/kl"]) > 1e-3 and second["objective/kl_coef"] != logged["objective/kl_coef"]
    penalty = -logged["objective/kl_coef"] * second["objective/kl"]
    assert second["objective/non_score_reward"] == pytest.approx(penalty, rel=1e-5)
    total = second["objective/scores"] + second["objective/non_score_reward"]
    assert total == pytest.approx(second["objective/rlhf_reward"], abs=1e-6)


def test_a_reset_pair_shares_its_state_and_the_first_step_is_exact(world, sft_model, tmp_path):
    """--reset-prob 1 on the comparisons: both responses of every pair are generated from one state, the prompt and
    the first h tokens of its chosen summary (recorded at each generate call, from outside the script), and start with
    that prefix (compared as text, as the reward function received them); the rollout's and the first training pass's
    log-probs agree, so d is 0 at the first micro-batch."""
    (tmp_path / "recorder.py").write_text(RECORDER)
    flags = [*SMALL_REBEL, "--sft-model-path", sft_model, "--dataset-name", world / "tldr_comparisons"]
    flags += [
        "--reset-source",
        "chosen",
        "--reset-prob",
        1.0,
        "--total-episodes",
        64,
        "--reward-fn",
        f"{tmp_path}/recorder.py:record",
    ]
    env = {"RECORD_FILE": str(tmp_path / "r.jsonl"), "RECORD_FN": "generate_responses", "RECORD_TO": str(tmp_path / "g.jsonl")}
    proc = run_script(
        "tests/record_calls.py", f"{ROOT}/rebel.py", *flags, "--output-dir", tmp_path / "out", cwd=tmp_path, env=env
    )
    log = [json.loads(line) for line in open(metrics_file(proc.stdout, tmp_path))]
    assert len(log) == 2 and all(m["reset/fraction"] == 1.0 and m["reset/mean_h"] >= 1 for m in log)
    assert all(m["rebel/first_abs_d"] == 0.0 for m in log)
    tokenizer, chosen = rebel.load_tokenizer(str(sft_model)), {}
    for line in open(world / "tldr_comparisons" / "train.jsonl"):
        row = json.loads(line)
        info = row["info"]
        prompt = f"SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}\n\nPOST: {info['post']}\n\nTL;DR:"
        chosen[prompt] = rebel.response_ids(tokenizer, row["summaries"][row["choice"]]["text"])
    records = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert len(records) == 2 * 32
    for (p1, r1), (p2, r2) in zip(records[0::2], records[1::2]):  # rows 2i and 2i+1: one pair, one prompt
        first = tokenizer.decode(chosen[p1][:1])  # h >= 1: the chosen summary's first token starts both responses
        assert p1 == p2 and r1.startswith(first) and r2.startswith(first), (first, r1, r2)
    calls = [json.loads(line) for line in open(tmp_path / "g.jsonl")]
    assert sum(len(states) for states, *_ in calls) == 2 * 32  # every generation of the two updates
    for states, h, *_ in calls:
        real = [[t for t in row if t != tokenizer.pad_token_id] for row in states]
        assert all(a == b for a, b in zip(real[0::2], real[1::2])) and h[0::2] == h[1::2]  # a pair: one state, one h
        for row, n in zip(real, h):
            prompt = tokenizer.decode(row[: len(row) - n])
            assert n >= 1 and row[len(row) - n :] == chosen[prompt][:n], (prompt, n)  # the prompt + its chosen[:h]
    assert len({n for _, h, *_ in calls for n in h}) > 2  # many prefix lengths: not one h for all


@pytest.mark.slow
def test_rebel_learns_the_gold_rule(world, sft_model, tmp_path):
    """20 updates of 32 pairs on the tiny world's gold rule: the sampled answers' gold score rises, as PPO's test asks.
    eta 2: the gold rule's scores lie in [-1, 1], a scale at which eta 1 moves the log-ratios little in 20 updates
    (+0.19 against +0.31 measured, seed 1)."""
    flags = rebel_flags(world, sft_model, "--batch-size", 32, "--local-rollout-forward-batch-size", 16, "--lr", 1e-3)
    proc = run_script(
        "rebel.py", *flags, "--eta", 2, "--total-episodes", 20 * 64, "--output-dir", tmp_path / "out", cwd=tmp_path
    )
    log = [json.loads(line) for line in open(metrics_file(proc.stdout, tmp_path))]
    assert len(log) == 20 and all(m["rebel/first_abs_d"] < 1e-5 for m in log)
    before, after = (
        sum(policy_gold(m, world, 96, do_sample=True, temperature=0.7, top_k=0)[0]) / 96 for m in (sft_model, tmp_path / "out")
    )
    assert after > before + 0.2, (before, after)
    first, last = (sum(m["objective/scores"] for m in log[i : i + 5]) / 5 for i in (0, 15))
    assert last > first + 0.2, (first, last)


@pytest.mark.slow
def test_killed_anywhere_the_run_resumes_to_the_straight_run(world, sft_model, tmp_path):
    """Fault injection: SIGKILL twice (once while a checkpoint is being written), resume with --resume-from auto; the
    final model, the last checkpoint and the log equal a straight run's, bit for bit. With --reset-prob 0.5: the reset
    generator's state is in the checkpoint."""
    flags = [*SMALL_REBEL, "--sft-model-path", sft_model, "--reward-fn", GOLD, "--dataset-name", world / "tldr_comparisons"]
    flags += ["--reset-source", "chosen", "--reset-prob", 0.5, "--total-episodes", 7 * 32, "--output-dir", "out"]
    flags += ["--save-every", 2, "--keep-checkpoints", 1]
    for d in ("straight", "killed"):
        os.makedirs(tmp_path / d)
    run_script("rebel.py", *flags, cwd=tmp_path / "straight")
    kills = kill_and_resume("rebel.py", flags, tmp_path / "killed", seed=1, updates=7, save_every=2, kills=2)
    assert sum(k["during_save"] for k in kills) >= 1 and all(k["lost"] <= 2 for k in kills), kills
    a_run, b_run = (newest_run(tmp_path / d) for d in ("straight", "killed"))
    a_log, b_log = ([json.loads(x) for x in open(f"{r}/metrics.jsonl")] for r in (a_run, b_run))
    assert [m["update"] for m in b_log] == list(range(1, 8)) and untimed(a_log) == untimed(b_log)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "out").state_dict() for d in ("straight", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_same_checkpoint(a_run, b_run, "update_0000006.pt")  # --keep-checkpoints 1
