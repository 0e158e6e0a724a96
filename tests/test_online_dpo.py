"""online_dpo.py: pair selection and the pairs by hand, one iteration against DPO written out here with
dpo_baseline.py's loss, the reference across an iteration boundary, reset prompts, learning, kill and resume
(torchrun: tests/test_distributed.py)."""

import itertools
import json
import math
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
from transformers import AutoModelForCausalLM, GPT2Config

import dpo_baseline
import online_dpo
import tiny_world

GOLD = f"{ROOT}/tiny_world.py:gold_reward"
# the tiny world's recipe for online DPO: 16 prompts an iteration, 2 responses each, steps of 8 pairs in micro-batches of 4
SMALL_ONLINE = [
    *("--response-length", 8, "--prompts-per-iteration", 16, "--batch-size", 8, "--local-rollout-forward-batch-size", 8),
    *("--local-micro-batch-size", 4, "--lr", 1e-3, "--temperature", 1.0, "--print-sample-every", 0, "--save-every", 0),
]


def test_pair_selection_on_fixed_scores():
    """first_two: responses 0 and 1; max_min: the first best against the first worst; max_random: the best against
    response 0 (1 when the best is 0). Equal scores: the pair is dropped, never ordered by index."""
    scores = torch.tensor([[1.0, 2.0, 0.0, 2.0], [3.0, 3.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5], [5.0, 1.0, 1.0, 4.0]])
    expected = {  # (chosen, rejected, kept) for the four prompts
        "first_two": ([1, 1, 1, 0], [0, 0, 0, 1], [True, False, False, True]),
        "max_min": ([1, 0, 0, 0], [2, 3, 0, 1], [True, True, False, True]),
        "max_random": ([1, 1, 1, 0], [0, 0, 0, 1], [True, False, False, True]),
    }
    for mode, (chosen, rejected, kept) in expected.items():
        c, r, k = online_dpo.select_pairs(scores, mode)
        assert k.tolist() == kept, mode
        assert c[k].tolist() == [x for x, keep in zip(chosen, kept) if keep], mode
        assert r[k].tolist() == [x for x, keep in zip(rejected, kept) if keep], mode
    # a kept pair's chosen response always scores higher than its rejected one
    scores = torch.randn(200, 4).round(decimals=1)
    for mode in expected:
        c, r, k = online_dpo.select_pairs(scores, mode)
        rows = torch.arange(200)
        assert (scores[rows[k], c[k]] > scores[rows[k], r[k]]).all() and (k == (scores[rows, c] != scores[rows, r])).all()


def test_max_random_never_pairs_the_best_with_a_tie():
    """max_random (RLHFlow's code) pairs the first best with response 0, or 1: with tied scores never a tie of the best,
    so on all 16 outcomes of K 4 binary rewards it keeps 11 prompts (69%, README), where a uniformly random other of
    the three keeps 58% on average; the all-equal outcomes (0000, 1111) are dropped either way."""
    scores = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)))
    _, _, kept = online_dpo.select_pairs(scores, "max_random")
    assert kept.sum().item() == 11 and not kept[0] and not kept[-1]
    uniform = [(row != row.max()).sum().item() / 3 for row in scores]  # a uniformly random other is strictly worse
    assert sum(uniform) / 16 == pytest.approx(7 / 12)


def test_a_pair_keeps_the_reset_prefix_in_its_state():
    """Two prompts, K 2, the second reset with h 2: the pair's state is the prompt and the prefix, its responses what
    the policy wrote after it, up to and including the EOS (9); the tie of the first prompt is dropped."""
    states = [[5, 6], [5, 7, 20, 21]]  # prompt 1 is [5, 7], its reset prefix [20, 21]
    responses = torch.tensor([[30, 31, 9, 0, 0], [32, 9, 0, 0, 0], [20, 21, 33, 34, 9], [20, 21, 35, 9, 0]])
    ends = [2, 1, 4, 3]  # the EOS's position in each response
    chosen, rejected, kept = torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([False, True])
    pairs = online_dpo.labelled_pairs(states, responses, [0, 2], ends, chosen, rejected, kept, 2)
    assert pairs == [([5, 7, 20, 21], [35, 9], [33, 34, 9])]
    # DPO's log-probs of that pair cover the written tokens alone: the same as with the prefix in a longer prompt
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    with torch.no_grad():
        c, r = online_dpo.sequence_logprobs(model, pairs, 0, "cpu")
        logits = model(torch.tensor([[5, 7, 20, 21, 35, 9]])).logits.log_softmax(-1)[0]
    assert c.item() == pytest.approx((logits[3, 35] + logits[4, 9]).item(), abs=1e-5)


@pytest.mark.parametrize("script", [online_dpo, dpo_baseline])
def test_all_logprobs_leaves_the_model_in_the_mode_it_found(script):
    """all_logprobs evaluates in eval mode; online DPO calls it on the frozen reference too, which must stay in eval
    mode after (it had been switched to train mode for the rest of the run: dropout, where a layer has it, came on)."""
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    args, pairs = online_dpo.Args(local_micro_batch_size=2), [([5, 7], [35, 9], [33, 34, 9])] * 3
    for training in (False, True):
        c, _ = script.all_logprobs(model.train(training), pairs, args, 0, "cpu", torch.autocast("cpu", enabled=False))
        assert model.training == training and c.shape == (3,)


def online_flags(world, sft_model, *extra):
    return ["--sft-model-path", sft_model, "--reward-fn", GOLD, "--dataset-name", world / "tldr_sft", *SMALL_ONLINE, *extra]


def test_one_iteration_is_dpo_on_the_pairs_written_out_here(world, sft_model, tmp_path):
    """One iteration of online_dpo.py (OAIF: K 2, first_two, the SFT model as reference) against DPO computed here with
    dpo_baseline.py's log-probs and loss on the pairs built here from the same samples (the script's seeding redone):
    16 prompts, 2 responses each at temperature 1, scored by the gold rule (-1 without an EOS), a tie dropped, the
    better response chosen; then 2 epochs of minibatches of 8 pairs (the last one shorter), micro-batches of 4, each
    pair weighing 1 / its minibatch, gradient clipped at 1, AdamW. The final weights and the logged loss agree."""
    beta, lr = 0.5, 1e-3
    flags = online_flags(world, sft_model, "--total-episodes", 32, "--beta", beta, "--lr", lr, "--num-epochs", 2)
    proc = run_script("online_dpo.py", *flags, "--output-dir", tmp_path / "out", cwd=tmp_path)
    log = [json.loads(line) for line in open(metrics_file(proc.stdout, tmp_path))]
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()

    args = online_dpo.Args(task="tldr", dataset_name=str(world / "tldr_sft"), response_length=8)
    tokenizer = online_dpo.load_tokenizer(str(sft_model))
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    queries, _ = online_dpo.build_episodes(args, tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(sft_model, dtype=torch.float32)
    policy.generation_config.eos_token_id = policy.generation_config.bos_token_id = None
    non_tokens = [pad] + list(range(len(tokenizer), policy.get_input_embeddings().num_embeddings))
    batch = online_dpo.batch_indices(1, 16, len(queries), seed=1)
    prompts = online_dpo.left_pad([queries[i] for i in batch for _ in (0, 1)], pad)  # prompt p's responses: rows 2p, 2p+1
    chunks, sampling = [], dict(do_sample=True, temperature=1.0 + 1e-7, top_k=0, top_p=1.0, suppress_tokens=non_tokens)
    with torch.no_grad():
        for i in (0, 16):  # the script's rollout: chunks of 8 prompts (16 responses), each seeded by its place
            torch.manual_seed(int(np.random.default_rng([1, 1, i]).integers(2**62)))
            chunk = prompts[i : i + 16]
            mask = (chunk != pad).long()
            chunks.append(
                policy.generate(chunk, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=pad, **sampling)
            )
    responses = torch.cat(chunks)[:, prompts.shape[1] :]
    ends = [(r == eos).nonzero()[0, 0].item() if (r == eos).any() else 7 for r in responses]
    texts = [tokenizer.decode(r[: e + 1], skip_special_tokens=True) for r, e in zip(responses, ends)]
    gold = tiny_world.gold_reward(tokenizer.batch_decode(prompts, skip_special_tokens=True), texts)
    scores = [g if (r == eos).any() else -1.0 for g, r in zip(gold, responses)]
    pairs = []
    for p in range(16):
        a, b = 2 * p, 2 * p + 1
        if scores[a] != scores[b]:
            win, lose = (a, b) if scores[a] > scores[b] else (b, a)
            pairs.append(
                (queries[batch[p]], responses[win, : ends[win] + 1].tolist(), responses[lose, : ends[lose] + 1].tolist())
            )
    n = len(pairs)
    assert 9 <= n < 16 and log[0]["online/pairs"] == n and log[0]["online/ties_dropped"] == 16 - n  # some ties, > 1 step
    with torch.no_grad():
        ref_c, ref_r = dpo_baseline.sequence_logprobs(policy, pairs, pad, "cpu")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, eps=1e-5)
    losses = []
    for epoch in range(2):
        order = np.random.default_rng([1, 1, epoch]).permutation(n)
        for start in range(0, n, 8):
            minibatch = order[start : start + 8]
            for micro in range(0, len(minibatch), 4):
                rows = minibatch[micro : micro + 4]
                c, r = dpo_baseline.sequence_logprobs(policy, [pairs[i] for i in rows], pad, "cpu")
                loss = dpo_baseline.dpo_loss(c, r, ref_c[rows], ref_r[rows], beta)[0]
                (loss * len(rows) / len(minibatch)).backward()
                losses += [loss.item()] * len(rows)
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    theirs = policy.state_dict()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    moved = max(
        (theirs[k] - AutoModelForCausalLM.from_pretrained(sft_model).state_dict()[k]).abs().max().item() for k in theirs
    )
    assert worst < 1e-5 and moved > 1e-4, (worst, moved)
    assert log[0]["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-6)
    assert log[0]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is its own reference at first


def test_the_reference_initial_or_previous_across_an_iteration_boundary(world, sft_model, tmp_path):
    """Two iterations each. The first is the same with either reference (the policy is the SFT model then): the same
    samples, pairs and statistics. At the second, `previous` makes the policy its own reference again, so the first
    minibatch's loss is log 2 (every margin 0); `initial` keeps the SFT model, and the trained policy's margins are not."""
    logs = {}
    for reference in ("initial", "previous"):
        flags = online_flags(world, sft_model, "--total-episodes", 64, "--reference", reference)
        proc = run_script("online_dpo.py", *flags, "--output-dir", tmp_path / reference, cwd=tmp_path)
        logs[reference] = [json.loads(line) for line in open(metrics_file(proc.stdout, tmp_path))]
    initial, previous = logs["initial"], logs["previous"]
    assert len(initial) == len(previous) == 2 and untimed(initial[:1]) == untimed(previous[:1])
    assert initial[0]["first_loss"] == pytest.approx(math.log(2), abs=1e-6) and initial[0]["rewards/margins"] != 0
    assert previous[1]["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(initial[1]["first_loss"] - math.log(2)) > 1e-3, initial[1]["first_loss"]
    # the second iteration's samples are the same (the same policy wrote them): only the reference differs
    assert initial[1]["objective/scores"] == previous[1]["objective/scores"]
    assert initial[1]["objective/kl"] == pytest.approx(previous[1]["objective/kl"]) and initial[1]["objective/kl"] != 0


def test_the_k_responses_of_a_reset_prompt_share_its_state(world, sft_model, tmp_path):
    """--reset-prob 1, K 3, max_min, on the comparisons: the 3 responses of every prompt are generated from one state,
    the prompt and the first h tokens of its chosen summary (recorded at each generate call, from outside the script),
    and start with that prefix (as text, as the labeller received them). The recorder scores every response 0: every
    pair is a tie and dropped (counted), and the iteration runs no step."""
    (tmp_path / "recorder.py").write_text(RECORDER)
    flags = [*SMALL_ONLINE, "--sft-model-path", sft_model, "--dataset-name", world / "tldr_comparisons", "--reset-prob", 1.0]
    flags += ["--reset-source", "chosen", "--num-generations", 3, "--pair-selection", "max_min", "--total-episodes", 48]
    flags += ["--reward-fn", f"{tmp_path}/recorder.py:record"]
    env = {"RECORD_FILE": str(tmp_path / "r.jsonl"), "RECORD_FN": "generate_responses", "RECORD_TO": str(tmp_path / "g.jsonl")}
    script = ("tests/record_calls.py", f"{ROOT}/online_dpo.py")
    proc = run_script(*script, *flags, "--output-dir", tmp_path / "out", cwd=tmp_path, env=env)
    log = [json.loads(line) for line in open(metrics_file(proc.stdout, tmp_path))]
    assert len(log) == 1 and log[0]["reset/fraction"] == 1.0 and log[0]["reset/mean_h"] >= 1
    assert log[0]["online/pairs"] == 0 and log[0]["online/ties_dropped"] == 16 and "loss" not in log[0]
    tokenizer, chosen = online_dpo.load_tokenizer(str(sft_model)), {}
    for line in open(world / "tldr_comparisons" / "train.jsonl"):
        row = json.loads(line)
        info = row["info"]
        prompt = f"SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}\n\nPOST: {info['post']}\n\nTL;DR:"
        chosen[prompt] = online_dpo.response_ids(tokenizer, row["summaries"][row["choice"]]["text"])
    records = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert len(records) == 3 * 16
    for p in range(16):
        group = records[3 * p : 3 * p + 3]
        first = tokenizer.decode(chosen[group[0][0]][:1])  # h >= 1: the chosen summary's first token starts all three
        assert len({prompt for prompt, _ in group}) == 1 and all(r.startswith(first) for _, r in group), group
    states = [row for call in map(json.loads, open(tmp_path / "g.jsonl")) for row in call[0]]
    h = [n for call in map(json.loads, open(tmp_path / "g.jsonl")) for n in call[1]]
    real = [[t for t in row if t != tokenizer.pad_token_id] for row in states]
    assert len(real) == 3 * 16 and len(set(h)) > 2  # many prefix lengths: not one h for all
    for p in range(16):  # rows 3p to 3p + 2: one prompt's K, one state and one h
        assert real[3 * p] == real[3 * p + 1] == real[3 * p + 2] and h[3 * p] == h[3 * p + 1] == h[3 * p + 2] >= 1
        row, n = real[3 * p], h[3 * p]
        assert row[len(row) - n :] == chosen[tokenizer.decode(row[: len(row) - n])][:n]  # the prompt + its chosen[:h]


@pytest.mark.slow
def test_online_dpo_learns_the_gold_rule(world, sft_model, tmp_path):
    """The demo's budget, 1,280 generations at temperature 0.7, beta 0.2: OAIF (K 2, 40 iterations of 16 prompts, one
    step each) and iterative DPO (K 4, the best against the worst, 5 iterations of 64 prompts, 2 epochs of steps of
    16 pairs, the SFT model as the reference). The sampled answers' gold score rises by 0.2, as PPO's and REBEL's
    tests ask; every labelled pair's chosen response scores above its rejected one."""
    common = ["--temperature", 0.7, "--beta", 0.2, "--batch-size", 16, "--total-episodes", 1280]
    variants = {
        "oaif": [*common, "--prompts-per-iteration", 16, "--local-rollout-forward-batch-size", 16],
        "iterative": [*common, "--num-generations", 4, "--pair-selection", "max_min", "--prompts-per-iteration", 64]
        + ["--local-rollout-forward-batch-size", 32, "--num-epochs", 2, "--reference", "initial"],
    }
    before = sum(policy_gold(sft_model, world, 96, do_sample=True, temperature=0.7, top_k=0)[0]) / 96
    for name, extra in variants.items():
        proc = run_script(
            "online_dpo.py", *online_flags(world, sft_model, *extra), "--output-dir", tmp_path / name, cwd=tmp_path
        )
        log = [json.loads(line) for line in open(metrics_file(proc.stdout, tmp_path))]
        assert log[-1]["episodes"] == 1280 and all(m["online/score_gap"] > 0 for m in log if m["online/pairs"])
        after = sum(policy_gold(tmp_path / name, world, 96, do_sample=True, temperature=0.7, top_k=0)[0]) / 96
        assert after > before + 0.2, (name, before, after)


@pytest.mark.slow
def test_killed_anywhere_the_run_resumes_to_the_straight_run(world, sft_model, tmp_path):
    """Fault injection: SIGKILL twice (once while a checkpoint is being written), resume with --resume-from auto; the
    final model, the last checkpoint and the log equal a straight run's, bit for bit. With --reset-prob 0.5: the reset
    generator's state is in the checkpoint."""
    flags = [*SMALL_ONLINE, "--sft-model-path", sft_model, "--reward-fn", GOLD, "--dataset-name", world / "tldr_comparisons"]
    flags += ["--reset-source", "chosen", "--reset-prob", 0.5, "--total-episodes", 7 * 32, "--output-dir", "out"]
    flags += ["--save-every", 2, "--keep-checkpoints", 1]
    for d in ("straight", "killed"):
        os.makedirs(tmp_path / d)
    run_script("online_dpo.py", *flags, cwd=tmp_path / "straight")
    kills = kill_and_resume("online_dpo.py", flags, tmp_path / "killed", seed=1, updates=7, save_every=2, kills=2)
    assert sum(k["during_save"] for k in kills) >= 1 and all(k["lost"] <= 2 for k in kills), kills
    a_run, b_run = (newest_run(tmp_path / d) for d in ("straight", "killed"))
    a_log, b_log = ([json.loads(x) for x in open(f"{r}/metrics.jsonl")] for r in (a_run, b_run))
    assert [m["update"] for m in b_log] == list(range(1, 8)) and untimed(a_log) == untimed(b_log)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "out").state_dict() for d in ("straight", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert_same_checkpoint(a_run, b_run, "update_0000006.pt")  # --keep-checkpoints 1
