"""Every training script under torchrun (2 processes, gloo, on CPU) trains exactly as one process on the same global
batch: the same episodes or pairs, the same logged statistics and the same weights, to float tolerance (the gradients
are summed in another order). CI has no GPU; these are the multi-process tests."""

import glob
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import RECORDER, ROOT, TORCHRUN, newest_run, run_script, torchrun, untimed
from test_architectures import arch_folders  # noqa: F401 (a fixture)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

SMALL_RL = [
    "--response-length",
    8,
    "--batch-size",
    32,
    "--local-rollout-forward-batch-size",
    8,
    "--local-micro-batch-size",
    4,
    "--num-mini-batches",
    2,
    "--num-ppo-epochs",
    2,
    "--lr",
    3e-4,
    "--kl-coef",
    0.01,
    "--temperature",
    1.0,
    "--print-sample-every",
    0,
    "--max-grad-norm",
    1.0,
    "--no-whiten-rewards",
    "--save-every",
    0,
]


# the torchrun mode each script is tested in (two runs a script keep the suite short): "two" data parallel, "fsdp"
# with --fsdp. Every script's distributed helpers are the same lines (tests/test_copies.py checks they are).
MODE = {"sft.py": "fsdp", "reward_model.py": "fsdp", "dpo_baseline.py": "fsdp", "drpo_tldr.py": "fsdp", "drpo_hh.py": "two"}
MODE["rebel.py"] = "two"  # REBEL with the reset, data parallel (FSDP is the same copy of place() as DR-PO's)
MODE["online_dpo.py"] = "fsdp"  # iterative DPO with the reset, uneven shares of pairs under FSDP
MODE["hypo.py"] = "fsdp"  # HyPO: its samples drawn with the policy gathered, its two losses under FSDP


def one_and_two(script, flags, tmp_path, env=None):
    """The same command in one process, then under torchrun with two, data parallel (`two`) or with FSDP (`fsdp`),
    as MODE says: {name: (log, rank 0's output)}."""
    runs = {}
    for name, launch, extra in (("one", run_script, []), ("two", torchrun, []), ("fsdp", torchrun, ["--fsdp"])):
        if name != "one" and name != MODE[script]:
            continue
        os.makedirs(tmp_path / name)
        record = {"RECORD_FILE": str(tmp_path / name / "episodes.jsonl")}  # read by the recorder --reward-fn, if any
        proc = launch(
            script, *flags, *extra, "--output-dir", tmp_path / name / "out", cwd=tmp_path / name, env={**record, **(env or {})}
        )
        runs[name] = [json.loads(line) for line in open(f"{newest_run(tmp_path / name)}/metrics.jsonl")], proc.stdout
    return runs


def assert_half_held(output, models):
    """FSDP: rank 0 holds about half of each trained model's parameters (the decoder layers are split evenly)."""
    held = re.findall(r"FSDP: \w+ in \d+ units; this process holds ([\d,]+) of its ([\d,]+) parameters", output)
    assert len(held) == models, output[-3000:]
    for mine, total in held:
        assert 0.45 < int(mine.replace(",", "")) / int(total.replace(",", "")) < 0.55, held


def assert_same_log(one, two, at_least, scaled=()):
    """Every logged value to float tolerance. A `scaled` key is a sum of large terms that cancel (HyPO's RLOO surrogate,
    mean(advantage * logp), with |logp| ~ 20): its rounding noise is that of its terms, about 1e-6 whatever its value,
    so its absolute tolerance is 1e-6 times the largest |value| of the run, not 1e-6."""
    assert [m["update"] for m in one] == [m["update"] for m in two] and len(one) >= 2
    for a, b in zip(untimed(one), untimed(two)):
        assert a.keys() == b.keys() and len(a) >= at_least, (a.keys(), b.keys())
        for k in a:
            abs_tol = 1e-6 * max([1.0] + [abs(m[k]) for m in one if k in m]) if k in scaled else 1e-6
            assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=abs_tol), (a["update"], k, a[k], b[k])


def assert_same_weights(one, two, cls=AutoModelForCausalLM):
    a, b = (cls.from_pretrained(d).state_dict() for d in (one, two))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


@pytest.mark.slow  # starts torchrun
@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "dpo_baseline.py", "hypo.py"])
def test_two_processes_train_as_one(script, world, sft_model, arch_folders, tmp_path):  # noqa: F811 (the fixture)
    """SFT (on a tiny Llama), the reward model and DPO: each process takes half of every batch of 32 (two micro-batches
    of 8); the loss trajectory, every logged statistic (eval included) and the final weights equal the one-process
    run's, with FSDP, where each process holds half of the model (the reward model's FSDP path encodes whole
    sequences, its one-process path shares each pair's prompt: they agree). Data parallel without FSDP is the
    DR-PO-on-HH case below."""
    common = [
        "--lr",
        1e-3,
        "--num-train-epochs",
        1,
        "--batch-size",
        32,
        "--local-micro-batch-size",
        8,
        "--max-train-samples",
        192,
        "--eval-every",
        3,
        "--save-every",
        0,
        "--max-eval-samples",
        51,
    ]  # 51: the last process's share is shorter
    if script == "sft.py":  # on the tiny Llama (stored in bf16), whose LM head is its input embedding: FSDP keeps them tied
        flags = [
            "--base-model",
            arch_folders["llama"] / "base",
            "--dataset-name",
            world / "tldr_sft",
            "--response-length",
            40,
            *common,
        ]
    elif script == "reward_model.py":
        flags = [
            "--sft-model-path",
            sft_model,
            "--dataset-name",
            world / "tldr_comparisons",
            "--norm-dataset-name",
            world / "tldr_sft",
            *common,
        ]
    else:
        flags = [
            "--sft-model-path",
            sft_model,
            "--dataset-name",
            world / "tldr_comparisons",
            "--ref-cache-dir",
            "ref_cache",
            *common,
        ]
    if script == "hypo.py":  # each process samples 2 responses to each of its 16 prompts, in micro-batches of 8
        flags += ["--kl-weight", 0.5, "--num-generations", 2, "--response-length", 8]
    runs = one_and_two(script, flags, tmp_path)
    one = runs["one"][0]
    assert len(one) == 6 and sum("eval_loss" in m or "eval/rewards/margins" in m for m in one) == 2
    cls = AutoModelForSequenceClassification if script == "reward_model.py" else AutoModelForCausalLM
    init = arch_folders["llama"] / "base" if script == "sft.py" else sft_model  # it trained: the weights moved from init
    trained, start = (cls.from_pretrained(d).state_dict() for d in (tmp_path / "one" / "out", init))
    moved = max((trained[k].float() - start[k].float()).abs().max().item() for k in start if "score" not in k)
    assert moved > 1e-3, moved  # a new reward head is left out: it is random in both
    mode = MODE[script]
    assert_same_log(one, runs[mode][0], at_least=3, scaled=["online/kl_loss"])
    assert_same_weights(tmp_path / "one" / "out", tmp_path / mode / "out", cls)
    if mode == "fsdp":
        assert_half_held(runs["fsdp"][1], models=1)
    if script == "sft.py":
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "out")
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if script == "dpo_baseline.py":  # the reference ran once (split across the two processes) and was cached once
        caches = {name: glob.glob(str(tmp_path / name / "ref_cache" / "*.pt")) for name in ("one", mode)}
        assert all(len(c) == 1 for c in caches.values()), caches
        a, b = (torch.load(caches[name][0]) for name in ("one", mode))
        assert len(b["eval"][0]) == 51 and all(torch.equal(a[s][i], b[s][i]) for s in ("train", "eval") for i in (0, 1))


@pytest.mark.slow  # starts torchrun
@pytest.mark.parametrize("script", ["drpo_tldr.py", "drpo_hh.py", "rebel.py"])
def test_rl_two_processes_roll_out_and_update_as_one(script, world, sft_model, reward_run, tmp_path):
    """DR-PO (and so PPO, its --reset-prob 0 case; ppo_baseline.py runs under torchrun in test_ppo.py's learning
    test): each process rolls out 2 of the 4 chunks of a batch of 32 and takes half of every minibatch. The
    episodes (DR-PO: the reset coin flips and h too) are those of one process, and so is every update: every logged
    statistic (whitening, KL, scores, reset fraction and per-group scores, PPO statistics, DR-PO's greedy eval) and
    the final weights; data parallel (HH) or with FSDP (TL;DR: policy and value model sharded, each process holding
    half). REBEL with the reset, data parallel: each process rolls out half of the 64 generations of 32 pairs."""
    flags = ["--sft-model-path", sft_model, "--reward-model-path", world / "rm", *SMALL_RL, "--total-episodes", 3 * 32]
    if script == "rebel.py":  # a batch of 32 pairs is 64 generations
        flags[flags.index("--total-episodes") + 1] = 3 * 64
        flags += ["--dataset-name", world / "tldr_comparisons", "--reset-source", "chosen", "--reset-prob", 0.5]
        flags += ["--eval-every", 2, "--eval-prompts", 4]
    elif script == "drpo_tldr.py":
        flags += [
            "--dataset-name",
            world / "tldr_comparisons",
            "--reset-source",
            "chosen",
            "--reset-prob",
            0.5,
            "--eval-every",
            2,
            "--eval-prompts",
            4,
        ]
    else:  # every scored episode recorded as text, and the runs' episodes compared one by one
        (tmp_path / "recorder.py").write_text(RECORDER)
        flags += [
            "--dataset-name",
            world / "hh",
            "--reset-prob",
            0.5,
            "--reward-fn",
            f"{tmp_path / 'recorder.py'}:record",
            "--value-model-path",
            sft_model,
        ]
    runs = one_and_two(script, flags, tmp_path)
    one = runs["one"][0]
    assert len(one) == 3 and (script == "drpo_hh.py" or "eval/score" in one[1])
    assert all(0 < m["reset/fraction"] < 1 for m in one) and "no_reset/kl" in one[0] and "reset/mean_h" in one[0]
    mode = MODE[script]
    assert_same_log(one, runs[mode][0], at_least=20)
    assert_same_weights(tmp_path / "one" / "out", tmp_path / mode / "out")
    if mode == "fsdp":
        assert_half_held(runs["fsdp"][1], models=2)
    if script == "drpo_hh.py":  # the two processes append their shares in any order
        episodes = [sorted((tmp_path / name / "episodes.jsonl").read_text().splitlines()) for name in ("one", mode)]
        assert len(episodes[0]) == 3 * 32 and episodes[0] == episodes[1]


@pytest.mark.slow  # starts torchrun
def test_online_dpo_two_processes_under_fsdp_as_one(world, sft_model, tmp_path):
    """online_dpo.py with K 3, the best against the worst and the reset: each process writes the responses to 8 of an
    iteration's 16 prompts; the ties the gold rule makes (dropped) leave a number of pairs that does not split evenly,
    so a process's last micro-batch is a stand-in of weight 0. The pairs, every logged statistic and the final weights
    are those of one process, with the policy sharded (each process holding half)."""
    flags = [
        *("--sft-model-path", sft_model, "--reward-fn", f"{ROOT}/tiny_world.py:gold_reward", "--response-length", 8),
        *("--dataset-name", world / "tldr_comparisons", "--reset-source", "chosen", "--reset-prob", 0.5),
        *("--num-generations", 3, "--pair-selection", "max_min", "--prompts-per-iteration", 16, "--batch-size", 8),
        *("--local-rollout-forward-batch-size", 8, "--local-micro-batch-size", 3, "--num-epochs", 2, "--lr", 1e-3),
        *("--temperature", 1.0, "--total-episodes", 3 * 48, "--eval-every", 2, "--eval-prompts", 4),
        *("--print-sample-every", 0, "--save-every", 0),
    ]
    runs = one_and_two("online_dpo.py", flags, tmp_path)
    one = runs["one"][0]
    assert len(one) == 3 and "eval/score" in one[1] and all(0 < m["reset/fraction"] < 1 for m in one)
    assert any(m["online/pairs"] % 2 for m in one), [m["online/pairs"] for m in one]  # an odd number: uneven shares
    assert_same_log(one, runs["fsdp"][0], at_least=20)
    assert_same_weights(tmp_path / "one" / "out", tmp_path / "fsdp" / "out")
    assert_half_held(runs["fsdp"][1], models=1)


@pytest.mark.slow  # starts torchrun
def test_killed_under_torchrun_resumes_to_the_straight_torchrun_run(world, sft_model, reward_run, tmp_path):
    """DR-PO with FSDP: the whole job (launcher and both workers) SIGKILLed while it writes its checkpoint of update 4
    (each save held open 3 s by SLOW_SAVE_S), after the one of update 2 (gathered from both processes, written by
    rank 0); resumed under torchrun with --resume-from auto, it resumes at update 3, and the log and the final model
    equal a straight torchrun run's, bit for bit."""
    flags = [
        "--sft-model-path",
        sft_model,
        "--reward-model-path",
        world / "rm",
        "--dataset-name",
        world / "tldr_comparisons",
        "--reset-source",
        "chosen",
        *SMALL_RL[:-2],
        "--total-episodes",
        5 * 32,
        "--fsdp",
        "--save-every",
        2,
        "--output-dir",
        "out",
        "--exp-name",
        f"killed{os.getpid()}",
    ]  # a name on every process's command line, for pkill
    for d in ("straight", "killed"):
        os.makedirs(tmp_path / d)
    torchrun("drpo_tldr.py", *flags, cwd=tmp_path / "straight")
    cmd = [*TORCHRUN, f"{ROOT}/tests/slow_save.py", f"{ROOT}/drpo_tldr.py", *map(str, flags), "--resume-from", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path / "killed",
        stdout=open(tmp_path / "killed" / "first.txt", "w"),
        stderr=subprocess.STDOUT,
        env={**env, "SLOW_SAVE_S": "3"},
    )
    checkpoints = tmp_path / "killed" / "runs" / "*" / "checkpoints"
    while proc.poll() is None and not (
        glob.glob(str(checkpoints / "update_0000002.pt")) and glob.glob(str(checkpoints / "incomplete.pt"))
    ):
        time.sleep(0.05)
    subprocess.run(["pkill", "-KILL", "-f", f"killed{os.getpid()}"])  # the launcher and both workers (their own sessions)
    proc.wait()
    run = newest_run(tmp_path / "killed")
    assert sum(1 for _ in open(f"{run}/metrics.jsonl")) == 4, open(tmp_path / "killed" / "first.txt").read()[-2000:]
    assert sorted(os.listdir(f"{run}/checkpoints")) == ["incomplete.pt", "update_0000002.pt"]
    resumed = subprocess.run(
        cmd, cwd=tmp_path / "killed", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert resumed.returncode == 0 and "at update 3" in resumed.stdout, resumed.stdout[-3000:]
    a_log, b_log = ([json.loads(x) for x in open(f"{newest_run(tmp_path / d)}/metrics.jsonl")] for d in ("straight", "killed"))
    assert [m["update"] for m in b_log] == list(range(1, 6)) and untimed(a_log) == untimed(b_log)
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "out").state_dict() for d in ("straight", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# a --reward-fn under which rank 1 dies (SIGKILL, as an out-of-memory kill) at its second call
DIES = """import os, signal
calls = 0
def score(prompts, responses):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return [0.0] * len(prompts)
"""


@pytest.mark.slow  # starts torchrun
def test_a_rank_that_dies_stops_the_job(world, sft_model, tmp_path):
    """Rank 1 is killed in the middle of an update while rank 0 waits for it in a collective: torchrun ends the job
    within seconds with a non-zero status that names the failed rank and its signal; nothing hangs."""
    (tmp_path / "dies.py").write_text(DIES)
    start = time.time()
    flags = [
        "--sft-model-path",
        sft_model,
        "--value-model-path",
        sft_model,
        "--dataset-name",
        world / "tldr_sft",
        "--reward-fn",
        f"{tmp_path / 'dies.py'}:score",
        *SMALL_RL,
        "--total-episodes",
        10 * 32,
        "--output-dir",
        tmp_path / "out",
    ]
    proc = subprocess.run(
        [*TORCHRUN, f"{ROOT}/ppo_baseline.py", *map(str, flags)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0 and time.time() - start < 120, proc.stdout[-3000:]
    assert "rank      : 1" in proc.stdout and "Signal 9 (SIGKILL)" in proc.stdout, proc.stdout[-3000:]
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


@pytest.mark.slow  # starts torchrun
@pytest.mark.parametrize("script", ["drpo_tldr.py", "rebel.py"])
def test_a_non_finite_loss_on_one_rank_stops_every_rank(script, world, sft_model, tmp_path):
    """Rank 1 alone sees a NaN loss in the last micro-batch of update 1 (tests/nan_on_rank1.py wraps the loss from
    the outside; 2 epochs x 2 minibatches x 2 micro-batches a process): the decision is the job's, not the rank's, so
    both processes stop at update 1 with the same message and no model is written. Deciding per rank, rank 1 stopped
    alone while rank 0 went on to update 2 with the NaN gradient in its weights."""
    (tmp_path / "length.py").write_text("def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    flags = ["--sft-model-path", sft_model, "--value-model-path", sft_model, "--dataset-name", world / "tldr_sft",
             "--reward-fn", f"{tmp_path / 'length.py'}:score", *SMALL_RL, "--total-episodes", 3 * 32,
             "--output-dir", tmp_path / "out"]  # fmt: skip
    if script == "rebel.py":
        flags[flags.index("--value-model-path") : flags.index("--dataset-name")] = []
        flags[flags.index("--total-episodes") + 1] = 3 * 64
    proc = subprocess.run(
        [*TORCHRUN, f"{ROOT}/tests/nan_on_rank1.py", f"{ROOT}/{script}", *map(str, flags)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "NAN_LOSS": "rebel_loss" if script == "rebel.py" else "ppo_losses",
            "NAN_AT": "8",
        },  # fmt: skip
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert proc.stdout.count("non-finite loss or score at update 1:") == 2, proc.stdout[-3000:]
    assert "update 2" not in proc.stdout and not os.path.exists(tmp_path / "out" / "model.safetensors")


# a worker run by torchrun: the machinery on two CPU processes, next to a reference computation
MACHINERY = """import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import drpo_tldr as script
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
# bucketed gradients equal per-parameter ones: tensors of several sizes and dtypes, buckets of 64 bytes or 32 MB
for bucket in (64, 2**25):
    torch.manual_seed(rank)
    shapes = ((3, torch.float32), (40, torch.float32), (5, torch.bfloat16), (7, torch.float32))
    params = [torch.nn.Parameter(torch.zeros(n, dtype=d)) for n, d in shapes]
    for p in params:
        p.grad = torch.randn(p.shape).to(p.dtype)
    expected = [p.grad.clone() for p in params]
    for g in expected:
        dist.all_reduce(g)
        g /= world
    script.average_gradients(params, fsdp=False, bucket_bytes=bucket)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, expected)), bucket
# FSDP on the script's device, whatever accelerator the build has: a CUDA build reports "cuda" on a machine with no GPU
torch._C._get_accelerator = lambda: torch.device("cuda")
torch.manual_seed(0)
config = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
model = script.place(GPTNeoXForCausalLM(config), torch.device("cpu"), fsdp=True)
assert all(p.device_mesh.device_type == "cpu" and p.device.type == "cpu" for p in model.parameters())
model(input_ids=torch.randint(0, 64, (2, 5)), labels=torch.randint(0, 64, (2, 5))).loss.backward()
assert all(p.grad is not None for p in model.parameters())
# generate() on the gathered FSDP policy: no collective a token (transformers' default for an FSDP module is one, with
# a read back to the host), and the processes need not decode in step
calls, all_reduce = [], dist.all_reduce
dist.all_reduce = lambda *args, **kwargs: calls.append(1) or all_reduce(*args, **kwargs)
with torch.no_grad(), script.gathered(model):
    states, h = torch.randint(1, 64, (2, 3 + rank)), torch.zeros(2, dtype=torch.long)
    out = script.generate_responses(model, states, h, 6, 0, do_sample=False, suppress_tokens=[0])
dist.all_reduce = all_reduce
assert out.shape == (2, 6) and not calls, len(calls)
print("machinery ok", rank)
dist.destroy_process_group()
"""


@pytest.mark.slow  # starts torchrun
def test_bucketed_gradients_and_fsdp_on_the_scripts_device(tmp_path):
    """average_gradients' buckets (one all-reduce per 32 MB, or per 64 bytes here) give exactly the per-parameter
    all-reduce's gradients; place() shards on a mesh of the script's device, even where the torch build reports a CUDA
    accelerator that is not there (fully_shard's default mesh takes the build's accelerator: --fsdp crashed there);
    generate_responses on the gathered FSDP policy makes no collective call."""
    (tmp_path / "machinery.py").write_text(MACHINERY)
    proc = subprocess.run(
        [*TORCHRUN, str(tmp_path / "machinery.py"), ROOT],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.count("machinery ok") == 2, proc.stdout[-3000:]


def two_nodes(script, flags, folders, port, env=None):
    """`script` on two "nodes" without a shared file system: two torchrun launchers, --nnodes 2 with one process each,
    rendezvous on 127.0.0.1, each in its own folder (node 0 in folders[0]). Returns (node 0's, node 1's) output."""
    procs = []
    for rank, folder in enumerate(folders):
        os.makedirs(folder, exist_ok=True)
        launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(rank), "--master-addr", "127.0.0.1"]
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    *launcher,
                    "--master-port",
                    str(port),
                    *script,
                    *map(str, flags),
                ],
                cwd=folder,
                stdout=open(folder / "output.txt", "w"),
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            )
        )
    for proc, folder in zip(procs, folders):
        assert proc.wait(timeout=600) == 0, (folder / "output.txt").read_text()[-3000:]
    return [(folder / "output.txt").read_text() for folder in folders]


@pytest.mark.slow  # starts torchrun
def test_two_nodes_without_a_shared_file_system_resume_to_the_straight_run(world, sft_model, reward_run, tmp_path):
    """A job on two "nodes" whose disks are their own: node 0 (rank 0) alone writes runs/ and the reference cache, and
    decides for every rank. DR-PO checkpoints, is killed (both launchers, every worker) while it writes its second
    checkpoint, and is resumed with --resume-from auto on both nodes: node 1 has no runs/ at all, yet it resumes from
    rank 0's checkpoint, and the log and the final model equal a straight two-node run's, bit for bit. DPO's
    reference log-probs, cached on node 0's disk, reach node 1 too: a second run loads no reference model."""
    port = 29400 + os.getpid() % 500
    flags = [
        *("--sft-model-path", sft_model, "--reward-model-path", world / "rm", "--dataset-name", world / "tldr_comparisons"),
        *("--reset-source", "chosen", *SMALL_RL[:-2], "--total-episodes", 5 * 32, "--save-every", 2, "--output-dir", "out"),
        *("--exp-name", f"nodes{os.getpid()}"),  # on every worker's command line, for pkill
    ]
    drpo = [f"{ROOT}/tests/slow_save.py", f"{ROOT}/drpo_tldr.py"]
    straight = [tmp_path / "straight0", tmp_path / "straight1"]
    two_nodes(drpo, flags, straight, port)
    killed = [tmp_path / "node0", tmp_path / "node1"]
    for folder in killed:
        os.makedirs(folder)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port + 1),
                *drpo,
                *map(str, flags),
                "--resume-from",
                "auto",
            ],
            cwd=folder,
            stdout=open(folder / "first.txt", "w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "SLOW_SAVE_S": "3"},
        )  # fmt: skip
        for rank, folder in enumerate(killed)
    ]
    checkpoints = tmp_path / "node0" / "runs" / "*" / "checkpoints"
    while procs[0].poll() is None and not (
        glob.glob(str(checkpoints / "update_0000002.pt")) and glob.glob(str(checkpoints / "incomplete.pt"))
    ):
        time.sleep(0.05)
    subprocess.run(["pkill", "-KILL", "-f", f"nodes{os.getpid()}"])  # both launchers and their workers
    for proc in procs:
        proc.wait()
    assert not os.path.exists(tmp_path / "node1" / "runs") and not os.path.exists(tmp_path / "straight1" / "runs")
    outputs = two_nodes(drpo, [*flags, "--resume-from", "auto"], killed, port + 2)
    assert "at update 3" in outputs[0], outputs[0][-3000:]
    a_log, b_log = ([json.loads(x) for x in open(f"{newest_run(d)}/metrics.jsonl")] for d in (straight[0], killed[0]))
    assert [m["update"] for m in b_log] == list(range(1, 6)) and untimed(a_log) == untimed(b_log)
    a, b = (AutoModelForCausalLM.from_pretrained(d / "out").state_dict() for d in (straight[0], killed[0]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(tmp_path / "node1" / "runs") and not os.path.exists(tmp_path / "node1" / "out")

    dpo = ["--sft-model-path", sft_model, "--dataset-name", world / "tldr_comparisons", "--max-train-samples", 64]
    dpo += [
        "--max-eval-samples",
        16,
        "--batch-size",
        16,
        "--local-micro-batch-size",
        8,
        "--save-every",
        0,
        "--output-dir",
        "dpo",
    ]
    nodes = [tmp_path / "dpo0", tmp_path / "dpo1"]
    first = two_nodes([f"{ROOT}/dpo_baseline.py"], dpo, nodes, port + 3)
    second = two_nodes([f"{ROOT}/dpo_baseline.py"], dpo, nodes, port + 4)
    assert "computed the reference log-probs" in first[0] and "from the cache" in second[0]
    assert glob.glob(str(nodes[0] / "cache" / "ref_logprobs" / "*.pt")) and not os.path.exists(nodes[1] / "cache")
    a, b = ([json.loads(x) for x in open(f"{r}/metrics.jsonl")] for r in sorted(glob.glob(str(nodes[0] / "runs" / "*"))))
    assert untimed(a) == untimed(b)  # the cached reference is the computed one
