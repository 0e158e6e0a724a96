"""online_dpo.py against TRL's OnlineDPOTrainer (trl.experimental.online_dpo), in one run.

1. The same loss on the same pairs. TRL's trainer takes one training_step on fixed completions (its `_generate` is
   replaced by one that returns them) labelled by a reward function; our online_dpo.py computes its loss on the same
   completions with its own pieces (select_pairs first_two, labelled_pairs, sequence_logprobs, dpo_loss). Rewards are
   distinct, so no tie arises (we drop ties, TRL orders them by index). Also compared: the gradient of the loss.
2. Pairs/s and peak memory at a model shape (default Pythia-160m: hidden 768, 12 layers, the 50k Pythia vocabulary),
   random weights, real TL;DR prompts from ../shared/data: each side in its own process, K 2, batches of --batch
   prompts, --steps optimizer steps, response length 53, fp32 on the CPU; a random reward model of the same shape
   labels both sides. Random weights write no EOS, so the missing-EOS penalty is off on both sides (with it every
   score would be equal and we would drop every pair). TRL runs with its default gradient checkpointing on and off.
   The time is the training loop after start-up; pairs/s counts labelled pairs.
TRL is a benchmark-only dependency: python -m venv --system-site-packages /tmp/trlenv && /tmp/trlenv/bin/pip install trl
Run: /tmp/trlenv/bin/python benchmarks/vs_trl_online_dpo.py              (Pythia-160m shape)
     /tmp/trlenv/bin/python benchmarks/vs_trl_online_dpo.py --hidden 64 --layers 2 --heads 2 --intermediate 256"""

import argparse
import glob
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SHARED", f"{ROOT}/../shared")


def newest(pattern):
    """The newest run's file of a glob over runs/{task}__{exp}__{seed}__{time}/: by its time, a number (a rerun into the
    same folder leaves the older runs there)."""
    return max(glob.glob(pattern), key=lambda f: int(f.rsplit("__", 1)[1].split("/")[0]))


sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prompts_of(work, n, query_length):
    """The first n TL;DR posts whose query re-tokenises to itself: our queries (token ids) and their text (TRL's
    prompts); the rows go to $work/posts.jsonl in the SFT dataset's schema, for online_dpo.py."""
    import online_dpo as o

    tokenizer = o.load_tokenizer(f"{work}/model")
    ids, texts, rows = [], [], []
    for line in open(f"{SHARED}/data/tldr/sft_posts_dev.jsonl"):
        query = o.tldr_query(tokenizer, json.loads(line), query_length)
        text = tokenizer.decode(query[0]) if query else None
        if text is not None and tokenizer(text, add_special_tokens=False).input_ids == query[0]:
            ids.append(query[0])
            texts.append(text)
            rows.append(line)
        if len(ids) == n:
            with open(f"{work}/posts.jsonl", "w") as f:
                f.writelines(rows)
            return tokenizer, ids, texts
    raise SystemExit(f"fewer than {n} posts in {SHARED}/data/tldr/sft_posts_dev.jsonl")


def trainer(work, texts, batch, steps, response_length, checkpointing, beta=0.1):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    import online_dpo as o

    tokenizer = o.load_tokenizer(f"{work}/model")
    model = AutoModelForCausalLM.from_pretrained(f"{work}/model", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(f"{work}/model", dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(f"{work}/rm", dtype=torch.float32)
    config = OnlineDPOConfig(
        output_dir=f"{work}/trl", per_device_train_batch_size=batch, max_steps=steps, beta=beta, report_to="none",
        logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=checkpointing,
        max_new_tokens=response_length, max_length=4096, temperature=0.9, missing_eos_penalty=None, disable_tqdm=True,
    )  # fmt: skip
    return OnlineDPOTrainer(model=model, ref_model=ref, reward_funcs=reward, reward_processing_classes=tokenizer,
        args=config, train_dataset=Dataset.from_list([{"prompt": t} for t in texts]), processing_class=tokenizer)  # fmt: skip


def same_loss(work, n=8, response_length=12, beta=0.1):
    """Part 1: one TRL training_step on fixed completions against our loss on the same pairs; returns the figures."""
    import torch

    import online_dpo as o

    tokenizer, ids, texts = prompts_of(work, n, 128)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    g = torch.Generator().manual_seed(0)
    # 2 completions per prompt, TRL's layout: rows 0..n-1 the first of each prompt, n..2n-1 the second; each ends with
    # an EOS at a random place and is padded after it (TRL's truncate_right), of varying lengths
    completions = torch.randint(2, 50000, (2 * n, response_length), generator=g)
    lengths = torch.randint(2, response_length + 1, (2 * n,), generator=g)
    positions = torch.arange(response_length)
    completions[torch.arange(2 * n), lengths - 1] = eos
    completions = completions.masked_fill(positions >= lengths[:, None], pad)
    completion_mask = (positions < lengths[:, None]).long()
    prompt_ids = o.left_pad(ids, pad)
    rewards = torch.randperm(2 * n, generator=g).float()  # distinct: no tie
    t = trainer(work, texts, n, 1, response_length, checkpointing=False, beta=beta)
    with torch.no_grad():  # the policy moved off the reference, so that the loss is not log 2 whatever the pairs
        for p in t.model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    t._generate = lambda model, prompts, images=None: (  # TRL 1.16: (prompt ids, mask, completion ids, mask, vision)
        prompt_ids.repeat(2, 1),
        (prompt_ids != pad).long().repeat(2, 1),
        completions,
        completion_mask,
        None,
    )
    by_text = {}  # TRL's reward function gets the decoded completions: map each back to its row's reward

    def reward_fn(prompts, completions, completion_ids, **kwargs):
        return [by_text[tuple(c)] for c in completion_ids]

    for row in range(2 * n):
        by_text[tuple(completions[row].tolist())] = rewards[row].item()
    t.reward_funcs, t.reward_processing_classes, t.reward_weights = [reward_fn], [None], None
    t.model.zero_grad()
    trl_loss = t.training_step(t.model, {"prompt": texts}).item()
    trl_grad = torch.cat([p.grad.flatten() for p in t.model.parameters()])
    # ours: K 2, response j of prompt p is row p * 2 + j
    scores = torch.stack([rewards[:n], rewards[n:]], 1)
    chosen, rejected, kept = o.select_pairs(scores, "first_two")
    responses = torch.stack([completions[:n], completions[n:]], 1).flatten(0, 1)
    ends = (lengths.view(2, n).T.flatten() - 1).tolist()
    pairs = o.labelled_pairs(ids, responses, [0] * n, ends, chosen, rejected, kept, 2)
    policy, ref = t.model, t.ref_model
    policy.zero_grad()
    with torch.no_grad():
        ref_c, ref_r = o.sequence_logprobs(ref, pairs, pad, "cpu")
    logp_c, logp_r = o.sequence_logprobs(policy, pairs, pad, "cpu")
    loss = o.dpo_loss(logp_c, logp_r, ref_c, ref_r, beta)[0]
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
    with torch.no_grad():  # the check can fail: the same pairs with their labels swapped give another loss
        swapped = o.dpo_loss(logp_r, logp_c, ref_r, ref_c, beta)[0].item()
    return {
        "pairs": int(kept.sum()),
        "trl_loss": trl_loss,
        "our_loss": loss.item(),
        "loss_abs_diff": abs(trl_loss - loss.item()),
        "grad_rel_diff": ((grad - trl_grad).norm() / trl_grad.norm()).item(),
        "swapped_labels_loss": swapped,
    }


def child_trl(work, n, batch, steps, response_length, checkpointing):
    _, _, texts = prompts_of(work, n, 512)
    t = trainer(work, texts, batch, steps, response_length, checkpointing)
    start = time.time()
    t.train()
    seconds = time.time() - start
    print("RESULT=" + json.dumps({"seconds": seconds, "pairs": batch * steps, "peak_rss_gb": peak_rss_gb()}))


def child_ours(work, n, batch, steps, response_length):
    import atexit
    import runpy

    prompts_of(work, n, 512)
    atexit.register(lambda: print(f"PEAK_RSS_GB={peak_rss_gb():.3f}", flush=True))
    sys.argv = ["online_dpo.py", "--sft-model-path", f"{work}/model", "--reward-model-path", f"{work}/rm"]
    sys.argv += ["--dataset-name", f"{work}/posts.jsonl", "--response-length", str(response_length)]
    sys.argv += ["--batch-size", str(batch), "--local-rollout-forward-batch-size", str(batch)]
    sys.argv += ["--local-micro-batch-size", str(batch), "--total-episodes", str(2 * batch * steps)]
    sys.argv += ["--missing-eos-penalty", "None", "--print-sample-every", "0", "--save-every", "0"]
    sys.argv += ["--output-dir", f"{work}/ours", "--no-cuda"]
    runpy.run_path(f"{ROOT}/online_dpo.py", run_name="__main__")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=8, help="prompts per step (K 2: as many pairs)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--response-length", type=int, default=53)
    parser.add_argument("--sides", default="ours,trl,trl-nockpt")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="vs_trl_odpo_")
    import torch
    import trl
    from transformers import AutoConfig, GPTNeoXForSequenceClassification
    from vs_trl import build_model

    params = build_model(work, args.hidden, args.layers, args.heads, args.intermediate)
    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(f"{work}/model", num_labels=1)
    GPTNeoXForSequenceClassification(config).save_pretrained(f"{work}/rm")
    for name in os.listdir(f"{work}/model"):
        if "token" in name or name == "special_tokens_map.json":
            shutil.copy(f"{work}/model/{name}", f"{work}/rm/{name}")
    print(
        f"torch {torch.__version__}, trl {trl.__version__}, {torch.get_num_threads()} threads; GPT-NeoX hidden {args.hidden}, "
        f"{args.layers} layers, {params / 1e6:.1f}M parameters, vocabulary 50304; fp32, CPU"
    )
    same = same_loss(work)
    print("SAME_LOSS=" + json.dumps(same), flush=True)
    n = args.batch * args.steps
    results = []
    for side in args.sides.split(","):
        common = [work, str(n), str(args.batch), str(args.steps), str(args.response_length)]
        if side == "ours":
            command = [sys.executable, __file__, "--child-ours", *common]
        else:
            command = [sys.executable, __file__, "--child-trl", *common, str(side == "trl")]
        proc = subprocess.run(command, cwd=work, capture_output=True, text=True)
        assert proc.returncode == 0, " ".join(command) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
        if side == "ours":
            logs = [json.loads(x) for x in open(newest(f"{work}/runs/*/metrics.jsonl"))]
            pairs = sum(m["online/pairs"] for m in logs)
            seconds = sum(m["time/rollout"] + m["time/scoring"] + m["time/update"] for m in logs)
            result = {
                "seconds": seconds,
                "pairs": pairs,
                "peak_rss_gb": float(re.search(r"PEAK_RSS_GB=([\d.]+)", proc.stdout)[1]),
            }
        else:
            result = json.loads(re.search(r"RESULT=(.*)", proc.stdout).group(1))
        result.update(side=side, pairs_per_s=result["pairs"] / result["seconds"])
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"\nsame pairs ({same['pairs']}): TRL loss {same['trl_loss']:.7f}, ours {same['our_loss']:.7f}, "
          f"|diff| {same['loss_abs_diff']:.2e} (labels swapped: {same['swapped_labels_loss']:.7f}); gradient relative "
          f"difference {same['grad_rel_diff']:.2e}")  # fmt: skip
    print("\n| side | pairs | s | pairs/s | peak RSS | ours vs this |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['side']} | {r['pairs']} | {r['seconds']:.1f} | {r['pairs_per_s']:.3f} | {r['peak_rss_gb']:.2f} GB | "
              f"{results[0]['pairs_per_s'] / r['pairs_per_s']:.2f}x |")  # fmt: skip
    json.dump({"same_loss": same, "speed": results}, open(f"{work}/results.json", "w"), indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child-ours"]:
        work, n, batch, steps, length = sys.argv[2:7]
        child_ours(work, int(n), int(batch), int(steps), int(length))
    elif sys.argv[1:2] == ["--child-trl"]:
        work, n, batch, steps, length, checkpointing = sys.argv[2:8]
        child_trl(work, int(n), int(batch), int(steps), int(length), checkpointing == "True")
    else:
        main()
