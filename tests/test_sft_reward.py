"""sft.py and reward_model.py: pure functions against hand-computed values, then end-to-end runs on the tiny world."""

import glob
import json
import math
import shutil

import pytest
import torch
from conftest import RM_FLAGS, ROOT, policy_gold, run_script
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPTNeoXConfig

import ppo_baseline
import reward_model
import tiny_world


def test_bt_loss_hand_computed():
    loss = reward_model.bt_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2  # -log sigmoid(x) = log(1 + e^-x)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_last_token_index():
    P = 1
    ids = torch.tensor([[5, 6, P, P], [P, 5, 6, 7], [5, 6, 7, 8]])
    assert ppo_baseline.last_token_index(ids, P).tolist() == [1, 3, 3]  # where the RL scripts read the reward model


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=1,
        pad_token_id=1,
    )
    return AutoModelForSequenceClassification.from_config(config).eval()


def test_get_reward_matches_transformers_and_ignores_padding_side():
    model = tiny_classifier()
    right = torch.tensor([[5, 6, 7, 0, 1, 1], [8, 9, 10, 11, 12, 0]])
    left = torch.tensor([[1, 1, 5, 6, 7, 0], [8, 9, 10, 11, 12, 0]])
    with torch.no_grad():
        ours = reward_model.get_reward(model, right, 1)
        theirs = model(input_ids=right, attention_mask=(right != 1).long()).logits[:, 0]
        ours_left = reward_model.get_reward(model, left, 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_left, ours, rtol=0, atol=1e-5)  # position ids follow the real tokens


def test_fold_bias_shifts_every_reward_exactly():
    model = tiny_classifier()
    ids = torch.randint(2, 32, (4, 7))
    with torch.no_grad():
        before = reward_model.get_reward(model, ids, 1)
        weights = {k: v.clone() for k, v in model.state_dict().items()}  # as reward_model.py folds the gathered weights
        assert reward_model.fold_bias(weights, model.base_model_prefix, -2.5)
        model.load_state_dict(weights)
        after = reward_model.get_reward(model, ids, 1)
    torch.testing.assert_close(after, before - 2.5, rtol=0, atol=1e-5)


def prompts_of(world, split="validation"):
    rows = [json.loads(line) for line in open(world / "tldr_sft" / f"{split}.jsonl")]
    return [tiny_world_prompt(r) for r in rows], rows


def tiny_world_prompt(r):
    return f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {r['post']}\n\nTL;DR:"


def test_sft_end_to_end(world, sft_model):
    log = [json.loads(line) for line in open(glob.glob(str(world / "runs" / "tldr__sft__*" / "metrics.jsonl"))[0])]
    evals = [m["eval_loss"] for m in log if "eval_loss" in m]
    assert evals[-1] < evals[0] - 0.3 and evals[-1] < 2.2 and all(m["tokens_per_s"] > 0 for m in log)
    assert AutoModelForCausalLM.from_pretrained(sft_model).config.pad_token_id != 0
    # SFT imitates references that are 2/3 on topic (gold 1/3): from ~0 for the random base to clearly positive
    assert sum(policy_gold(world / "base", world, 64, do_sample=False)[0]) / 64 < 0.1
    assert sum(policy_gold(sft_model, world, 64, do_sample=False)[0]) / 64 > 0.2


def test_reward_model_end_to_end(world, reward_run):
    rm_dir, stdout = reward_run
    import sft

    tokenizer = sft.load_tokenizer(str(rm_dir))
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()  # plain transformers, no extra code
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert "eval_accuracy=" in stdout
    # accuracy against the gold rule, on held-out comparisons, read through the standard classification head
    rows = [json.loads(line) for line in open(world / "tldr_comparisons" / "validation.jsonl")]
    prompts = [tiny_world_prompt(r["info"]) for r in rows]
    texts = [[s["text"] for s in r["summaries"]] for r in rows]
    correct = 0
    with torch.no_grad():
        for prompt, (a, b) in zip(prompts, texts):
            batch = [tokenizer.encode(prompt) + sft.response_ids(tokenizer, t) for t in (a, b)]
            ids = torch.tensor([x + [tokenizer.pad_token_id] * (max(map(len, batch)) - len(x)) for x in batch])
            scores = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits[:, 0]
            gold = tiny_world.gold_reward([prompt, prompt], [a, b])
            correct += (scores[0] > scores[1]).item() == (gold[0] > gold[1])
    assert correct / len(rows) > 0.9
    # N+ normalisation: the SFT references of the training split now score 0 on average
    sft_prompts, sft_rows = prompts_of(world, "train")
    sequences = [tokenizer.encode(p) + sft.response_ids(tokenizer, r["summary"]) for p, r in zip(sft_prompts, sft_rows)]
    with torch.no_grad():
        rewards = torch.cat(
            [
                model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits[:, 0]
                for ids in (
                    reward_model.pad_right(sequences[i : i + 256], tokenizer.pad_token_id, "cpu")
                    for i in range(0, len(sequences), 256)
                )
            ]
        )
    assert len(rewards) == 2000 and abs(rewards.mean().item()) < 1e-3 and rewards.std().item() > 1.0


def test_the_tiny_world_is_the_same_everywhere(world, tmp_path):
    """tiny_world.py's default tokenizer is the BPE trained on the world's text, whatever lies beside the checkout (the
    old default took ../shared/tokenizers/pythia when it was there); --tokenizer FOLDER takes a real one."""
    from transformers import AutoTokenizer

    repo, real = tmp_path / "repo", tmp_path / "shared" / "tokenizers" / "pythia"  # a checkout with ../shared beside it
    repo.mkdir()
    shutil.copy(f"{ROOT}/tiny_world.py", repo)
    other = AutoTokenizer.from_pretrained(world / "base")
    other.add_tokens([f"word{i}" for i in range(100)])  # another vocabulary, 100 tokens more
    other.save_pretrained(real)
    flags = ["--n-train", 2000, "--n-eval", 200, "--no-password", "--no-bland"]
    run_script(repo / "tiny_world.py", "--out", tmp_path / "default", *flags, cwd=repo)
    run_script(repo / "tiny_world.py", "--out", tmp_path / "real", "--tokenizer", real, *flags, cwd=repo)
    # the default world is the tests' world (built with --tokenizer bpe), file for file
    for name in ("base/tokenizer.json", "tldr_sft/train.jsonl", "tldr_comparisons/validation.jsonl", "hh/test.jsonl"):
        assert open(tmp_path / "default" / name).read() == open(world / name).read(), name
    n = len(AutoTokenizer.from_pretrained(tmp_path / "default" / "base"))
    assert 400 < n <= 512 and len(AutoTokenizer.from_pretrained(tmp_path / "real" / "base")) == n + 100
    assert json.load(open(tmp_path / "real" / "base" / "config.json"))["vocab_size"] == n + 100
    bad = run_script(repo / "tiny_world.py", "--out", tmp_path / "bad", "--tokenizer", tmp_path / "no", cwd=repo, check=False)
    assert bad.returncode != 0 and "not a folder" in bad.stdout and "Traceback" not in bad.stdout


def test_non_finite_loss_stops_with_a_message(world, sft_model, tmp_path):
    proc = run_script(
        "reward_model.py",
        "--sft-model-path",
        sft_model,
        "--dataset-name",
        world / "tldr_comparisons",
        "--norm-dataset-name",
        world / "tldr_sft",
        "--lr",
        "1e30",
        "--batch-size",
        "8",
        "--local-micro-batch-size",
        "8",
        "--max-train-samples",
        "64",
        "--output-dir",
        tmp_path / "rm",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "non-finite loss" in proc.stdout and "Traceback" not in proc.stdout


def test_hh_sft_and_reward_model(world, sft_model, tmp_path):
    proc = run_script(
        "sft.py",
        "--task",
        "hh",
        "--base-model",
        world / "base",
        "--dataset-name",
        world / "hh",
        "--lr",
        "1e-3",
        "--batch-size",
        "32",
        "--local-micro-batch-size",
        "32",
        "--max-train-samples",
        "640",
        "--eval-every",
        "10",
        "--response-length",
        "16",
        "--output-dir",
        tmp_path / "sft_hh",
        cwd=tmp_path,
    )
    evals = [float(x.split("eval_loss=")[1]) for x in proc.stdout.splitlines() if "eval_loss=" in x]
    assert len(evals) == 2 and evals[1] < evals[0]
    proc = run_script(
        "reward_model.py",
        "--task",
        "hh",
        "--sft-model-path",
        sft_model,
        "--dataset-name",
        world / "hh",
        "--response-length",
        "16",
        "--output-dir",
        tmp_path / "rm_hh",
        *RM_FLAGS,
        cwd=tmp_path,
    )
    final = [x for x in proc.stdout.splitlines() if "eval_accuracy=" in x][-1]
    assert float(final.split("eval_accuracy=")[1].split()[0]) > 0.85
    assert "mean reward of 2000 reference responses" in proc.stdout  # HH normalises on the chosen responses


def test_sft_response_loss_equals_transformers_loss(sft_model):
    import sft

    model = AutoModelForCausalLM.from_pretrained(sft_model).eval()
    examples = [([5, 6, 7], [8, 9, 0]), ([5], [9, 10, 11, 12, 0])]
    input_ids, attention_mask, labels = sft.collate(examples, 1, "cpu")
    with torch.no_grad():
        ours = sft.response_loss(model, input_ids, attention_mask, labels)
        # transformers' loss, one unpadded sequence at a time, averaged over the 8 response tokens
        theirs = (
            sum(
                model(input_ids=torch.tensor([q + r]), labels=torch.tensor([[-100] * len(q) + r])).loss * len(r)
                for q, r in examples
            )
            / 8
        )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # --prompt-loss: every token after each row's first, prompt included (10 of them), as transformers' plain loss
    input_ids, attention_mask, labels = sft.collate(examples, 1, "cpu", prompt_loss=True)
    with torch.no_grad():
        ours = sft.response_loss(model, input_ids, attention_mask, labels)
        theirs = sum(model(input_ids=torch.tensor([q + r]), labels=torch.tensor([q + r])).loss * (len(q + r) - 1)
                     for q, r in examples) / 10  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
