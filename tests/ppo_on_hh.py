"""The test harness's PPO on HH: `python tests/ppo_on_hh.py ppo_baseline.py --flag ...` runs ppo_baseline.py (its
flags, rollout, losses and loop as they are) with its prompts read by drpo_hh.py's data code, so that
test_reset_prob_zero_is_ppo can show that drpo_hh.py --reset-prob 0 is PPO on HH. ppo_baseline.py itself reads
TL;DR alone."""

import os
import runpy
import sys

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    root = sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    script = runpy.run_path(sys.argv[0], run_name="script")  # defines the functions; main() is not called
    hh = runpy.run_path(os.path.join(root, "drpo_hh.py"), run_name="hh")
    script["main"].__globals__["build_queries"] = lambda args, tokenizer: hh["build_episodes"](args, tokenizer)[0]
    script["main"]()
