"""A checkpoint's own generation settings (generation_config.json: a repetition penalty, a banned n-gram size, ...)
never reach the sampling: every RL script rolls out, and eval_winrate.py answers, exactly what a model with no such
settings writes, which is the distribution the log-probs compute (tests/test_architectures.py)."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

import drpo_hh
import drpo_tldr
import eval_winrate
import online_dpo
import ppo_baseline
import rebel

SAMPLING = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def opinionated(sft_model, tmp_path_factory):
    """The tiny SFT model, its generation_config.json asking for a strong repetition penalty and no repeated token."""
    folder = tmp_path_factory.mktemp("opinionated") / "sft"
    shutil.copytree(sft_model, folder)
    config = GenerationConfig.from_pretrained(folder)
    config.repetition_penalty, config.no_repeat_ngram_size = 5.0, 1
    config.save_pretrained(folder)
    return folder


def plain_samples(folder, queries, pad, n):
    """What the same weights sample with no generation setting of their own (the EOS trick: no EOS stops them)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config = GenerationConfig()
    torch.manual_seed(0)
    mask = (queries != pad).long()
    return model.generate(queries, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad, **SAMPLING)


@pytest.mark.parametrize("script", [drpo_tldr, drpo_hh, ppo_baseline, rebel, online_dpo], ids=lambda m: m.__name__)
def test_the_rollout_ignores_the_checkpoints_generation_settings(script, opinionated):
    tokenizer = script.load_tokenizer(str(opinionated))
    args = script.Args(sft_model_path=str(opinionated), reward_fn="unused.py:f", frozen_dtype="float32")
    if hasattr(args, "value_model_path"):
        args.value_model_path = str(opinionated)
    policy = script.load_models(args, tokenizer, torch.device("cpu"))[0].eval()
    pad = tokenizer.pad_token_id
    queries = script.left_pad([tokenizer.encode("my cat is"), tokenizer.encode("TITLE: help with my old dog and")] * 4, pad)
    torch.manual_seed(0)
    with torch.no_grad():
        ours = policy.generate(queries, attention_mask=(queries != pad).long(), max_new_tokens=16, min_new_tokens=16,
                               pad_token_id=pad, **SAMPLING)  # fmt: skip
        plain = plain_samples(opinionated, queries, pad, 16)
    assert torch.equal(ours, plain)
    assert (ours[:, queries.shape[1] :, None] == ours[:, None, queries.shape[1] :]).sum() > ours.numel() - queries.numel()
    # the second assertion: some token repeats within a row, which no_repeat_ngram_size 1 would have banned


def test_eval_winrate_answers_ignore_the_checkpoints_generation_settings(opinionated, sft_model):
    examples = [("SUBREDDIT: r/pets\n\nTITLE: my cat\n\nPOST: my cat is sick\n\nTL;DR:", "ref")] * 4
    args = eval_winrate.Args(response_length=16, batch_size=4, dtype="float32")
    torch.manual_seed(0)
    ours, _, _, _ = eval_winrate.generate(str(opinionated), examples, args, torch.device("cpu"))
    torch.manual_seed(0)
    plain, _, _, _ = eval_winrate.generate(str(sft_model), examples, args, torch.device("cpu"))
    assert ours == plain
