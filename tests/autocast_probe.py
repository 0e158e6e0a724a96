"""The test harness's view of bf16 autocast on a CPU: `python tests/autocast_probe.py script.py --flag ...` runs the
script with every `torch.autocast(...)` it makes turned into an enabled CPU bf16 autocast (on a CPU the scripts build
theirs disabled, so what only a GPU run would do happens here), and writes to $AUTOCAST_PROBE, as JSON, how many times
an autocast region was entered and whether autocast was on at each optimizer step. Every step of every script runs
outside its autocast regions: a step that sees autocast on means a region leaked past its `with` block."""

import atexit
import json
import os
import runpy
import sys

import torch

seen = {"entered": 0, "on_at_step": []}


class CPUAutocast(torch.autocast):
    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        super().__init__("cpu", dtype=torch.bfloat16, enabled=True)

    def __enter__(self):
        seen["entered"] += 1
        return super().__enter__()


def recorded(step):
    def wrapper(self, *args, **kwargs):
        seen["on_at_step"].append(torch.is_autocast_enabled("cpu"))
        return step(self, *args, **kwargs)

    return wrapper


torch.autocast = CPUAutocast
torch.optim.AdamW.step = recorded(torch.optim.AdamW.step)
atexit.register(lambda: json.dump(seen, open(os.environ["AUTOCAST_PROBE"], "w")))

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
