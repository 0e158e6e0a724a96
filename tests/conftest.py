"""Shared fixtures: a tiny world (BPE tokenizer, tiny GPT-NeoX, jsonl data) and the SFT / reward models trained on it."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
sys.path.insert(0, ROOT)  # tests import the scripts' pure functions directly

# small, fast settings for the tiny world; the demo (demo.sh) uses the same ones
SFT_FLAGS = ["--lr", "1e-3", "--num-train-epochs", "6", "--batch-size", "32", "--local-micro-batch-size", "32", "--eval-every", "100"]
RM_FLAGS = ["--lr", "1e-3", "--num-train-epochs", "2", "--batch-size", "32", "--local-micro-batch-size", "32", "--eval-every", "50"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long run (learning runs, the pipeline on every architecture); "
                                       "`pytest -m 'not slow'` skips them for a quick check")


def run_script(script, *flags, cwd=None, env=None, check=True):
    """Runs a top-level script as a user would, returns the completed process (stdout+stderr in .stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, flags)], cwd=cwd or ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc


# a --reward-fn that records every scored (prompt, response) pair to $RECORD_FILE and scores 0
RECORDER = '''import json, os
def record(prompts, responses):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.writelines(json.dumps([p, r]) + "\\n" for p, r in zip(prompts, responses))
    return [0.0] * len(prompts)
'''


def policy_gold(model_dir, data, n, seed=0, **generate_kwargs):
    """A policy's answers (8 tokens, left-padded batch) to the first n held-out TL;DR prompts of a tiny-world data
    folder, and their gold scores: (scores, answers). generate_kwargs: do_sample, temperature, ..."""
    import torch
    from transformers import AutoModelForCausalLM

    import sft
    import tiny_world

    tokenizer = sft.load_tokenizer(str(model_dir))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [json.loads(line) for line in open(data / "tldr_sft" / "validation.jsonl")][:n]
    prompts = [f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {r['post']}\n\nTL;DR:" for r in rows]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    out = model.generate(**batch, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         suppress_tokens=[tokenizer.pad_token_id], **generate_kwargs)  # as the scripts: pad is never written
    answers = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return tiny_world.gold_reward(prompts, answers), answers


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    run_script("tiny_world.py", "--out", out, "--tokenizer", "bpe", "--n-train", 2000, "--n-eval", 200)
    return out


@pytest.fixture(scope="session")
def sft_model(world):
    run_script("sft.py", "--base-model", world / "base", "--dataset-name", world / "tldr_sft", "--output-dir", world / "sft", *SFT_FLAGS, cwd=world)
    return world / "sft"


@pytest.fixture(scope="session")
def bland_sft_model(world):
    """The SFT policy of the DPO task (tiny_world.py's bland/): its greedy answer is the bland one."""
    run_script("sft.py", "--base-model", world / "base", "--dataset-name", world / "bland" / "tldr_sft", "--output-dir",
               world / "bland" / "sft", *SFT_FLAGS, cwd=world)
    return world / "bland" / "sft"


@pytest.fixture(scope="session")
def reward_run(world, sft_model):
    proc = run_script("reward_model.py", "--sft-model-path", sft_model, "--dataset-name", world / "tldr_comparisons",
                      "--norm-dataset-name", world / "tldr_sft", "--output-dir", world / "rm", *RM_FLAGS, cwd=world)
    return world / "rm", proc.stdout


@pytest.fixture
def tokenizer(world):
    import sft

    return sft.load_tokenizer(str(world / "base"))


requires_shared = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "data")), reason="../shared/data is absent")
