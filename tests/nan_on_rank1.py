"""The test harness's way to make one process alone see a non-finite loss: `NAN_LOSS=ppo_losses NAN_AT=8 python
tests/nan_on_rank1.py script.py --flag ...` (under torchrun too) runs the script with its loss function wrapped from
the outside, so that on rank 1 the NAN_AT-th call's loss (its first output) is NaN, as an overflow in one process's
micro-batch would make it. The script itself has no hook."""

import os
import runpy
import sys

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    script = runpy.run_path(sys.argv[0], run_name="script")  # defines the functions; main() is not called
    scope = script["main"].__globals__  # the namespace the script's functions read their globals from
    loss_fn, calls = scope[os.environ["NAN_LOSS"]], []

    def nan_on_rank1(*args, **kwargs):
        loss, *rest = loss_fn(*args, **kwargs)
        calls.append(1)
        nan = os.environ.get("RANK") == "1" and len(calls) == int(os.environ["NAN_AT"])
        return loss * (float("nan") if nan else 1.0), *rest

    scope[os.environ["NAN_LOSS"]] = nan_on_rank1
    scope["main"]()
