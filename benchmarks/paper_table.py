"""The paper's comparison at CPU scale: SFT, PPO, DR-PO (reset_prob 0.5 and 1.0), REBEL, online DPO and iterative DPO
(each alone and with DR-PO's reset 0.5), DPO and HyPO (kl_weight 0.05 and 0.5) side by side on the tiny world, TL;DR
and HH, over several world seeds, each metric a mean with a 95% interval over seeds.

Per seed: a tiny world (`tiny_world.py --seed s`, BPE tokenizer), one SFT and one reward model per task, then every
arm from that SFT with the demo's flags; the RL and online arms sample the same number of generations (1,280).
Every policy then answers the 200 held-out prompts, sampled (temperature 0.7) and greedy:
- gold win vs reference: the tiny world's gold rule scores the answer above the dataset's reference answer (TL;DR:
  the SFT summary; HH: the chosen response), ties half;
- gold win vs SFT: the same against the SFT policy's answer to the same prompt (sampled against sampled, greedy
  against greedy); SFT's own row is 0.5 by construction;
- gold: the mean gold score in [-1, 1]; RM: the mean score of the seed's reward model (normalised: references ~0);
- KL to SFT: mean over samples of log pi(y|x) - log pi_SFT(y|x) at the sampling temperature (samples only).
Runs two jobs at a time, one thread each. Writes docs/paper_table.png (matplotlib, a benchmark-only dependency),
prints the tables in Markdown (and each arm's difference to PPO, paired by seed) and keeps every seed's figures in
$OUT/results_*.json.
Run: python benchmarks/paper_table.py          (SEEDS=1,2,3,4,5 by default; OUT=/tmp/paper_table)
     REPORT_ONLY=1 python benchmarks/paper_table.py   redraws the tables and the plot from $OUT."""

import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT", "/tmp/paper_table")
# the CPU kernels pinned to AVX2 (ATen and oneDNN as demo.sh; MKL to its AVX2 branch, not demo.sh's COMPATIBLE, as the
# README says): the same numbers on any Intel x86 machine with AVX2 (unpinned, AVX-512 differs)
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
SEEDS = [int(s) for s in os.environ.get("SEEDS", "1,2,3,4,5").split(",")]
ARMS = ["sft", "ppo", "drpo_0.5", "drpo_1.0", "rebel", "rebel_0.5", "odpo", "odpo_0.5", "idpo", "idpo_0.5", "dpo"]
ARMS += ["hypo", "hypo_0.5"]  # HyPO: DPO's flags plus the online KL, kl_weight 0.05 (the default) and 0.5
LABELS = {"sft": "SFT", "ppo": "PPO", "drpo_0.5": "DR-PO reset_prob 0.5", "drpo_1.0": "DR-PO reset_prob 1.0", "dpo": "DPO"}
LABELS |= {"rebel": "REBEL", "rebel_0.5": "REBEL + reset 0.5", "odpo": "online DPO", "odpo_0.5": "online DPO + reset 0.5"}
LABELS |= {"idpo": "iterative DPO", "idpo_0.5": "iterative DPO + reset 0.5"}
LABELS |= {"hypo": "HyPO kl_weight 0.05", "hypo_0.5": "HyPO kl_weight 0.5"}
SFT_FLAGS = [
    "--lr",
    "1e-3",
    "--num-train-epochs",
    "6",
    "--batch-size",
    "32",
    "--local-micro-batch-size",
    "32",
    "--eval-every",
    "100",
]
RM_FLAGS = [
    "--lr",
    "1e-3",
    "--num-train-epochs",
    "2",
    "--batch-size",
    "32",
    "--local-micro-batch-size",
    "32",
    "--eval-every",
    "50",
]
# the demo's RL recipe: equal episodes for every RL arm; the tiny world's high learning rate wants clipping, no whitening
RL_FLAGS = [
    "--response-length",
    "8",
    "--total-episodes",
    "1280",
    "--batch-size",
    "64",
    "--local-rollout-forward-batch-size",
    "64",
    "--local-micro-batch-size",
    "16",
    "--num-mini-batches",
    "2",
    "--lr",
    "1e-3",
    "--kl-coef",
    "0.05",
    "--max-grad-norm",
    "1",
    "--no-whiten-rewards",
    "--print-sample-every",
    "0",
    "--save-every",
    "0",
]
# REBEL at PPO's generations: 1280 generations in batches of 32 pairs (20 updates, as PPO), micro-batches of 8 pairs,
# every generation of an update in one generate call (as PPO's 64 episodes)
REBEL_FLAGS = ["--batch-size", "32", "--local-micro-batch-size", "8", "--local-rollout-forward-batch-size", "32"]
# online DPO at PPO's generations, the demo's recipe (beta 0.2, temperature 0.7): OAIF (K 2, first_two) in 40 iterations
# of 16 prompts, one step each; iterative DPO (K 4, max_min, the SFT model as reference, 2 epochs) in 5 iterations of 64
# prompts, steps of 16 pairs
ONLINE_FLAGS = [*("--response-length", 8, "--total-episodes", 1280, "--temperature", 0.7, "--lr", "1e-3", "--beta", 0.2)]
ONLINE_FLAGS += [*("--local-micro-batch-size", 16, "--max-grad-norm", 1, "--print-sample-every", 0, "--save-every", 0)]
ONLINE = {
    "odpo": ["--prompts-per-iteration", 16, "--batch-size", 16, "--local-rollout-forward-batch-size", 16],
    "idpo": [*("--num-generations", 4, "--pair-selection", "max_min", "--prompts-per-iteration", 64, "--batch-size", 16)]
    + [*("--num-epochs", 2, "--reference", "initial", "--local-rollout-forward-batch-size", 32)],
}
DPO_FLAGS = [
    "--lr",
    "3e-4",
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
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student t, 97.5%


def sh(*cmd, cwd):
    cmd = [str(c) for c in cmd]
    if "--output-dir" in cmd and os.path.exists(f"{cmd[cmd.index('--output-dir') + 1]}/config.json"):
        return  # trained in an earlier run into the same $OUT: a new arm trains only itself
    with open(os.path.join(cwd, "log.txt"), "a") as log:
        subprocess.run(
            cmd,
            check=True,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **PINNED},
        )


def chain(task, seed):
    """One task and seed: SFT, reward model, the four trained arms, then the evaluation (each a script run)."""
    w, d = f"{OUT}/world_{seed}", f"{OUT}/{task}_{seed}"
    os.makedirs(d, exist_ok=True)
    py, s = sys.executable, ["--seed", seed]
    if task == "tldr":
        sh(
            py,
            f"{ROOT}/sft.py",
            "--base-model",
            f"{w}/base",
            "--dataset-name",
            f"{w}/tldr_sft",
            "--output-dir",
            f"{d}/sft",
            *SFT_FLAGS,
            *s,
            cwd=d,
        )
        sh(
            py,
            f"{ROOT}/reward_model.py",
            "--sft-model-path",
            f"{d}/sft",
            "--dataset-name",
            f"{w}/tldr_comparisons",
            "--norm-dataset-name",
            f"{w}/tldr_sft",
            "--output-dir",
            f"{d}/rm",
            *RM_FLAGS,
            *s,
            cwd=d,
        )
        rl = ["--sft-model-path", f"{d}/sft", "--reward-model-path", f"{d}/rm", *RL_FLAGS, *s]
        sh(py, f"{ROOT}/ppo_baseline.py", *rl, "--dataset-name", f"{w}/tldr_sft", "--output-dir", f"{d}/ppo", cwd=d)
        for p in ("0.5", "1.0"):
            sh(
                py,
                f"{ROOT}/drpo_tldr.py",
                *rl,
                "--reset-prob",
                p,
                "--reset-source",
                "chosen",
                "--dataset-name",
                f"{w}/tldr_comparisons",
                "--output-dir",
                f"{d}/drpo_{p}",
                cwd=d,
            )
        for p, arm in (("0", "rebel"), ("0.5", "rebel_0.5")):
            reset = ["--reset-prob", p, "--reset-source", "chosen", "--dataset-name", f"{w}/tldr_comparisons"]
            sh(py, f"{ROOT}/rebel.py", *rl, *REBEL_FLAGS, *reset, "--output-dir", f"{d}/{arm}", cwd=d)
        for mode, p in (("odpo", "0"), ("odpo", "0.5"), ("idpo", "0"), ("idpo", "0.5")):
            reset = ["--reset-prob", p, "--reset-source", "chosen", "--dataset-name", f"{w}/tldr_comparisons"]
            models = ["--sft-model-path", f"{d}/sft", "--reward-model-path", f"{d}/rm", *s]
            arm = mode if p == "0" else f"{mode}_{p}"
            sh(py, f"{ROOT}/online_dpo.py", *models, *ONLINE_FLAGS, *ONLINE[mode], *reset, "--output-dir", f"{d}/{arm}", cwd=d)
        sh(
            py,
            f"{ROOT}/dpo_baseline.py",
            "--sft-model-path",
            f"{d}/sft",
            "--dataset-name",
            f"{w}/tldr_comparisons",
            "--output-dir",
            f"{d}/dpo",
            *DPO_FLAGS,
            *s,
            cwd=d,
        )
        for arm, weight in (("hypo", "0.05"), ("hypo_0.5", "0.5")):
            hypo = ["--sft-model-path", f"{d}/sft", "--dataset-name", f"{w}/tldr_comparisons", "--kl-weight", weight]
            sh(py, f"{ROOT}/hypo.py", *hypo, "--output-dir", f"{d}/{arm}", *DPO_FLAGS, *s, cwd=d)
    else:
        hh = ["--task", "hh", "--dataset-name", f"{w}/hh"]
        sh(
            py,
            f"{ROOT}/sft.py",
            *hh,
            "--base-model",
            f"{w}/base",
            "--response-length",
            "16",
            "--output-dir",
            f"{d}/sft",
            *SFT_FLAGS,
            *s,
            cwd=d,
        )
        sh(
            py,
            f"{ROOT}/reward_model.py",
            *hh,
            "--sft-model-path",
            f"{d}/sft",
            "--response-length",
            "16",
            "--output-dir",
            f"{d}/rm",
            *RM_FLAGS,
            *s,
            cwd=d,
        )
        rl = ["--sft-model-path", f"{d}/sft", "--reward-model-path", f"{d}/rm", "--dataset-name", f"{w}/hh", *RL_FLAGS, *s]
        sh(py, f"{ROOT}/drpo_hh.py", *rl, "--reset-prob", "0", "--exp-name", "ppo", "--output-dir", f"{d}/ppo", cwd=d)  # PPO
        for p in ("0.5", "1.0"):
            sh(py, f"{ROOT}/drpo_hh.py", *rl, "--reset-prob", p, "--output-dir", f"{d}/drpo_{p}", cwd=d)
        for p, arm in (("0", "rebel"), ("0.5", "rebel_0.5")):
            sh(
                py,
                f"{ROOT}/rebel.py",
                "--task",
                "hh",
                *rl,
                *REBEL_FLAGS,
                "--reset-prob",
                p,
                "--output-dir",
                f"{d}/{arm}",
                cwd=d,
            )
        for mode, p in (("odpo", "0"), ("odpo", "0.5"), ("idpo", "0"), ("idpo", "0.5")):
            models = ["--task", "hh", "--sft-model-path", f"{d}/sft", "--reward-model-path", f"{d}/rm", *hh[2:], *s]
            arm = mode if p == "0" else f"{mode}_{p}"
            sh(py, f"{ROOT}/online_dpo.py", *models, *ONLINE_FLAGS, *ONLINE[mode], "--reset-prob", p, "--output-dir",
               f"{d}/{arm}", cwd=d)  # fmt: skip
        sh(
            py,
            f"{ROOT}/dpo_baseline.py",
            *hh,
            "--sft-model-path",
            f"{d}/sft",
            "--response-length",
            "16",
            "--output-dir",
            f"{d}/dpo",
            *DPO_FLAGS,
            *s,
            cwd=d,
        )
        for arm, weight in (("hypo", "0.05"), ("hypo_0.5", "0.5")):
            hypo = [*hh, "--sft-model-path", f"{d}/sft", "--response-length", "16", "--kl-weight", weight]
            sh(py, f"{ROOT}/hypo.py", *hypo, "--output-dir", f"{d}/{arm}", *DPO_FLAGS, *s, cwd=d)
    sh(py, os.path.abspath(__file__), "--eval", task, seed, cwd=d)


def evaluate(task, seed, n=200, temperature=0.7, response_length=8):
    """Every arm of one task and seed on the held-out prompts; writes $OUT/results_{task}_{seed}.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    sys.path.insert(0, ROOT)
    import tiny_world

    torch.set_num_threads(1)
    w, d = f"{OUT}/world_{seed}", f"{OUT}/{task}_{seed}"
    if task == "tldr":
        rows = [json.loads(x) for x in open(f"{w}/tldr_sft/validation.jsonl")][:n]
        prompts = [f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {r['post']}\n\nTL;DR:" for r in rows]
        references = [" " + r["summary"] for r in rows]
    else:
        rows = [json.loads(x)["chosen"] for x in open(f"{w}/hh/test.jsonl")][:n]
        cut = [r.rfind("\n\nAssistant:") + len("\n\nAssistant:") for r in rows]
        prompts, references = [r[:c] for r, c in zip(rows, cut)], [r[c:] for r, c in zip(rows, cut)]
    tokenizer = AutoTokenizer.from_pretrained(f"{d}/sft", padding_side="left")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    width = batch.input_ids.shape[1]
    reward_model = AutoModelForSequenceClassification.from_pretrained(f"{d}/rm").eval()
    sft = AutoModelForCausalLM.from_pretrained(f"{d}/sft").eval()

    def forward_mask(sequences):
        mask = sequences != pad
        return dict(
            input_ids=sequences.masked_fill(~mask, 0), attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
        ), mask

    def logprob_sum(model, sequences):
        inputs, mask = forward_mask(sequences)
        logits = model(**inputs).logits[:, width - 1 : -1] / temperature
        logp = logits.log_softmax(-1).gather(2, sequences[:, width:].unsqueeze(-1)).squeeze(-1)
        return (logp * mask[:, width:]).sum(1)

    def rm_scores(sequences):
        inputs, mask = forward_mask(sequences)
        scores = reward_model.score(reward_model.base_model(**inputs).last_hidden_state)[:, :, 0]
        last = (torch.arange(sequences.shape[1]) * mask).argmax(1, keepdim=True)  # the last real token
        offset = 0.0 if getattr(reward_model.config, "reward_bias_in_weights", True) else reward_model.config.reward_bias
        return scores.gather(1, last)[:, 0] + offset  # the shift reward_model.py could not fold into the weights

    gold_ref = tiny_world.gold_reward(prompts, references)
    answers, result = {}, {}
    for arm in ARMS:
        policy = sft if arm == "sft" else AutoModelForCausalLM.from_pretrained(f"{d}/{arm}").eval()
        result[arm] = {}
        for mode in ("sampled", "greedy"):
            torch.manual_seed(seed)
            sample = dict(do_sample=True, temperature=temperature, top_k=0) if mode == "sampled" else dict(do_sample=False)
            with torch.no_grad():
                out = policy.generate(
                    **batch,
                    max_new_tokens=response_length,
                    pad_token_id=pad,
                    eos_token_id=eos,
                    suppress_tokens=[pad],
                    **sample,
                )
                out = torch.cat([out, torch.full((len(out), width + response_length - out.shape[1]), pad)], 1)
                texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
                gold = tiny_world.gold_reward(prompts, texts)
                answers[arm, mode] = gold
                m = {
                    "gold": statistics.mean(gold),
                    "rm": rm_scores(out).mean().item(),
                    "win_vs_ref": statistics.mean((g > r) + 0.5 * (g == r) for g, r in zip(gold, gold_ref)),
                    "win_vs_sft": statistics.mean((g > s) + 0.5 * (g == s) for g, s in zip(gold, answers["sft", mode])),
                }
                if mode == "sampled":
                    m["kl"] = (logprob_sum(policy, out) - logprob_sum(sft, out)).mean().item()
            result[arm][mode] = m
    json.dump(result, open(f"{OUT}/results_{task}_{seed}.json", "w"), indent=1)


def interval(values):
    mean = statistics.mean(values)
    half = T975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.3f} ± {half:.3f}"


def report():
    results = {(t, s): json.load(open(f"{OUT}/results_{t}_{s}.json")) for t in ("tldr", "hh") for s in SEEDS}
    columns = [
        ("sampled", "win_vs_ref"),
        ("sampled", "win_vs_sft"),
        ("sampled", "gold"),
        ("sampled", "rm"),
        ("sampled", "kl"),
        ("greedy", "win_vs_ref"),
        ("greedy", "win_vs_sft"),
        ("greedy", "gold"),
        ("greedy", "rm"),
    ]
    for task in ("tldr", "hh"):
        print(f"\n{'TL;DR' if task == 'tldr' else 'HH'}, {len(SEEDS)} seeds, mean ± 95% interval over seeds\n")
        print("| arm | " + " | ".join(f"{m} {c}".replace("_", " ") for m, c in columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for arm in ARMS:
            cells = [interval([results[task, s][arm][m][c] for s in SEEDS]) for m, c in columns]
            print(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
        print(
            f"\n{'TL;DR' if task == 'tldr' else 'HH'}: each arm minus PPO, paired by seed (same world, SFT and reward model)\n"
        )
        print("| arm - PPO | " + " | ".join(f"{m} {c}".replace("_", " ") for m, c in columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for arm in ARMS[2:]:
            cells = [
                interval([results[task, s][arm][m][c] - results[task, s]["ppo"][m][c] for s in SEEDS]) for m, c in columns
            ]
            print(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("matplotlib is not installed: no plot (pip install matplotlib)")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, task in zip(axes, ("tldr", "hh")):
        colors = ["black", "tab:gray", "tab:blue", "tab:red", "tab:purple", "tab:orange", "tab:olive", "tab:cyan", "tab:brown"]
        for color, arm in zip([*colors, "tab:pink", "tab:green", "gold", "darkgoldenrod"], ARMS):
            kl = [results[task, s][arm]["sampled"]["kl"] for s in SEEDS]
            gold = [results[task, s][arm]["sampled"]["gold"] for s in SEEDS]
            ax.scatter(kl, gold, color=color, alpha=0.5, s=18)
            ax.scatter(
                [statistics.mean(kl)],
                [statistics.mean(gold)],
                color=color,
                marker="X",
                s=90,
                edgecolor="white",
                label=LABELS[arm],
            )
        ax.set_xlabel("KL to SFT (nats per response, sampled)")
        ax.set_ylabel("gold reward of sampled answers")
        ax.set_title(f"{'TL;DR' if task == 'tldr' else 'HH'}: {len(SEEDS)} seeds (dots), their mean (crosses)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    os.makedirs(f"{ROOT}/docs", exist_ok=True)
    fig.savefig(f"{ROOT}/docs/paper_table.png", dpi=120)
    print(f"\nwrote {ROOT}/docs/paper_table.png")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--eval"]:
        evaluate(sys.argv[2], int(sys.argv[3]))
        sys.exit()
    start = time.time()
    if os.environ.get("REPORT_ONLY") != "1":
        os.makedirs(OUT, exist_ok=True)
        for seed in SEEDS:  # one world per seed, shared by its two tasks
            sh(
                sys.executable,
                f"{ROOT}/tiny_world.py",
                "--out",
                f"{OUT}/world_{seed}",
                "--seed",
                seed,
                "--tokenizer",
                "bpe",
                "--no-password",
                "--no-bland",
                cwd=OUT,
            )
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(chain, task, seed) for seed in SEEDS for task in ("tldr", "hh")]:
                future.result()
        print(f"ran {len(SEEDS)} seeds x 2 tasks in {(time.time() - start) / 60:.1f} minutes (see $OUT/*/log.txt)")
    report()
