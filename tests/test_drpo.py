"""drpo_tldr.py and drpo_hh.py: the reset, its masks, its reduction to PPO, and the paper's claim at CPU scale."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import PINNED, RECORDER, ROOT, SMALL, kill_and_resume, metrics_file, newest_run, run_script, untimed
from transformers import AutoModelForCausalLM

import drpo_hh
import drpo_tldr
import ppo_baseline as ppo

SCRIPTS = [drpo_tldr, drpo_hh]
EOS, PAD = 0, 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_reset_states_exact_tokens_and_ranges(script):
    queries = [[10, 11, 12], [20], [30, 31], [40]]
    reset_responses = [[5, 6, 7, 8, EOS], [EOS], [], [5, 6, 7, 8, 9, 10, 11, 12, EOS]]  # rows 1 and 2 are too short to reset
    g = torch.Generator().manual_seed(0)
    seen_h = set()
    for _ in range(200):
        states, h, reset = script.reset_states(queries, reset_responses, 0.5, 1, 6, g)
        for q, c, s, n, r in zip(queries, reset_responses, states, h.tolist(), reset.tolist()):
            if r:
                assert 1 <= n <= min(len(c) - 1, 6 - 1) and s == q + c[:n] and EOS not in s[len(q) :]
            else:
                assert n == 0 and s == q
        assert not reset[1] and not reset[2]
        seen_h |= set(h[3:].tolist())
    assert seen_h == {0, 1, 2, 3, 4, 5}  # row 3: h uniform over 1..5 (capped so the policy writes >= 1 token), 0 = no reset


@pytest.mark.parametrize("script", SCRIPTS)
def test_reset_fraction_and_reset_prob_one(script):
    n, p = 4000, 0.3
    queries, reset_responses = [[7]] * n, [[5, 6, EOS]] * n
    _, _, reset = script.reset_states(queries, reset_responses, p, 1, 8, torch.Generator().manual_seed(1))
    assert abs(reset.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)  # binomial bound, 4 sigma
    reset_responses = [[5, 6, EOS], [EOS], [5, EOS]] * 10
    _, h, reset = script.reset_states([[7]] * 30, reset_responses, 1.0, 1, 8, torch.Generator().manual_seed(2))
    assert reset.tolist() == [True, False, True] * 10  # every usable chosen response is reset
    _, h0, reset0 = script.reset_states([[7]] * 30, reset_responses, 1.0, 0, 8, torch.Generator().manual_seed(2))
    assert reset0.all()  # with h_min 0 even [EOS] can be reset (to h = 0)


def test_reset_uses_its_own_random_stream():
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    drpo_tldr.reset_states([[1]] * 8, [[5, 6, EOS]] * 8, 0.5, 1, 8, torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), a)


def test_prefix_is_masked_from_losses_kl_and_values():
    h = torch.tensor([2, 0])
    sequence_lengths = torch.tensor([4, 2])
    mask = drpo_tldr.action_mask(h, sequence_lengths, 6)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    new_logprobs = torch.randn(2, 6, requires_grad=True)
    vpred = torch.randn(2, 6, requires_grad=True)
    adv, returns = torch.randn(2, 6), torch.randn(2, 6)
    # first minibatch: old = new (ratio 1, nothing clipped), so every policy token gets a gradient
    pg_loss, vf_loss, _ = drpo_tldr.ppo_losses(
        new_logprobs, new_logprobs.detach(), adv, vpred, vpred.detach(), returns, mask, 0.2, 0.2
    )
    (pg_loss + vf_loss).backward()
    assert torch.all(new_logprobs.grad[0, :2] == 0) and torch.all(vpred.grad[0, :2] == 0)  # the prefix: no gradient
    assert torch.all(new_logprobs.grad[0, 2:5] != 0) and torch.all(vpred.grad[0, 2:5] != 0)
    assert torch.all(new_logprobs.grad[:, 5] == 0) and torch.all(new_logprobs.grad[1, 3:] == 0)  # nor does the padding
    logprobs, ref = torch.full((2, 6), -1.0), torch.full((2, 6), -2.0)  # unmasked: the prefix and padding differ too
    rewards, kl, _ = drpo_tldr.per_token_rewards(torch.tensor([3.0, 1.0]), logprobs, ref, mask, sequence_lengths, 0.1)
    assert kl.tolist() == [[0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]  # KL on the policy's tokens only
    torch.testing.assert_close(rewards[0], torch.tensor([0, 0, -0.1, -0.1, 2.9, 0]))  # score at the EOS


def test_the_rollout_samples_from_a_reset_state_what_training_scores(sft_model):
    """An episode is generated from its reset state (prompt + prefix, left-padded to at least the prompts' width, in
    one generate() call with rows of other h) and trained in another layout (the prompt, then the whole response with
    the prefix forced). At every token the policy wrote, generate()'s own sampling distribution (its processed scores:
    temperature, the pad token suppressed) equals response_logprobs in the training layout; the prefix is the data's."""
    from transformers import GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(sft_model).eval()
    model.generation_config = GenerationConfig()  # as load_models: no EOS stops a sample, nothing else set
    queries, prefixes, length, temperature = [[30, 31, 32, 33], [30, 31], [34, 35, 36]], [[40, 41, 42], [], [43]], 6, 0.7
    h = torch.tensor([len(p) for p in prefixes])
    query_batch = drpo_tldr.left_pad(queries, PAD)
    state = drpo_tldr.left_pad([q + p for q, p in zip(queries, prefixes)], PAD, width=query_batch.shape[1])
    sampling = dict(do_sample=True, temperature=temperature + 1e-7, top_k=0, top_p=1.0, suppress_tokens=[PAD])
    with torch.no_grad():
        torch.manual_seed(0)
        response = drpo_tldr.generate_responses(model, state, h, length, PAD, **sampling)
        torch.manual_seed(0)  # the same call, with generate()'s scores kept
        new = length - int(h.min())
        out = model.generate(state, attention_mask=(state != PAD).long(), max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=PAD, output_scores=True, return_dict_in_generate=True, **sampling)  # fmt: skip
        trained = drpo_tldr.response_logprobs(model, torch.cat((query_batch, response), 1), response, PAD, temperature, [PAD])
    assert [response[r, : h[r]].tolist() for r in range(3)] == prefixes
    for r in range(3):
        for j in range(int(h[r]), length):  # written at generation step j - h[r]
            sampled = out.scores[j - h[r]][r].log_softmax(-1)
            assert out.sequences[r, state.shape[1] + j - h[r]] == response[r, j]
            torch.testing.assert_close(trained[r, j], sampled[response[r, j]], atol=1e-4, rtol=0)


def resolved_defaults(module, **fields):
    """An Args with its defaults, and the defaults the script resolves at start-up (per task, per reset source)."""
    import dataclasses

    args = module.Args(**fields)
    if module is drpo_tldr:
        args.dataset_name, args.dataset_config = drpo_tldr.DATASETS[args.reset_source]
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in ("exp_name", "output_dir")}


HH_DATA = {  # drpo_hh.py's data and models, where ppo_baseline.py (TL;DR alone) has TL;DR's
    "sft_model_path": "models/sft_hh",
    "reward_model_path": "models/reward_hh",
    "dataset_name": "Anthropic/hh-rlhf",
    "response_length": 128,
}


@pytest.mark.parametrize("task", ["tldr", "hh"])
def test_ppo_and_drpo_share_every_default(task):
    """At their defaults the two scripts roll out with the same settings (on HH PPO is drpo_hh.py --reset-prob 0, and
    only the data and models differ from ppo_baseline.py's): a default-against-default comparison measures the reset
    and nothing else (test_reset_prob_zero_is_ppo runs them)."""
    ours, theirs = resolved_defaults(ppo), resolved_defaults(drpo_tldr if task == "tldr" else drpo_hh)
    if task == "hh":
        assert {k: theirs.pop(k) for k in HH_DATA} == HH_DATA
    shared = [k for k in theirs if k in ours]
    assert len(shared) >= 38 and {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert set(theirs) - set(ours) <= {
        "reset_prob",
        "reset_min_prefix",
        "reset_source",
        "dataset_config",
        "eval_every",
        "eval_prompts",
        "early_stop_score",
    }
    if task == "tldr":
        assert theirs["reset_source"] == "sft_reference" and theirs["dataset_config"] is None


def test_the_readme_command_line_is_the_authors_tldr_run():
    """The README's command for the authors' run parses into their settings (Cornell-RL/drpo, src/tldr/drpo.py),
    together with the defaults it relies on."""
    import re
    import shlex

    import tyro

    readme = open(f"{ROOT}/README.md").read()
    block = readme[readme.index("**The authors' TL;DR run.**") :]
    command = re.search(r"python drpo_tldr.py (.*?)\n```", block, re.S).group(1).replace("\\\n", " ")
    args = tyro.cli(drpo_tldr.Args, args=shlex.split(command))
    authors = dict(
        reset_prob=1.0,
        reset_min_prefix=1,
        reset_source="sft_reference",
        seed=555134,
        sft_model_path="jdchang/tldr_sft_pythia_2.8",
        use_lora=True,
        lora_r=1024,
        lora_alpha=2048,
        lora_target_modules="query_key_value",
        lora_value=True,
        whiten_rewards=True,
        max_grad_norm=None,
        total_episodes=1_000_000,
        batch_size=512,
        num_mini_batches=1,
        num_ppo_epochs=4,
        lr=3e-6,
        anneal_lr=True,
        eps=1e-5,
        kl_coef=0.05,
        adaptive_kl=False,
        gamma=1.0,
        gae_lambda=0.95,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        response_length=53,
        temperature=0.7,
        missing_eos_penalty=-1.0,
        query_length=512,
        local_micro_batch_size=4,
        local_rollout_forward_batch_size=32,
    )
    assert {k: getattr(args, k) for k in authors} == authors


class DigitTokenizer:  # decodes ids as their numbers: enough to read a sample table
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)


@pytest.mark.parametrize("script", [drpo_tldr, drpo_hh])
def test_the_sample_table_shows_episodes_from_the_prompt_and_reset_ones(script, capsys):
    """The batch is ordered by h, so its first rows all start at the prompt: the table picks two of each kind (all of
    one kind when the other is absent), the reset prefix in [brackets]."""
    prompts = [[100 + i] for i in range(6)]
    responses = torch.tensor([[i, 50, 51] for i in range(6)])
    h, scores = torch.tensor([0, 0, 0, 1, 1, 2]), torch.arange(6) / 10
    script.print_samples(DigitTokenizer(), prompts, responses, h, scores, h > 0)
    rows = capsys.readouterr().out.splitlines()[1:]
    assert rows == [
        "  0.000 | ...100 | []'0 50 51'",
        "  0.100 | ...101 | []'1 50 51'",
        "  0.300 | ...103 | [3]'50 51'",
        "  0.400 | ...104 | [4]'50 51'",
    ]
    script.print_samples(DigitTokenizer(), prompts, responses, h * 0, scores, h < 0)  # no reset (--reset-prob 0)
    assert [r.split(" | ")[1] for r in capsys.readouterr().out.splitlines()[1:]] == ["...100", "...101", "...102", "...103"]


NOT_COMPARED = ("time/", "episodes_per_s", "peak_memory_gb")


@pytest.mark.parametrize("task", ["tldr", "hh"])
def test_reset_prob_zero_is_ppo(task, world, sft_model, reward_run, tmp_path):
    common = [
        "--sft-model-path",
        sft_model,
        "--reward-model-path",
        world / "rm",
        "--output-dir",
        tmp_path / "out",
        "--total-episodes",
        64,
        "--eval-every",
        2,
        "--eval-prompts",
        8,
        *SMALL,
        "--whiten-rewards",  # the default, which SMALL turns off: both scripts' whitening path runs here
    ]  # the same evaluation flags in both
    dataset = world / ("tldr_sft" if task == "tldr" else "hh")
    # on HH, ppo_baseline.py (TL;DR alone) as it is, its prompts read by drpo_hh.py's data code (tests/ppo_on_hh.py)
    script = ["tests/ppo_on_hh.py", f"{ROOT}/ppo_baseline.py"] if task == "hh" else ["ppo_baseline.py"]
    ppo = run_script(*script, "--dataset-name", dataset, *common, cwd=tmp_path)
    drpo = run_script(f"drpo_{task}.py", "--reset-prob", 0, "--dataset-name", dataset, *common, cwd=tmp_path)  # no other flag
    a = [json.loads(x) for x in open(metrics_file(ppo.stdout, tmp_path))]
    b = [json.loads(x) for x in open(metrics_file(drpo.stdout, tmp_path))]
    assert len(a) == len(b) == 2
    for ma, mb in zip(a, b):
        assert mb["reset/fraction"] == 0.0
        compared = [k for k in ma if not k.startswith(NOT_COMPARED)]
        assert len(compared) >= 20 and {k: ma[k] for k in compared} == {k: mb[k] for k in compared}
    assert "eval/score" in a[1] and "eval/score" not in a[0]  # evaluated every 2 updates, and equal above


@pytest.mark.slow
@pytest.mark.parametrize("script", ["drpo_tldr.py", "drpo_hh.py"])
def test_drpo_killed_anywhere_resumes_to_the_straight_run(script, world, sft_model, reward_run, tmp_path):
    """Fault injection (tests/conftest.py, kill_and_resume): one SIGKILL during a checkpoint's save, and for drpo_hh.py
    one at random too (drpo_tldr.py is also killed under torchrun, tests/test_distributed.py),
    each resumed with --resume-from auto; the log and the final policy equal a straight run's, bit for bit."""
    tldr = script == "drpo_tldr.py"
    flags = [
        "--sft-model-path",
        sft_model,
        "--reward-model-path",
        world / "rm",
        "--dataset-name",
        world / ("tldr_comparisons" if tldr else "hh"),
        *(["--reset-source", "chosen"] if tldr else []),
        *SMALL,
        "--total-episodes",
        7 * 32,
        "--save-every",
        2,
        "--output-dir",
        "out",
    ]
    for d in ("straight", "killed"):
        os.makedirs(tmp_path / d)
    run_script(script, *flags, cwd=tmp_path / "straight", env={"OMP_NUM_THREADS": "1"})
    kills = kill_and_resume(script, flags, tmp_path / "killed", seed=1, updates=7, save_every=2, kills=1 if tldr else 2)
    assert kills[0]["during_save"] and all(k["lost"] <= 2 for k in kills), kills
    a_log, b_log = ([json.loads(x) for x in open(f"{newest_run(tmp_path / d)}/metrics.jsonl")] for d in ("straight", "killed"))
    assert [m["update"] for m in b_log] == list(range(1, 8)) and untimed(a_log) == untimed(b_log)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "out").state_dict() for d in ("straight", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reset_prob_one_warns_and_logs(world, sft_model, reward_run, tmp_path):
    proc = run_script(
        "drpo_tldr.py",
        "--reset-prob",
        1,
        "--sft-model-path",
        sft_model,
        "--reward-model-path",
        world / "rm",
        "--dataset-name",
        world / "tldr_comparisons",
        "--reset-source",
        "chosen",
        "--output-dir",
        tmp_path / "o",
        *SMALL,
        "--total-episodes",
        32,
        cwd=tmp_path,
    )
    assert "WARNING: --reset-prob 1 with --reset-min-prefix >= 1" in proc.stdout
    m = json.loads(open(metrics_file(proc.stdout, tmp_path)).readline())
    assert m["reset/fraction"] == 1.0 and 1 <= m["reset/mean_h"] <= 4 and "no_reset/scores" not in m


@pytest.mark.slow
def test_hard_exploration_drpo_solves_what_ppo_cannot(world, tmp_path):
    """The paper's theorem at CPU scale: the gold reward needs an exact 6-word answer (probability about e^-17 under
    the SFT policy) that the chosen responses of the offline data contain. With the same episodes, DR-PO
    (drpo_tldr.py, reset_prob 0.5) learns to write it from the prompt alone; PPO (ppo_baseline.py) never sees a reward.
    With the CPU kernels pinned to AVX2 (ATen, MKL, oneDNN), DR-PO solved seeds 1 (update 200) and 3 (update 140) of 6
    within 300 updates on an Intel machine (BENCHMARKS.md); seed 3 solves too on an AMD EPYC, with those pins and with
    today's PINNED (MKL's COMPATIBLE branch); unpinned, the seed that solves depends on the machine's vector unit
    (seed 1 solved on the machine that calibrated it, not on an AVX-512 one). PPO had no rewarded episode in any seed."""
    pw = world / "password"
    sft = f"--base-model {pw}/base --dataset-name {pw}/tldr_sft --eval-split train[:5%] --output-dir {pw}/sft --lr 1e-3"
    sft += " --num-train-epochs 3 --batch-size 32 --local-micro-batch-size 32 --response-length 8"
    run_script("sft.py", *sft.split(), cwd=tmp_path, env={"OMP_NUM_THREADS": "2", **PINNED})  # BENCHMARKS.md's SFT model
    common = f"--sft-model-path {pw}/sft --value-model-path {pw}/sft --reward-fn {ROOT}/tiny_world.py:password_reward"
    common += " --response-length 8 --batch-size 64 --local-rollout-forward-batch-size 64 --local-micro-batch-size 32"
    common += " --num-mini-batches 2 --lr 1e-3 --kl-coef 0.01 --temperature 1 --max-grad-norm 1.0 --no-whiten-rewards"
    common += f" --total-episodes {300 * 64} --eval-every 10 --eval-prompts 1 --early-stop-score 0.9 --print-sample-every 0"
    common += " --save-every 0 --seed 3"
    arms = {  # the same prompt in both datasets; the password is in the comparisons' chosen answers
        "drpo": f"drpo_tldr.py --reset-prob 0.5 --reset-source chosen --dataset-name {pw}/tldr_comparisons",
        "ppo": f"ppo_baseline.py --dataset-name {pw}/tldr_sft",
    }
    procs = {}
    for arm, cmd in arms.items():  # two processes side by side, one thread each (the thread count changes trajectories)
        os.makedirs(tmp_path / arm)
        script, *flags = cmd.split()
        # output to a file, not a pipe: a pipe nobody reads fills up and stalls the process
        procs[arm] = subprocess.Popen(
            [sys.executable, f"{ROOT}/{script}", *flags, *common.split(), "--output-dir", str(tmp_path / arm / "out")],
            cwd=tmp_path / arm,
            stdout=open(tmp_path / arm / "out.txt", "w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **PINNED},
        )
    assert procs["drpo"].wait() == 0, (tmp_path / "drpo" / "out.txt").read_text()[-3000:]
    drpo_log = [json.loads(x) for x in open(f"{newest_run(tmp_path / 'drpo')}/metrics.jsonl")]
    ppo_path = f"{newest_run(tmp_path / 'ppo')}/metrics.jsonl"
    while procs["ppo"].poll() is None and sum(1 for _ in open(ppo_path)) < len(drpo_log) + 1:
        time.sleep(1)  # PPO: as many episodes as DR-PO, then stop
    procs["ppo"].kill()
    procs["ppo"].wait()
    ppo_log = [json.loads(x) for x in open(ppo_path) if x.endswith("\n")]
    drpo_evals = [m["eval/score"] for m in drpo_log if "eval/score" in m]
    ppo_evals = [m["eval/score"] for m in ppo_log if "eval/score" in m]
    assert drpo_evals[-1] >= 0.8, drpo_evals  # DR-PO writes the password from the prompt alone
    assert max(ppo_evals) <= 0.05 and len(ppo_log) >= len(drpo_log), ppo_evals  # PPO, with at least as many episodes
    assert max(m["objective/raw_scores"] for m in ppo_log) <= 0.05  # PPO: next to no rewarded episode at all


def test_password_family_names_its_task_in_the_prompt(tmp_path):
    """tiny_world.py --password-length / --password-vocab (benchmarks/hard_exploration_family.py): the chosen answers
    are the task's password, SFT answers are 1 to length words of its vocabulary, every word is one token, and
    password_reward reads the task from the prompt's subreddit (r/password is the default task)."""
    from transformers import AutoTokenizer

    import tiny_world

    run_script(
        "tiny_world.py",
        "--out",
        tmp_path,
        "--tokenizer",
        "bpe",
        "--n-train",
        200,
        "--n-eval",
        10,
        "--no-bland",
        "--password-length",
        3,
        "--password-vocab",
        64,
    )
    words, password = tiny_world.password_task(3, 64)
    assert (
        len(set(words)) == 64
        and len(password.split()) == 3
        and tiny_world.password_task() == (tiny_world.PASSWORD_VOCAB, tiny_world.PASSWORD)
    )
    pw = tmp_path / "password"
    pairs = [json.loads(x) for x in open(pw / "tldr_comparisons" / "train.jsonl")]
    assert all(
        r["summaries"][r["choice"]]["text"] == " " + password and r["info"]["subreddit"] == "password3x64" for r in pairs
    )
    answers = [json.loads(x)["summary"].split() for x in open(pw / "tldr_sft" / "train.jsonl")]
    assert {len(a) for a in answers} == {1, 2, 3} and set(sum(answers, [])) <= set(words)
    assert set(sum(answers, [])) - set(tiny_world.PASSWORD_VOCAB)  # the words past the 16 code words are drawn too
    tokenizer = AutoTokenizer.from_pretrained(pw / "base")
    ids = tokenizer.encode("SUBREDDIT: r/password3x64 " + " ".join(words))
    assert len(ids) == 66 and tokenizer.unk_token_id not in ids
    prompt = "SUBREDDIT: r/password3x64\n\nTITLE: what is the password ?"
    assert tiny_world.password_reward(
        [prompt, prompt, "SUBREDDIT: r/password\n"], [password, tiny_world.PASSWORD, tiny_world.PASSWORD]
    ) == [1, 0, 1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_rollout_keeps_each_episode_with_its_own_reset_state(script, world, sft_model, tmp_path):
    """The rollout orders the batch by h (the prompts, states, h and reset flags together): every scored response must
    start with the prefix of its own prompt's chosen response (a permutation applied to one of them alone pairs it with
    another's)."""
    (tmp_path / "record.py").write_text(RECORDER)
    tldr = script is drpo_tldr
    dataset = world / ("tldr_comparisons" if tldr else "hh")
    run_script(
        f"{script.__name__}.py",
        "--reset-prob",
        1,
        "--reset-min-prefix",
        2,
        "--sft-model-path",
        sft_model,
        "--value-model-path",
        sft_model,
        "--reward-fn",
        f"{tmp_path}/record.py:record",
        "--dataset-name",
        dataset,
        "--output-dir",
        tmp_path / "o",
        *(["--reset-source", "chosen"] if tldr else []),
        *SMALL,
        "--local-rollout-forward-batch-size",
        8,
        "--total-episodes",
        32,
        cwd=tmp_path,
        env={"RECORD_FILE": str(tmp_path / "scored.jsonl")},
    )
    tokenizer = script.load_tokenizer(str(sft_model))
    prefixes = {}  # prompt -> the first 2 tokens of its chosen response(s), as text
    for row in map(json.loads, open(dataset / "train.jsonl")):
        if tldr:
            prompt, chosen = script.TLDR_FORMAT.format(**row["info"]), row["summaries"][row["choice"]]["text"]
        else:
            prompt, chosen, _ = script.hh_split(row["chosen"], row["rejected"])
        prefixes.setdefault(prompt, set()).add(tokenizer.decode(script.response_ids(tokenizer, chosen)[:2]))
    scored = [json.loads(x) for x in open(tmp_path / "scored.jsonl")]
    assert len(scored) == 32
    assert all(any(response.startswith(p) for p in prefixes[prompt]) for prompt, response in scored)
    assert len({response[:6] for _, response in scored}) > 5  # many different prefixes: a shuffle could not pass by chance
