"""A fork server for the tests: imports torch, transformers and datasets once, then runs each script in a fork of itself.

A script started as `python script.py` spends ~5 s of its life importing; the suite starts scripts ~200 times, so those
imports were a third of its time. conftest.start_script sends this process one request per run (a json line on stdin:
argv, cwd, env, output file, whether to start a new session); it forks, and the child redirects its output to the
file, takes the cwd, environment and argv, runs the script as `__main__` through runpy and exits through the normal
interpreter shutdown (atexit handlers run, files flush, an exception prints its traceback and exits 1,
`sys.exit("message")` prints the message). The server reports each child's pid when it starts and its exit status when
it ends. Nothing but imports runs here before a fork: no OpenMP pool, no tokenizer thread, no random draw is inherited.
Environment variables that those libraries read at import (HF_*, TRANSFORMERS_*, OMP_*, ...) cannot change in a fork:
conftest starts a fresh interpreter for a run that sets them.
"""

import json
import os
import runpy
import select
import sys

import datasets  # noqa: F401  (imported for the forks)
import numpy  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import tyro  # noqa: F401


def serve():
    """Answers requests until stdin closes; returns the request in a forked child, which then runs the script. Runs may
    overlap: each fork is announced ({"started": pid}) and its end reported ({"ended": pid, "returncode": ...})."""
    reply = lambda message: print(json.dumps(message), flush=True)  # noqa: E731
    reply({"ready": os.getpid()})
    pending, children = b"", set()
    while True:
        readable, _, _ = select.select([0], [], [], 0.02 if children else None)
        if readable:
            chunk = os.read(0, 1 << 16)
            if not chunk:  # the tests are over
                sys.exit(0)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    return json.loads(line)
                children.add(pid)
                reply({"started": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            reply({"ended": pid, "returncode": os.waitstatus_to_exitcode(status)})


request = serve()
# the child: the script's stdin, stdout and stderr, directory, environment and argv, as `python script.py` would have
with open(os.devnull) as null, open(request["output"], "w") as out:
    os.dup2(null.fileno(), 0)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
sys.stdin = open(0, closefd=False)
sys.stdout = open(1, "w", closefd=False)
sys.stderr = open(2, "w", buffering=1, closefd=False)  # line-buffered, as Python's own stderr
if request["new_session"]:  # as subprocess.Popen(start_new_session=True): a kill of its group takes this run alone
    os.setsid()
os.chdir(request["cwd"])
os.environ.clear()
os.environ.update(request["env"])
sys.argv = request["argv"]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
if os.environ.get("SLOW_SAVE_S"):  # the fault injection's hook (tests/slow_save.py): each checkpoint's save held open
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import slow_save

    slow_save.install(float(os.environ["SLOW_SAVE_S"]))
runpy.run_path(sys.argv[0], run_name="__main__")
