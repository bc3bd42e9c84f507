"""Shared fixtures: a tiny task, a tokenizer trained offline on it, and tiny Llama models. Nothing touches the Hub."""

import atexit
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "HF_DATASETS_CACHE" not in os.environ:  # `datasets`' Arrow copies of files, removed when the session ends
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf_datasets_")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import reviews_task  # noqa: E402

TINY_SIZES = reviews_task.Sizes(sft_train=1500, sft_eval=64, pref_train=600, pref_eval=128, prompts_eval=32)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """The reviews task at a small size."""
    out = tmp_path_factory.mktemp("reviews")
    reviews_task.generate(str(out), seed=0, sizes=TINY_SIZES)
    return out


@pytest.fixture(scope="session")
def tokenizer(task_dir):
    with open(task_dir / "sft_train.jsonl") as f:
        texts = [r["prompt"] + r["completion"] for r in map(json.loads, f)]
    return reviews_task.build_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A ~100k-parameter Llama with the task tokenizer, saved as a Hugging Face folder."""
    out = tmp_path_factory.mktemp("tiny_model")
    reviews_task.build_tiny_model(tokenizer, hidden_size=64, num_layers=2).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


USE_SCRIPT_SERVER = os.environ.get("SCRIPT_SERVER") != "0"


class ScriptServer:
    """tests/script_server.py, started on first use: each run is a fresh process forked from it (a new interpreter
    costs seconds of imports, most of a tiny run): the suite in about 11 minutes instead of 25 on 2 cores.
    SCRIPT_SERVER=0: each run a new interpreter instead."""

    process = None

    @classmethod
    def run(cls, script, args, cwd, env, timeout, module=False):
        if cls.process is None or cls.process.poll() is not None:
            cls.process = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "script_server.py")],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                           env=os.environ)  # imports under the session's environment, not a run's
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            request = dict(script=script, module=module, args=args, cwd=str(cwd), env=dict(env), stdout=out,
                           stderr=err, timeout=timeout)
            cls.process.stdin.write(json.dumps(request) + "\n")
            cls.process.stdin.flush()
            reply = json.loads(cls.process.stdout.readline())
            with open(out, errors="replace") as f_out, open(err, errors="replace") as f_err:
                stdout, stderr = f_out.read(), f_err.read()
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired([script, *args], timeout, stdout, stderr)
        return subprocess.CompletedProcess([script, *args], reply["returncode"], stdout, stderr)


def run_script(script, *args, cwd, check=True):
    """Run one of the stage scripts as a user would, from `cwd` (where runs/ is written): a process forked from
    ScriptServer's warm interpreter (tests/script_server.py: what that changes), or with SCRIPT_SERVER=0 a new one."""
    command = [os.path.join(REPO, script), *map(str, args)]
    env = os.environ | {"TQDM_DISABLE": "1"}
    if USE_SCRIPT_SERVER:
        proc = ScriptServer.run(command[0], command[1:], cwd, env, timeout=900)  # a hang fails
    else:
        proc = subprocess.run([sys.executable, *command], cwd=cwd, timeout=900, capture_output=True, text=True,
                              env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_torchrun(script, *args, cwd, nproc=2, check=True, popen=False):
    """Run a stage script under torchrun on the CPU (gloo), `nproc` processes on one machine, as a user would."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               os.path.join(REPO, script), *map(str, args)]
    env = os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}  # two processes on two cores
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if USE_SCRIPT_SERVER:  # the launcher forked warm; the workers are new interpreters
        proc = ScriptServer.run(command[2], command[3:], cwd, env, timeout=900, module=True)  # a hang fails
    else:
        proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def wait_for_logged(cwd, key, count, timeout=180.0):
    """Wait until the one run under cwd/runs (still going) has logged `key` `count` times."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = list((cwd / "runs").glob("*/metrics.jsonl"))
        if logs and logs[0].read_text().count(f'"{key}"') >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{key} was not logged {count} times within {timeout} s")


def read_metrics(cwd, key):
    """[(step, value)] for one metric from the single run under cwd/runs/."""
    (run,) = os.listdir(os.path.join(cwd, "runs"))
    with open(os.path.join(cwd, "runs", run, "metrics.jsonl")) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]


@pytest.fixture(scope="session")
def sft_dir(task_dir, model_dir, tmp_path_factory):
    """The tiny model after a short SFT on the task, so that it writes review-like text."""
    cwd = tmp_path_factory.mktemp("sft_for_ppo")
    run_script("sft.py", "--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl",
               "--eval-dataset", task_dir / "sft_eval.jsonl", "--output-dir", cwd / "sft", "--max-steps", "60",
               "--learning-rate", "3e-3", "--per-device-train-batch-size", "16", "--eval-steps", "1000",
               "--num-eval-generations", "4", "--eval-reward-fn", "", cwd=cwd)
    return cwd / "sft"


SCRIPT_CALLS = ("run_script(", "run_torchrun(", "run_copy(", "Popen(", "Terminal(", "subprocess.run(")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a script end to end; `pytest -m 'not slow'` leaves these out")


def pytest_collection_modifyitems(items):
    """A test that runs a script (or needs the SFT model a script trains) is `slow`, marked here from its source so that
    no new test is forgotten; `pytest -m 'not slow'` runs the rest, the formulas and helpers, in a minute or two."""
    for item in items:
        source = inspect.getsource(item.function)
        if any(call in source for call in SCRIPT_CALLS) or "sft_dir" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
