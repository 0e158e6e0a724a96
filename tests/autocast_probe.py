"""The test harness's view of bf16 autocast on a CPU: `python tests/autocast_probe.py script.py --flag ...` runs the
script with every `torch.autocast(...)` it makes turned into an enabled CPU bf16 autocast (on a CPU the scripts build
theirs disabled, so what only a GPU run would do happens here), and writes to $AUTOCAST_PROBE, as JSON, how many times
an autocast region was entered and whether autocast was on at each optimizer step. Every step of every script runs
outside its autocast regions: a step that sees autocast on means a region leaked past its `with` block. With
GPU_MIXED_PRECISION=1 every FSDP2 MixedPrecisionPolicy the script makes is the one it makes on a GPU (bf16 weights
gathered, gradients reduced in fp32), counted in the JSON. Under torchrun `{rank}` in $AUTOCAST_PROBE is the rank."""

import atexit
import json
import os
import runpy
import sys

import torch
import torch.distributed.fsdp
from torch.distributed.fsdp import MixedPrecisionPolicy

seen = {"entered": 0, "on_at_step": [], "gpu_policies": 0}


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


def gpu_policy(*args, **kwargs):
    seen["gpu_policies"] += 1
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


torch.autocast = CPUAutocast
torch.optim.AdamW.step = recorded(torch.optim.AdamW.step)
if os.environ.get("GPU_MIXED_PRECISION") == "1":
    torch.distributed.fsdp.MixedPrecisionPolicy = gpu_policy  # the scripts import it by name when they start
path = os.environ["AUTOCAST_PROBE"].replace("{rank}", os.environ.get("RANK", "0"))
atexit.register(lambda: json.dump(seen, open(path, "w")))

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
