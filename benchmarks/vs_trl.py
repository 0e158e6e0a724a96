"""Each offline trainer against its TRL peer, side by side in one run, at a given model shape (default: Pythia-160m,
hidden 768, 12 layers, the real 50k Pythia vocabulary) with random weights (speed and memory depend on the shapes).

- dpo_baseline.py against DPOTrainer, reward_model.py against RewardTrainer, sft.py against SFTTrainer (completion-only
  loss), on the real TL;DR and HH rows of ../shared/data.
- Both sides train on exactly the same rows and tokens: the rows are those that neither side truncates or drops (the
  prompt fits --query-length, each response fits --response-length with its EOS), written to a jsonl in the Hub schema
  for our scripts; RewardTrainer and SFTTrainer get our token ids themselves (pre-tokenised datasets), DPOTrainer the
  same texts, and the benchmark asserts that it tokenised them to the same number of tokens.
- Each side runs in its own process (its peak RSS is its own), fp32 on the CPU, batch --batch, 1 epoch; the time is
  the training loop including the reference pass (DPO), without start-up, tokenisation or evaluation.
- TRL is run twice: with its defaults (gradient checkpointing on, which trades time for memory) and with gradient
  checkpointing off, as our scripts run.
TRL is a benchmark-only dependency: python -m venv --system-site-packages /tmp/trlenv && /tmp/trlenv/bin/pip install trl
Run: /tmp/trlenv/bin/python benchmarks/vs_trl.py                         (Pythia-160m shape)
     /tmp/trlenv/bin/python benchmarks/vs_trl.py --hidden 64 --layers 2 --heads 2 --intermediate 256   (tiny shape)"""

import argparse
import json
import os
import re
import resource
import runpy
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SHARED", f"{ROOT}/../shared")
sys.path.insert(0, ROOT)


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_ours(script, argv):
    """Child process: one of our scripts, as `python script argv`; prints its peak RSS at exit."""
    import atexit

    atexit.register(lambda: print(f"PEAK_RSS_GB={peak_rss_gb():.3f}", flush=True))
    sys.argv = [script] + argv
    runpy.run_path(script, run_name="__main__")


def run_trl(trainer_name, work, batch, max_length, checkpointing):
    """Child process: the TRL trainer on the same rows and tokens; prints its time, rows and tokens as json."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import dpo_baseline

    tokenizer = dpo_baseline.load_tokenizer(f"{work}/model")
    rows = json.load(open(f"{work}/{trainer_name}_rows.json"))
    common = dict(
        output_dir=f"{work}/trl",
        per_device_train_batch_size=batch,
        num_train_epochs=1,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=checkpointing,
        max_length=max_length,
        disable_tqdm=True,
    )
    if trainer_name.startswith("dpo"):
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(f"{work}/model", dtype=torch.float32)
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(beta=0.05, **common),
            train_dataset=Dataset.from_list(rows["texts"]),
            processing_class=tokenizer,
        )
        data = trainer.train_dataset
        tokens = sum(
            2 * len(p) + len(c) + len(r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
        )
    elif trainer_name.startswith("rm"):
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(
            f"{work}/model", num_labels=1, dtype=torch.float32, pad_token_id=tokenizer.pad_token_id
        )
        trainer = RewardTrainer(
            model=model, args=RewardConfig(**common), train_dataset=Dataset.from_list(rows["ids"]), processing_class=tokenizer
        )
        data = trainer.train_dataset
        tokens = sum(len(c) + len(r) for c, r in zip(data["chosen_ids"], data["rejected_ids"]))
    else:
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(f"{work}/model", dtype=torch.float32)
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(completion_only_loss=True, **common),
            train_dataset=Dataset.from_list(rows["ids"]),
            processing_class=tokenizer,
        )
        data = trainer.train_dataset
        tokens = sum(len(ids) for ids in data["input_ids"])
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    print("RESULT=" + json.dumps({"seconds": seconds, "rows": len(data), "tokens": tokens, "peak_rss_gb": peak_rss_gb()}))


def build_model(work, hidden, layers, heads, intermediate):
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(f"{SHARED}/tokenizers/pythia")
    tokenizer.eos_token, tokenizer.pad_token = "<|endoftext|>", "<|padding|>"
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(f"{work}/model")
    tokenizer.save_pretrained(f"{work}/model")
    return sum(p.numel() for p in model.parameters())


def select_rows(work, task, kind, n, query_length, response_length):
    """The first n rows that neither side truncates or drops, as a Hub-schema jsonl for our scripts and the same
    rows as texts and token ids for TRL. Returns our token count."""
    import dpo_baseline as d

    tokenizer = d.load_tokenizer(f"{work}/model")
    if task == "tldr":
        path = f"{SHARED}/data/tldr/{'sft_posts_dev' if kind == 'sft' else 'comparisons_gpt4_dev'}.jsonl"
    else:
        path = f"{SHARED}/data/hh/harmless_base_test_dev.jsonl"
    kept, texts, ids, tokens = [], [], [], 0
    for line in open(path):
        row = json.loads(line)
        if task == "tldr":
            info = row if kind == "sft" else row["info"]
            query = d.tldr_query(tokenizer, info, query_length)
            if query is None or query[1]:
                continue
            prompt_text, query_ids = d.TLDR_FORMAT.format(**{k: info[k] for k in ("subreddit", "title", "post")}), query[0]
            if kind == "sft":
                responses = [row["summary"]]
            else:
                responses = [row["summaries"][row["choice"]]["text"], row["summaries"][1 - row["choice"]]["text"]]
        else:
            split = d.hh_split(row["chosen"], row["rejected"])
            if split is None:
                continue
            prompt_text, responses = split[0], list(split[1:]) if kind != "sft" else [split[1]]
            query_ids, truncated = d.hh_prompt(tokenizer, prompt_text, query_length)
            if truncated:
                continue
        if any(not r.strip() for r in responses) or (len(responses) == 2 and responses[0].strip() == responses[1].strip()):
            continue
        response_ids = [d.response_ids(tokenizer, r) for r in responses]
        if max(len(r) for r in response_ids) > response_length:
            continue
        kept.append(row)
        eos = tokenizer.eos_token
        if kind == "sft":
            texts.append({"prompt": prompt_text, "completion": " " + responses[0].strip()})
            ids.append(
                {
                    "input_ids": query_ids + response_ids[0],
                    "completion_mask": [0] * len(query_ids) + [1] * len(response_ids[0]),
                }
            )
            tokens += len(query_ids) + len(response_ids[0])
        else:
            texts.append(
                {
                    "prompt": prompt_text,
                    "chosen": " " + responses[0].strip() + eos,
                    "rejected": " " + responses[1].strip() + eos,
                }
            )
            ids.append({"chosen_ids": query_ids + response_ids[0], "rejected_ids": query_ids + response_ids[1]})
            tokens += 2 * len(query_ids) + len(response_ids[0]) + len(response_ids[1])
        if len(kept) == n:
            break
    assert len(kept) == n, f"only {len(kept)} usable rows in {path}"
    name = f"{kind}_{task}"
    with open(f"{work}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    json.dump({"texts": texts, "ids": ids}, open(f"{work}/{name}_rows.json", "w"))
    return tokens


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--n", type=int, default=32, help="pairs (DPO, RM) or examples (SFT) per run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", default="dpo:tldr,rm:tldr,sft:tldr,dpo:hh,rm:hh")
    parser.add_argument("--sides", default="ours,trl,trl-nockpt")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="vs_trl_")
    params = build_model(work, args.hidden, args.layers, args.heads, args.intermediate)
    import torch
    import trl

    print(
        f"torch {torch.__version__}, trl {trl.__version__}, {torch.get_num_threads()} threads; GPT-NeoX hidden {args.hidden}, "
        f"{args.layers} layers, {params / 1e6:.1f}M parameters, vocabulary 50304; {args.n} rows, batch {args.batch}, fp32, CPU"
    )
    lengths = {"tldr": (512, 53), "hh": (512, 128)}
    results = []
    for run in args.runs.split(","):
        kind, task = run.split(":")
        query_length, response_length = lengths[task]
        tokens = select_rows(work, task, kind, args.n, query_length, response_length)
        name = f"{kind}_{task}"
        for side in args.sides.split(","):
            if side == "ours":
                script = {"dpo": "dpo_baseline.py", "rm": "reward_model.py", "sft": "sft.py"}[kind]
                flags = [
                    "--task",
                    task,
                    "--dataset-name",
                    f"{work}/{name}.jsonl",
                    "--train-split",
                    "train",
                    "--eval-split",
                    "train[:1]",
                    "--batch-size",
                    str(args.batch),
                    "--local-micro-batch-size",
                    str(args.batch),
                    "--query-length",
                    str(query_length),
                    "--response-length",
                    str(response_length),
                    "--eval-every",
                    "100000",
                    "--save-every",
                    "0",
                    "--output-dir",
                    f"{work}/ours_{name}",
                ]
                flags += ["--base-model" if kind == "sft" else "--sft-model-path", f"{work}/model"]
                if kind == "rm":
                    flags += ["--max-norm-samples", "1", "--norm-dataset-name", f"{SHARED}/data/tldr/sft_posts_dev.jsonl"]
                command = [sys.executable, __file__, "--child-ours", f"{ROOT}/{script}"] + flags
            else:
                command = [
                    sys.executable,
                    __file__,
                    "--child-trl",
                    name,
                    work,
                    str(args.batch),
                    str(query_length + response_length),
                    str(side == "trl"),
                ]
            proc = subprocess.run(command, cwd=work, capture_output=True, text=True)
            assert proc.returncode == 0, " ".join(command) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
            if side == "ours":
                lines = [line for line in proc.stdout.splitlines() if line.startswith("update=")]
                rate_key = "tokens_per_s" if kind == "sft" else "pairs_per_s"
                rate = float(re.search(rf"{rate_key}=([\d.e+]+)", lines[-1]).group(1))
                seconds = (tokens if kind == "sft" else args.n) / rate
                if kind == "dpo":
                    seconds += float(re.search(r"reference log-probs in ([\d.]+)s", proc.stdout).group(1))
                kept = int(re.search(r"(\d+) (?:pairs|examples) kept", proc.stdout).group(1))
                result = {
                    "seconds": seconds,
                    "rows": kept,
                    "tokens": tokens,
                    "peak_rss_gb": float(re.search(r"PEAK_RSS_GB=([\d.]+)", proc.stdout).group(1)),
                }
            else:
                result = json.loads(re.search(r"RESULT=(.*)", proc.stdout).group(1))
            assert result["rows"] == args.n and result["tokens"] == tokens, (name, side, result, tokens)
            result.update(run=name, side=side, rows_per_s=args.n / result["seconds"], tokens_per_s=tokens / result["seconds"])
            results.append(result)
            print(json.dumps(result), flush=True)
    print("\n| trainer | data | side | rows/s | tokens/s | peak RSS | ours vs this |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ours = next(o for o in results if o["run"] == r["run"] and o["side"] == "ours")
        kind, task = r["run"].split("_")
        print(
            f"| {kind} | {task} | {r['side']} | {r['rows_per_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss_gb']:.2f} GB | "
            f"{ours['rows_per_s'] / r['rows_per_s']:.2f}x |"
        )
    json.dump(results, open(f"{work}/results.json", "w"), indent=1)
    print(f"results in {work}/results.json")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-ours":
        run_ours(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--child-trl":
        name, work, batch, max_length, checkpointing = sys.argv[2:7]
        run_trl(name, work, int(batch), int(max_length), checkpointing == "True")
    else:
        main()
