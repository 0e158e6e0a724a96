"""The test harness's way to see what a script passes to one of its functions: `RECORD_FN=generate_responses
RECORD_TO=calls.jsonl python tests/record_calls.py script.py --flag ...` (under torchrun too) runs the script with that
function wrapped from the outside; each call appends one json line, its tensor and number arguments (tensors as
lists), and the call goes on unchanged. The script itself has no hook."""

import json
import os
import runpy
import sys

import torch

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    script = runpy.run_path(sys.argv[0], run_name="script")  # defines the functions; main() is not called
    scope = script["main"].__globals__  # the namespace the script's functions read their globals from
    fn = scope[os.environ["RECORD_FN"]]

    def recorded(*args, **kwargs):
        kept = [a.tolist() if isinstance(a, torch.Tensor) else a for a in args if isinstance(a, (torch.Tensor, int, float))]
        with open(os.environ["RECORD_TO"], "a") as f:
            f.write(json.dumps(kept) + "\n")
        return fn(*args, **kwargs)

    scope[os.environ["RECORD_FN"]] = recorded
    scope["main"]()
