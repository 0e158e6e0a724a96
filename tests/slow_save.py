"""The test harness's hook into a checkpoint's save, from the outside: the scripts have none of their own.

`install(seconds)` makes every torch.save of a checkpoint's temporary file (checkpoints/incomplete.pt) wait that long
once the file is written and before the script renames it into place, so that a SIGKILL can land in the middle of a
save. tests/zygote.py installs it in a forked run when SLOW_SAVE_S is set; a fresh process gets it by running this
file in place of the script: `python tests/slow_save.py script.py --flag ...` (torchrun too: `torchrun ...
tests/slow_save.py script.py ...`)."""

import os
import runpy
import sys
import time


def install(seconds: float):
    import torch

    save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if isinstance(f, str) and os.path.basename(f) == "incomplete.pt":
            time.sleep(seconds)

    torch.save = slow_save


if __name__ == "__main__":
    install(float(os.environ.get("SLOW_SAVE_S", "0")))
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
    runpy.run_path(sys.argv[0], run_name="__main__")
