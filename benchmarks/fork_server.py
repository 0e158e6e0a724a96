"""What tests/zygote.py saves a run: each script's `--help` (start-up: imports and flag parsing, nothing else) in a fresh
interpreter and as a fork of the tests' fork server, side by side in one process, alternating, ROUNDS rounds.

    python benchmarks/fork_server.py
"""

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import conftest  # noqa: E402  (run_script and its fork server)

SCRIPTS = ["sft.py", "reward_model.py", "ppo_baseline.py", "drpo_tldr.py", "drpo_hh.py", "dpo_baseline.py", "eval_winrate.py"]
ROUNDS = int(os.environ.get("ROUNDS", 3))

conftest.zygote()  # started once per worker in the tests, outside the timings as there
seconds = {"fresh": 0.0, "fork": 0.0}
for _ in range(ROUNDS):
    for script in SCRIPTS:
        for how in ("fresh", "fork"):
            os.environ["FRESH_PROCESSES"] = "1" if how == "fresh" else "0"
            start = time.perf_counter()
            conftest.run_script(script, "--help")
            seconds[how] += time.perf_counter() - start
runs = ROUNDS * len(SCRIPTS)
print(f"{runs} runs each: fresh {seconds['fresh'] / runs:.2f} s a run, fork {seconds['fork'] / runs:.2f} s a run")
print(f"fork/fresh {seconds['fork'] / seconds['fresh']:.3f}")
