"""A fork server for the tests: imports torch, transformers and datasets once, then runs each script in a fork of itself.

A script started as `python script.py` spends ~5 s of its life importing; the suite starts scripts ~150 times, so those
imports were a third of its time. conftest.run_script sends this process one request per run (a json line on stdin:
argv, cwd, env, output file); it forks, the child redirects its output to the file, takes the cwd, environment and
argv and runs the script as `__main__` through runpy, and exits through the normal interpreter shutdown (atexit
handlers run, files flush, an exception prints its traceback and exits 1, `sys.exit("message")` prints the message).
The parent answers with the child's exit status. Nothing but imports runs here before a fork: no OpenMP pool, no
tokenizer thread, no random draw is inherited. Environment variables that those libraries read at import
(HF_*, TRANSFORMERS_*, OMP_*, ...) cannot change in a fork: conftest starts a fresh interpreter for a run that sets them.
"""

import json
import os
import runpy
import sys

import datasets  # noqa: F401  (imported for the forks)
import numpy  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import tyro  # noqa: F401


def serve():
    """Answers requests until stdin closes; returns the request in a forked child, which then runs the script."""
    requests, replies = sys.stdin, sys.stdout
    print(json.dumps({"ready": os.getpid()}), file=replies, flush=True)
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=replies, flush=True)
    sys.exit(0)


request = serve()
# the child: the script's stdin, stdout and stderr, directory, environment and argv, as `python script.py` would have
with open(os.devnull) as null, open(request["output"], "w") as out:
    os.dup2(null.fileno(), 0)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
sys.stdin = open(0, closefd=False)
sys.stdout = open(1, "w", closefd=False)
sys.stderr = open(2, "w", closefd=False)
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
sys.argv = request["argv"]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
