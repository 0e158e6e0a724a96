"""Shared fixtures: a tiny world (BPE tokenizer, tiny GPT-NeoX, jsonl data) and the SFT / reward models trained on it."""

import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
sys.path.insert(0, ROOT)  # tests import the scripts' pure functions directly
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # two workers on two cores: one thread each (set before torch is imported)

# small, fast settings for the tiny world; the demo (demo.sh) uses the same ones
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


LONGEST = ("test_hard_exploration_drpo_solves_what_ppo_cannot", "test_the_pipeline_runs_on_every_architecture")  # in order
# a short test that needs the reward model, so the SFT and reward models are built at the start by one worker while
# the other runs the long tests that need only the tiny world (else both reach them at once and one waits)
BUILDS_THE_MODELS = "test_reward_model_end_to_end"


def pytest_collection_modifyitems(config, items):
    """The longest tests first, then the other slow ones, then the rest: with two workers (-n 2) the short tests fill
    the end of the run evenly, instead of one worker idling while the other finishes a long test. The third test builds
    the shared models: pytest-xdist hands the first two tests to one worker and the next two to the other, then one
    at a time to whichever is free (pytest_configure sets --maxschedchunk 1)."""
    longest = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: (longest.get(item.originalname, len(LONGEST)), item.get_closest_marker("slow") is None))
    builder = [i for i, item in enumerate(items) if item.originalname == BUILDS_THE_MODELS]
    if builder and len(items) > 2:
        items.insert(2, items.pop(builder[0]))


def pytest_configure(config):
    if getattr(config.option, "maxschedchunk", 0) is None:  # pytest-xdist: one test at a time once the first are sent
        config.option.maxschedchunk = 1
    config.addinivalue_line(
        "markers",
        "slow: a long run (learning runs, the pipeline on every architecture); "
        "`pytest -m 'not slow'` skips them for a quick check",
    )


# what the libraries read from the environment when they are imported: a run that sets one of these cannot be a fork
# of tests/zygote.py, which imported them once with the environment the tests started with
READ_AT_IMPORT = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "DATASETS", "TOKENIZERS", "TORCH", "PYTORCH", "OMP_", "MKL", "CUDA")
READ_AT_IMPORT += ("ATEN_", "ONEDNN_")
# set in this process by torch itself once a test uses it (its default, which a fork computes alike): not a reason for a
# fresh interpreter (it made every later run of a worker one, and such a run had no slow save)
SET_IN_PROCESS = {"TORCHINDUCTOR_CACHE_DIR"}
# every CPU kernel library pinned as demo.sh pins it (ATen and oneDNN to AVX2, MKL to its COMPATIBLE branch, the same on
# Intel and AMD): a long RL run whose outcome is asserted then takes one trajectory on x86-64 machines with AVX2
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}  # as demo.sh
_zygote = {"lock": threading.Lock(), "ended": threading.Condition(), "returncodes": {}}


def zygote():
    """This worker's fork server (tests/zygote.py), started on first use with the environment runs get by default; a
    thread reads its messages: the pid of each run it starts (in the order of the requests) and each run's end."""
    if "proc" not in _zygote:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "zygote.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        json.loads(proc.stdout.readline())  # {"ready": pid}, once the imports are done
        started = queue.Queue()

        def read():
            for line in proc.stdout:
                message = json.loads(line)
                if "started" in message:
                    started.put(message["started"])
                else:
                    with _zygote["ended"]:
                        _zygote["returncodes"][message["ended"]] = message["returncode"]
                        _zygote["ended"].notify_all()

        threading.Thread(target=read, daemon=True).start()
        _zygote.update(proc=proc, env=env, started=started)
    return _zygote


class Forked:
    """What the tests use of subprocess.Popen (pid, poll, wait, returncode) for a run forked by tests/zygote.py."""

    def __init__(self, argv, cwd, env, output, new_session):
        server = zygote()
        request = dict(argv=argv, cwd=cwd, env=env, output=output, new_session=new_session)
        with server["lock"]:  # the server announces the pids in the order of the requests
            server["proc"].stdin.write((json.dumps(request) + "\n").encode())
            server["proc"].stdin.flush()
            self.pid = server["started"].get(timeout=60)
        self.returncode = None

    def poll(self):
        with _zygote["ended"]:
            self.returncode = _zygote["returncodes"].get(self.pid)
        return self.returncode

    def wait(self, timeout=None):
        with _zygote["ended"]:
            if not _zygote["ended"].wait_for(lambda: self.pid in _zygote["returncodes"], timeout):
                raise subprocess.TimeoutExpired(f"forked run {self.pid}", timeout)
            self.returncode = _zygote["returncodes"][self.pid]
        return self.returncode


def start_script(script, *flags, cwd=None, env=None, output, new_session=False):
    """Starts a top-level script as a user would, its stdout and stderr to the file `output`; returns a Popen, or a
    Forked: the script runs in a fork of tests/zygote.py, which has already imported torch, transformers and datasets
    (~5 s saved a run), unless `env` changes what those read at import, or FRESH_PROCESSES=1 asks for `python script.py`
    every time. `env` is added to os.environ, with one thread a run (two workers, two cores)."""
    argv = [os.path.join(ROOT, script), *map(str, flags)]
    cwd, env = str(cwd or ROOT), {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    fork = os.environ.get("FRESH_PROCESSES") != "1"
    if fork:
        default = zygote()["env"]
        keys = {*env, *default} - SET_IN_PROCESS
        fork = all(env.get(k) == default.get(k) for k in keys if k.startswith(READ_AT_IMPORT))
    if fork:
        return Forked(argv, cwd, env, output, new_session)
    if env.get("SLOW_SAVE_S"):  # the fault injection's hook, which a fork gets from tests/zygote.py
        argv = [os.path.join(ROOT, "tests", "slow_save.py"), *argv]
    with open(output, "w") as out:
        return subprocess.Popen(
            [sys.executable, *argv], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=new_session
        )


def run_script(script, *flags, cwd=None, env=None, check=True):
    """Runs a top-level script as a user would (start_script), returns the completed process (stdout+stderr in .stdout)."""
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "output.txt")
        proc = start_script(script, *flags, cwd=cwd, env=env, output=output)
        proc.wait()
        stdout = open(output).read()
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{stdout[-4000:]}")
    return subprocess.CompletedProcess([script, *map(str, flags)], proc.returncode, stdout)


# a --reward-fn that records every scored (prompt, response) pair to $RECORD_FILE and scores 0
RECORDER = """import json, os
def record(prompts, responses):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.writelines(json.dumps([p, r]) + "\\n" for p, r in zip(prompts, responses))
    return [0.0] * len(prompts)
"""


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
    out = model.generate(
        **batch,
        max_new_tokens=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        suppress_tokens=[tokenizer.pad_token_id],
        **generate_kwargs,
    )  # as the scripts: pad is never written
    answers = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    return tiny_world.gold_reward(prompts, answers), answers


def once(tmp_path_factory, key, build):
    """Runs build(root) once per test run and returns root, a folder every test of the run sees. Under pytest-xdist
    (`-n 2`, the README's command) each worker is a session of its own: the first to get here builds, under a file
    lock, and the others wait for it and reuse what it built."""
    from filelock import FileLock  # comes with datasets and huggingface_hub

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above the workers' own
    with FileLock(str(root / f"{key}.lock")):
        if not (root / f"{key}.done").exists():
            build(root)
            (root / f"{key}.done").touch()
    return root


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = once(
        tmp_path_factory,
        "world",
        lambda root: run_script(
            "tiny_world.py", "--out", root / "tiny", "--tokenizer", "bpe", "--n-train", 2000, "--n-eval", 200
        ),
    )
    return root / "tiny"


@pytest.fixture(scope="session")
def sft_model(world, tmp_path_factory):
    once(
        tmp_path_factory,
        "sft",
        lambda _: run_script(
            "sft.py",
            "--base-model",
            world / "base",
            "--dataset-name",
            world / "tldr_sft",
            "--output-dir",
            world / "sft",
            *SFT_FLAGS,
            cwd=world,
        ),
    )
    return world / "sft"


@pytest.fixture(scope="session")
def bland_sft_model(world, tmp_path_factory):
    """The SFT policy of the DPO task (tiny_world.py's bland/): its greedy answer is the bland one."""
    once(
        tmp_path_factory,
        "bland_sft",
        lambda _: run_script(
            "sft.py",
            "--base-model",
            world / "base",
            "--dataset-name",
            world / "bland" / "tldr_sft",
            "--output-dir",
            world / "bland" / "sft",
            *SFT_FLAGS,
            cwd=world / "bland",
        ),
    )
    return world / "bland" / "sft"


@pytest.fixture(scope="session")
def reward_run(world, sft_model, tmp_path_factory):
    """(the reward model's folder, the run's output)."""

    def build(_):
        proc = run_script(
            "reward_model.py",
            "--sft-model-path",
            sft_model,
            "--dataset-name",
            world / "tldr_comparisons",
            "--norm-dataset-name",
            world / "tldr_sft",
            "--output-dir",
            world / "rm",
            *RM_FLAGS,
            cwd=world,
        )
        (world / "rm_output.txt").write_text(proc.stdout)

    once(tmp_path_factory, "reward_model", build)
    return world / "rm", (world / "rm_output.txt").read_text()


@pytest.fixture
def tokenizer(world):
    import sft

    return sft.load_tokenizer(str(world / "base"))


requires_shared = pytest.mark.skipif(  # the real data, and the Pythia tokenizer some of these tests read it with
    not all(os.path.isdir(os.path.join(SHARED, d)) for d in ("data", "tokenizers/pythia")),
    reason="../shared/data or ../shared/tokenizers/pythia is absent",
)


TIMING = ("episodes_per_s", "tokens_per_s", "pairs_per_s", "peak_memory_gb", "time/")


def untimed(rows):
    """Metrics lines without the keys that measure time or memory (the rest is deterministic on CPU)."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def newest_run(cwd):
    """The newest run folder under cwd/runs (run names end in their start time)."""
    import glob

    runs = glob.glob(os.path.join(cwd, "runs", "*__*"))
    return max(runs, key=lambda r: int(r.rsplit("__", 1)[1])) if runs else None


# two processes on this machine (gloo), on a free port; OMP_NUM_THREADS is set by the callers
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def torchrun(script, *flags, cwd=None, env=None, check=True):
    """run_script, under torchrun with 2 processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [*TORCHRUN, os.path.join(ROOT, script), *map(str, flags)],
        cwd=cwd or ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc


def kill_and_resume(script, flags, cwd, seed, updates, save_every, kills=4, slow_save=0.6, launcher=(sys.executable,)):
    """Fault injection: runs `script *flags --resume-from auto` and SIGKILLs it `kills` times, resuming each time, then
    lets it finish. Even kills land while a checkpoint is being written (SLOW_SAVE_S holds each save open between the
    written file and its rename for `slow_save` seconds: tests/slow_save.py), the others at a random moment 1-3
    updates past the checkpoint the process resumed from, in a process whose saves are not slowed (`updates` and
    `save_every` are the run's, so that a kill never comes too late). After every kill the run must still hold its
    newest complete checkpoint, and the updates lost (logged but not checkpointed) are returned, one dict per kill.
    `launcher`: what runs the script (the kill takes its process group; torchrun's workers have sessions of their own,
    see test_distributed.py)."""
    import glob
    import random
    import signal
    import time

    rng, report = random.Random(seed), []
    # a fresh process gets the slow save through tests/slow_save.py, which runs the script
    cmd = [
        *launcher,
        os.path.join(ROOT, "tests", "slow_save.py"),
        os.path.join(ROOT, script),
        *map(str, flags),
        "--resume-from",
        "auto",
    ]

    def log_file():
        run = newest_run(cwd)
        path = os.path.join(run, "metrics.jsonl") if run else None
        return (path, os.stat(path).st_ino) if path and os.path.exists(path) else None

    def logged():
        return sum(1 for line in open(log_file()[0]) if line.endswith("\n")) if log_file() else 0

    def saving(since):
        """A save of the running process is under way (not the leftover of a killed one)."""
        for path in glob.glob(os.path.join(cwd, "runs", "*", "checkpoints", "incomplete.pt")):
            try:
                if os.path.getmtime(path) >= since:
                    return True
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        return False

    def complete():
        run = newest_run(cwd)
        return sorted(int(c[-10:-3]) for c in glob.glob(os.path.join(run, "checkpoints", "update_*.pt"))) if run else []

    for k in range(kills + 1):
        resumed_at, log_at_start, started = (complete() or [0])[-1], log_file(), time.time()
        during_save = k % 2 == 0 and k < kills and resumed_at + save_every < updates  # a save is still to come
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLOW_SAVE_S": str(slow_save if during_save else 0)}
        output = os.path.join(cwd, f"output_{k}.txt")  # a file, not a pipe: a pipe nobody reads fills up and stalls the run
        if launcher == (sys.executable,):  # a fork of tests/zygote.py: the imports are done once
            proc = start_script(script, *flags, "--resume-from", "auto", cwd=cwd, env=env, output=output, new_session=True)
        else:
            proc = subprocess.Popen(
                cmd, cwd=cwd, stdout=open(output, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        if k == kills:
            assert proc.wait() == 0, open(output).read()[-3000:]
            return report
        target = min(resumed_at + rng.randint(1, 3), updates - 2)
        while proc.poll() is None:
            if during_save and saving(started):
                time.sleep(rng.uniform(0, slow_save))
                break
            # the log this process writes (a resumed run rewrites it up to its checkpoint: a new file)
            if not during_save and log_file() != log_at_start and logged() >= target:
                time.sleep(rng.uniform(0, 0.1))
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before kill {k}:\n{open(output).read()[-3000:]}"
        before = complete()
        os.killpg(proc.pid, signal.SIGKILL)  # the process and, under torchrun, every worker
        proc.wait()
        after = complete()
        assert not before or (after and after[-1] >= before[-1]), (before, after)  # the kill took no complete checkpoint away
        unfinished = glob.glob(
            os.path.join(cwd, "runs", "*", "checkpoints", "incomplete.pt")
        )  # this process's save, cut short
        report.append(
            {"during_save": any(os.path.getmtime(u) >= started for u in unfinished), "lost": logged() - (after or [0])[-1]}
        )
    return report


# the tiny world's RL recipe, shared by the PPO and DR-PO tests (the defaults follow the paper: no clip, whitening)
SMALL = [
    "--response-length",
    8,
    "--batch-size",
    32,
    "--local-rollout-forward-batch-size",
    32,
    "--local-micro-batch-size",
    16,
    "--num-mini-batches",
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
]


def metrics_file(stdout, cwd):
    run_name = re.search(r"^run (\S+): ", stdout, re.M).group(1)
    return os.path.join(cwd, "runs", run_name, "metrics.jsonl")


def assert_same_checkpoint(a_run, b_run, name: str):
    """Two runs' checkpoint folders hold the same files, and checkpoint `name` the same weights, AdamW state, counters
    (the reset generator's state included) and flags, bit for bit."""
    import torch

    assert sorted(os.listdir(f"{a_run}/checkpoints")) == sorted(os.listdir(f"{b_run}/checkpoints")) == [name]
    a, b = (torch.load(f"{r}/checkpoints/{name}", weights_only=True) for r in (a_run, b_run))
    assert sorted(a) == sorted(b) and len(a["optimizer"]["state"]) > 0
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    a_opt, b_opt = a["optimizer"]["state"], b["optimizer"]["state"]
    assert a_opt.keys() == b_opt.keys() and all(torch.equal(a_opt[i][k], b_opt[i][k]) for i in a_opt for k in a_opt[i])
    for key in sorted(set(a) - {"model", "optimizer", "config"}):
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, key
    assert {k: v for k, v in a["config"].items() if k not in ("run_name", "resume_from")} == {
        k: v for k, v in b["config"].items() if k not in ("run_name", "resume_from")
    }
