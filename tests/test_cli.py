"""What a user meets first: flags checked at start-up, a run's config saved and read back, the run name honoured, a fast
failure when the Hub cannot be reached, the judge's key checked before any generation, the training-curve plot."""

import importlib
import json
import os
import re
import time

import pytest
from conftest import run_script, untimed


@pytest.mark.parametrize(
    "script,field,value,must",
    [
        ("drpo_tldr.py", "reset_prob", 1.5, "in [0, 1]"),
        ("drpo_hh.py", "eval_prompts", 0, "> 0"),
        ("ppo_baseline.py", "gamma", 2.0, "in [0, 1]"),
        ("sft.py", "batch_size", 0, "> 0"),
        ("reward_model.py", "lr", -1.0, "> 0"),
        ("dpo_baseline.py", "label_smoothing", 0.5, "in [0, 0.5)"),
    ],
)
def test_every_script_refuses_a_flag_out_of_range_naming_it(script, field, value, must):
    module = importlib.import_module(script[:-3])
    args = module.Args(**{field: value})
    with pytest.raises(SystemExit, match=re.escape(f"--{field.replace('_', '-')} {value}: must be {must}")):
        module.check_flags(args)
    module.check_flags(module.Args())  # the defaults pass


def test_a_flag_out_of_range_stops_the_run_before_anything_is_loaded(tmp_path):
    proc = run_script("drpo_tldr.py", "--reset-prob", "1.5", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--reset-prob 1.5: must be in [0, 1]" in proc.stdout
    assert "Traceback" not in proc.stdout and not os.path.exists(tmp_path / "runs")  # nothing loaded or written


def test_computed_fields_are_not_flags(tmp_path):
    proc = run_script("ppo_baseline.py", "--num-updates", "3", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Unrecognized options: --num-updates" in proc.stdout
    help_text = run_script("ppo_baseline.py", "--help", cwd=tmp_path).stdout
    assert "--run-name" in help_text and "--num-updates" not in help_text and "--minibatch-size" not in help_text


def test_an_unreachable_hub_fails_in_seconds_with_the_fix(tmp_path):
    start = time.time()
    # the Hub ids are the defaults; HF_ENDPOINT points at a closed local port, so this holds online too
    proc = run_script("sft.py", cwd=tmp_path, check=False, env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
    assert proc.returncode != 0 and time.time() - start < 45
    assert "EleutherAI/pythia-1b-deduped, vwxyzjn/summarize_from_feedback_tldr_3_filtered: not on this machine" in proc.stdout
    assert "HF_HUB_OFFLINE=1" in proc.stdout and "Retrying" not in proc.stdout and "Traceback" not in proc.stdout


def test_the_config_is_saved_read_back_on_resume_and_the_run_name_honoured(world, tmp_path):
    """A run named by --run-name writes runs/{name}/args.json. --resume-from alone restarts a run stopped before its
    first checkpoint with the saved flags (none repeated), a flag that differs from the saved one is refused, and a new
    run may not reuse the name."""
    flags = [
        "--base-model",
        world / "base",
        "--dataset-name",
        world / "tldr_sft",
        "--output-dir",
        tmp_path / "out",
        "--lr",
        "1e-3",
        "--max-train-samples",
        64,
        "--max-eval-samples",
        16,
        "--batch-size",
        32,
        "--local-micro-batch-size",
        32,
        "--save-every",
        0,
    ]
    proc = run_script("sft.py", *flags, "--run-name", "mine", cwd=tmp_path)
    assert "run mine: " in proc.stdout and "--lr 0.001" in proc.stdout and "--batch-size 32" in proc.stdout
    config = json.load(open(tmp_path / "runs" / "mine" / "args.json"))
    assert (config["run_name"], config["lr"], config["batch_size"], config["max_train_samples"], config["num_updates"]) == (
        "mine",
        1e-3,
        32,
        64,
        2,
    )
    log = [json.loads(x) for x in open(tmp_path / "runs" / "mine" / "metrics.jsonl")]
    assert [row["update"] for row in log] == [1, 2]

    proc = run_script("sft.py", "--resume-from", "runs/mine", cwd=tmp_path)  # no other flag: they come from args.json
    assert "no checkpoint yet; the run starts again with the flags of runs/mine/args.json" in proc.stdout
    assert json.load(open(tmp_path / "runs" / "mine" / "args.json")) == config
    again = [json.loads(x) for x in open(tmp_path / "runs" / "mine" / "metrics.jsonl")]
    assert untimed(again) == untimed(log)  # the same run again (deterministic on CPU), logged once
    assert os.listdir(tmp_path / "runs") == ["mine"]

    proc = run_script("sft.py", "--resume-from", "runs/mine", "--lr", "1e-4", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "the run was started with other flags: --lr 0.0001 (saved: 0.001)" in proc.stdout
    proc = run_script("sft.py", *flags, "--run-name", "mine", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "runs/mine holds a run already" in proc.stdout


def test_the_openai_judge_checks_its_key_and_endpoint_before_generating(tmp_path):
    # --model-paths would be generated from first: they do not even exist, so any generation would fail differently
    common = ["--model-paths", tmp_path / "no_policy", "--judge", "openai", "--output-dir", tmp_path / "out"]
    proc = run_script("eval_winrate.py", *common, cwd=tmp_path, check=False, env={"OPENAI_API_KEY": ""})
    assert proc.returncode != 0 and "--judge openai needs an API key in $OPENAI_API_KEY" in proc.stdout
    proc = run_script(
        "eval_winrate.py",
        *common,
        "--base-url",
        "http://127.0.0.1:9/v1",
        cwd=tmp_path,
        check=False,
        env={"OPENAI_API_KEY": "k"},
    )
    assert proc.returncode != 0 and "the judge endpoint http://127.0.0.1:9/v1 cannot be reached" in proc.stdout
    assert "Traceback" not in proc.stdout


def test_plot_runs_draws_the_metrics_of_the_readme(tmp_path):
    run = tmp_path / "runs" / "tldr__drpo__1__1"
    os.makedirs(run)
    with open(run / "metrics.jsonl", "w") as f:
        for u in range(1, 4):
            f.write(
                json.dumps(
                    {
                        "update": u,
                        "episodes": 64 * u,
                        "objective/scores": u,
                        "objective/kl": 0.1 * u,
                        "reset/scores": u + 1,
                        "no_reset/scores": u - 1,
                        "objective/rlhf_reward": u - 0.05,
                    }
                )
                + "\n"
            )
        f.write('{"update": 4, "epis')  # a line cut by a kill
    proc = run_script("plot_runs.py", run, "--out", tmp_path / "c.png", cwd=tmp_path)
    assert "line 4: not json, skipped" in proc.stdout
    assert "reward-model score, KL to the reference (nats per response), RLHF reward (score - KL penalty)" in proc.stdout
    assert os.path.getsize(tmp_path / "c.png") > 10_000


def test_a_forked_run_is_a_fresh_run(world, tmp_path, monkeypatch):
    """The tests run scripts in forks of tests/zygote.py: the same log, weights, output, exit status and error message
    as `python script.py` in a fresh interpreter, and a script's exception still prints its traceback and exits 1."""
    import torch
    from conftest import SFT_FLAGS
    from transformers import AutoModelForCausalLM

    runs = {}
    for how in ("fresh", "fork"):
        monkeypatch.setenv("FRESH_PROCESSES", "1" if how == "fresh" else "0")
        (tmp_path / how).mkdir()
        proc = run_script(
            "sft.py",
            *("--base-model", world / "base", "--dataset-name", world / "tldr_sft", "--output-dir", tmp_path / how / "out"),
            *SFT_FLAGS,
            *("--num-train-epochs", 1, "--max-train-samples", 64, "--run-name", "same"),
            cwd=tmp_path / how,
        )
        log = [json.loads(x) for x in open(tmp_path / how / "runs" / "same" / "metrics.jsonl")]
        bad_flag = run_script("drpo_tldr.py", "--reset-prob", "1.5", cwd=tmp_path / how, check=False)
        (tmp_path / how / "boom.py").write_text("raise RuntimeError('boom at import')\n")  # an uncaught exception
        crash = run_script("drpo_tldr.py", "--reward-fn", tmp_path / how / "boom.py:f", cwd=tmp_path / how, check=False)
        runs[how] = proc, log, bad_flag, crash
    (fresh, fresh_log, fresh_bad, fresh_crash), (fork, fork_log, fork_bad, fork_crash) = runs["fresh"], runs["fork"]
    assert len(fresh_log) == 2 and untimed(fresh_log) == untimed(fork_log)

    def same(text, how):  # without the times, the datasets cache's first-load lines and the run's own folder
        text = re.sub(r"(tokens_per_s|episodes_per_s)=\S+", "", text.replace(str(tmp_path / how), "RUN"))
        return [line for line in text.splitlines() if line.strip() and not line.startswith("Generating ")]

    assert same(fresh.stdout, "fresh") == same(fork.stdout, "fork") and len(same(fork.stdout, "fork")) > 10, fork.stdout
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / how / "out").state_dict() for how in ("fresh", "fork"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh_bad.returncode == fork_bad.returncode == 1 and fresh_bad.stdout == fork_bad.stdout
    assert "--reset-prob 1.5: must be in [0, 1]" in fork_bad.stdout
    assert fresh_crash.returncode == fork_crash.returncode == 1  # the interpreter's status for an uncaught exception
    for crashed in (fresh_crash, fork_crash):
        assert "Traceback (most recent call last)" in crashed.stdout, crashed.stdout
        assert crashed.stdout.splitlines()[-1] == "RuntimeError: boom at import"


@pytest.mark.parametrize(
    "script,data,eval_key",
    [
        ("sft.py", "tldr_sft", "eval_loss"),
        ("reward_model.py", "tldr_comparisons", "eval_accuracy"),
        ("dpo_baseline.py", "tldr_comparisons", "eval/rewards/accuracies"),
        ("hypo.py", "tldr_comparisons", "eval/rewards/accuracies"),
    ],
)
def test_eval_every_0_evaluates_at_the_end_only(script, data, eval_key, world, sft_model, tmp_path):
    """--eval-every 0 passes the flag check (>= 0): it means no periodic evaluation, the final one only (it divided by
    zero at the first step)."""
    model = ["--base-model", world / "base"] if script == "sft.py" else ["--sft-model-path", sft_model]
    flags = [*model, "--dataset-name", world / data, "--batch-size", 16, "--local-micro-batch-size", 16, "--lr", 1e-4]
    flags += ["--max-train-samples", 48, "--max-eval-samples", 16, "--eval-every", 0, "--output-dir", tmp_path / "out"]
    flags += ["--norm-dataset-name", world / "tldr_sft", "--max-norm-samples", 16] if script == "reward_model.py" else []
    flags += ["--response-length", 16] if script in ("dpo_baseline.py", "hypo.py") else []
    proc = run_script(script, *flags, cwd=tmp_path)
    log = [json.loads(x) for x in open(os.path.join(tmp_path, "runs", os.listdir(tmp_path / "runs")[0], "metrics.jsonl"))]
    assert len(log) == 3 and [eval_key in m for m in log] == [False, False, True], proc.stdout[-2000:]
