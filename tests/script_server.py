"""Runs the stage scripts for the tests in fresh processes forked from one Python that has already imported torch and
transformers, so that each of the suite's ~100 script runs skips the seconds of importing them (most of a tiny run).
The tests' default (conftest.run_script); SCRIPT_SERVER=0 turns it off.

Each run is still its own process, started as `python script.py args...` would be: `__main__` is the script, sys.argv,
sys.path[0], the working directory and the environment are the run's own, stdout and stderr go to files, the exit
status follows Python's rules (an uncaught exception through sys.excepthook and 1, SystemExit's code or message), and
atexit handlers run at the end. What it cannot give: a library's import-time reaction to the run's environment (the
server imports under the test session's). torchrun's launcher runs here too, but the workers it starts are new
interpreters, as are the runs that tests send signals to or copy alone.

Protocol: one JSON request per line on stdin ({script, module, args, cwd, env, stdout, stderr, timeout}: a script's
path, or with module true a module's name, run as `python -m` does), one JSON reply per line on stdout
({returncode, timed_out}).
"""

import atexit
import json
import os
import runpy
import signal
import sys
import threading
import time
import traceback


def run_child(request: dict) -> None:
    """In the forked child: become the script's process, run it as __main__, and leave with its exit status."""
    os.setpgid(0, 0)  # its own group, so that a timeout ends anything it started too
    for fd, path in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False)  # fresh buffers on the new descriptors, as a new interpreter has
    sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["script"], *request["args"]]
    sys.path[0] = os.getcwd() if request["module"] else os.path.dirname(os.path.abspath(request["script"]))
    code = 0
    try:
        if request["module"]:  # python -m torch.distributed.run: the launcher; its workers are new interpreters
            runpy.run_module(request["script"], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads, then atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
        code = code or 1
    os._exit(code)


def serve() -> None:
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # nothing the imports print can reach the reply channel
    import torch  # noqa: F401  the imports every run shares, done once here
    import torch.distributed.run  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import transformers
    import tyro  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tqdm  # noqa: F401
    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoTokenizer", "LlamaForCausalLM",
                 "LlamaForSequenceClassification", "PreTrainedTokenizerFast"):
        getattr(transformers, name)  # transformers imports its modules on first use
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            run_child(request)
        deadline = time.monotonic() + request["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.02)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
