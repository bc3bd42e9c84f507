"""Nothing lost, nobody in: the saves and checkpoints of every stage (the plumbing each script carries, tested through
sft.py's copy, which tests/test_copy.py holds equal to the others') against kills at every write, crafted files, NaN,
a full disk, a second run, signals, and bad input files."""

import copy
import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import REPO, read_metrics, run_script, wait_for_logged, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import plumbing
import sft
from common import DataError, read_jsonl


class Killed(BaseException):
    """Stands for a kill: raised at a chosen write, it is caught by nothing in the scripts (not an Exception)."""


def tree_digest(folder) -> dict:
    """{relative path: sha256} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def make_training(model_dir, value: float):
    """A tiny model whose weights all equal `value` (so a save tells which step wrote it), its `Parallel`, an AdamW that
    has stepped once, and a training state naming the step."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    parallel = plumbing.Parallel(model)
    optimizer = torch.optim.AdamW(parallel.parameters(), lr=1e-3)
    for p in parallel.parameters():
        p.grad = torch.full_like(p, value)
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model, parallel, optimizer, {"step": int(value), "run_name": "x", "log_bytes": 0}


def save(folder, model_dir, value, training=True):
    model, parallel, optimizer, state = make_training(model_dir, value)
    plumbing.save_model(str(folder), None, {}, ("", model), training=(state, parallel, optimizer) if training else None)
    return model, parallel, optimizer


WRITES = [("os", "replace"), ("os", "makedirs"), ("shutil", "rmtree"), ("torch", "save"), ("dcp", "save"),
          ("json", "dump"), ("plumbing", "save_file")]


def count_writes(monkeypatch, kill_at: int | None):
    """Wrap each file-system write save_model makes; raise Killed before the `kill_at`-th. Writes made inside another
    (the files of torch.distributed.checkpoint's save, of save_pretrained) are not counted. Returns the call log."""
    calls, depth = [], [0]
    modules = {"os": os, "shutil": plumbing.shutil, "torch": torch, "dcp": dcp, "json": json, "plumbing": plumbing}
    for module, name in WRITES:
        real = getattr(modules[module], name)

        def wrapped(*a, _real=real, _name=f"{module}.{name}", **k):
            if depth[0] == 0:
                calls.append(_name)
                if kill_at is not None and len(calls) == kill_at:
                    raise Killed(_name)
            depth[0] += 1
            try:
                return _real(*a, **k)
            finally:
                depth[0] -= 1
        monkeypatch.setattr(modules[module], name, wrapped)
    return calls


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
@pytest.mark.parametrize("training", [True, False], ids=["checkpoint", "final-save"])
def test_a_kill_at_any_write_leaves_a_whole_save(model_dir, tmp_path, monkeypatch, exchange, training):
    """Killed at each write of a save (checkpoint or final folder), then started again: the folder is the previous save
    or the new one, whole (weights, optimizer, random generators, state all from one step), and no leftover remains."""
    if not exchange:  # where renameat2 is missing: two renames, mended on the next start
        class NoExchange:
            def __init__(self, *a, **k):
                pass

            def __getattr__(self, name):
                raise AttributeError(name)
        monkeypatch.setattr(plumbing.ctypes, "CDLL", NoExchange)
    save(tmp_path / "count", model_dir, 1.0, training)
    with monkeypatch.context() as m:  # how many writes a save over a previous one makes
        calls = count_writes(m, None)
        save(tmp_path / "count", model_dir, 2.0, training)
    assert len(calls) >= (7 if training else 4), calls
    for kill_at in range(1, len(calls) + 1):
        out = tmp_path / f"out{kill_at}"
        folder = out / "checkpoint" if training else out
        save(folder, model_dir, 1.0, training)  # the previous save, whole
        with monkeypatch.context() as m:
            count_writes(m, kill_at)
            with pytest.raises(BaseException) as killed:  # torch.distributed.checkpoint wraps what it catches
                save(folder, model_dir, 2.0, training)
            assert killed.type is Killed or "Killed" in str(killed.value), killed.value
        plumbing.claim_output_dir(str(out), resume=True)  # the next run starts: mends, cleans
        assert not os.path.exists(str(folder) + ".tmp") and not os.path.exists(str(folder) + ".old"), kill_at
        model = AutoModelForCausalLM.from_pretrained(folder)
        step = model.lm_head.weight.flatten()[0].item()
        assert step in (1.0, 2.0), kill_at
        assert all(torch.all(p == step) for p in model.parameters()), kill_at
        if training:
            fresh, parallel, optimizer, _ = make_training(model_dir, 0.0)
            state = plumbing.load_state(str(folder), parallel, optimizer)
            assert state["step"] == step, (kill_at, state["step"], step)
            moments = [s["exp_avg"] for s in optimizer.state.values()]
            assert all(torch.allclose(mo, torch.full_like(mo, 0.1 * step)) for mo in moments), kill_at
    plumbing.claim_output_dir.release()


def test_crafted_checkpoint_files_are_refused(model_dir, tmp_path):
    """A pickle payload in any file a resume reads is refused with one line, and never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    for target in ["optimizer/.metadata", "optimizer/__0.metadata", "optimizer/__0_0.distcp", "rng_0.pt",
                   "training_state.pt"]:
        ckpt = tmp_path / target.replace("/", "_")
        _, parallel, optimizer = save(ckpt, model_dir, 1.0)
        path = ckpt / target
        if target.endswith("__0.metadata"):  # the file torch falls back to when .metadata does not serve (None)
            with open(ckpt / "optimizer" / ".metadata", "wb") as f:
                pickle.dump(None, f)
            with open(path, "wb") as f:
                pickle.dump(Payload(), f)
        elif target.endswith(".metadata"):
            with open(path, "wb") as f:
                pickle.dump(Payload(), f)
        elif target.endswith(".distcp"):  # an optimizer hyperparameter (a pickled entry) replaced by the payload
            state = plumbing.get_optimizer_state_dict(parallel, optimizer)
            state["param_groups"][0]["lr"] = Payload()
            dcp.save({"optimizer": state}, checkpoint_id=str(ckpt / "optimizer"))
        else:
            torch.save({"torch": Payload()}, path)
        _, parallel, optimizer, _ = make_training(model_dir, 0.0)
        with pytest.raises(SystemExit, match="refused"):
            plumbing.load_state(str(ckpt), parallel, optimizer)
        assert not marker.exists(), target


def test_a_checkpoint_file_linking_out_is_refused(model_dir, tmp_path):
    """A file of the checkpoint that is a link to a file outside it is refused before anything is read."""
    outside = tmp_path / "elsewhere.pt"
    torch.save({"torch": torch.get_rng_state()}, outside)
    ckpt = tmp_path / "out" / "checkpoint"
    save(ckpt, model_dir, 1.0)
    os.remove(ckpt / "rng_0.pt")
    os.symlink(outside, ckpt / "rng_0.pt")
    with pytest.raises(SystemExit, match="links outside the checkpoint"):
        plumbing.check_checkpoint(str(ckpt), SimpleNamespace(lora_r=0))


def write_checkpoint(out, model_dir, **flags):
    """out/checkpoint as sft.py would leave it, made with `flags` (in its args.json)."""
    model, parallel, optimizer, state = make_training(model_dir, 1.0)
    plumbing.save_model(str(out / "checkpoint"), AutoTokenizer.from_pretrained(model_dir), {"lora_r": 0, **flags},
                        ("", model), training=(state | {"scheduler": {}}, parallel, optimizer))


@pytest.mark.parametrize("damage", ["truncated training_state.pt", "truncated model.safetensors", "no optimizer/",
                                    "another shard", "another --lora-r", "--lora-r on a full checkpoint"])
def test_a_damaged_or_mismatched_checkpoint_is_one_line(damage, task_dir, model_dir, tmp_path):
    """Each way a checkpoint can be damaged or made with other flags ends the resume with one line naming the folder
    and what is wrong, before any training: never a traceback from deep inside a load."""
    out = tmp_path / "out"
    write_checkpoint(out, model_dir, lora_r=8 if damage == "another --lora-r" else 0)
    ckpt = out / "checkpoint"
    if damage.startswith("truncated"):
        path = ckpt / damage.split()[1]
        path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    elif damage == "no optimizer/":
        shutil.rmtree(ckpt / "optimizer")
    elif damage == "another shard":  # the optimizer's data file replaced by another checkpoint's
        other = tmp_path / "other"
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        optimizer = torch.optim.SGD(list(model.parameters())[:1], lr=0.1, momentum=0.9)
        dcp.save({"optimizer": plumbing.get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(other))
        shutil.copy(other / "__0_0.distcp", ckpt / "optimizer" / "__0_0.distcp")
    flags = ["--lora-r", "4"] if "lora" in damage else []
    proc = run_script("sft.py", "--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl",
                      "--output-dir", out, "--max-steps", "2", *flags, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{ckpt} is damaged or was made with other flags" in proc.stderr, proc.stderr[-1000:]
    assert "train/sft/loss" not in (proc.stdout + str(list(tmp_path.glob("runs/*/metrics.jsonl"))))


def test_a_lora_checkpoint_without_its_adapter_or_with_a_non_finite_one_is_one_line(task_dir, model_dir, tmp_path):
    """A LoRA run's checkpoint whose adapter/ is gone stops the resume with one line before any training; an adapter
    that holds NaN is refused as it loads, in one line, not trained on."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file
    out = tmp_path / "out"
    write_checkpoint(out, model_dir, lora_r=4)  # made with --lora-r 4, its adapter/ missing
    proc = run_script("sft.py", "--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl",
                      "--output-dir", out, "--max-steps", "2", "--lora-r", "4", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {out / 'checkpoint'} is damaged or was made with other "
                                                    "flags (missing: adapter): remove it or pass --no-resume")

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    plumbing.add_lora(model, 4, 8.0, "all-linear", str(model_dir))
    saved = tmp_path / "lora"
    plumbing.save_model(str(saved), AutoTokenizer.from_pretrained(model_dir), {"lora_r": 4}, ("", model))
    path = saved / "adapter" / "adapter_model.safetensors"
    state = load_file(path)
    state[next(k for k in state if "lora_A" in k)][0, 0] = float("nan")
    save_file(state, path)
    with pytest.raises(SystemExit, match="is damaged or was made with other flags .*non-finite"):
        plumbing.add_lora(AutoModelForCausalLM.from_pretrained(model_dir), 4, 8.0, "all-linear", str(model_dir),
                          resume_dir=str(saved))


def test_crafted_optimizer_entries_are_refused(tmp_path):
    """torch.distributed.checkpoint stores non-tensor entries (the optimizer's param_groups) as pickles and its default
    planner loads them with weights_only=False; the stages' planner refuses anything but tensors and plain types."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    dcp.save({"optimizer": {"lr": Payload(), "w": torch.ones(2)}}, checkpoint_id=str(tmp_path / "c"))
    target = {"optimizer": {"lr": 0.0, "w": torch.zeros(2)}}
    with pytest.raises(dcp.CheckpointException, match="UnpicklingError"):
        dcp.load(target, checkpoint_id=str(tmp_path / "c"), planner=plumbing._CheckedLoadPlanner())
    assert not marker.exists()
    dcp.load(target, checkpoint_id=str(tmp_path / "c"))  # the default planner runs it: this is what is refused
    assert marker.exists()


def test_non_finite_weights_are_never_saved(model_dir, tmp_path):
    folder = tmp_path / "out"
    save(folder, model_dir, 1.0, training=False)
    before = tree_digest(folder)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(SystemExit, match="non-finite"):
        plumbing.save_model(str(folder), None, {}, ("", model))
    assert tree_digest(folder) == before and not os.path.exists(str(folder) + ".tmp")


def test_a_full_disk_is_reported_and_the_previous_save_kept(model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    save(folder, model_dir, 1.0)
    before = tree_digest(folder)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(SystemExit, match="disk is full"):
        save(folder, model_dir, 2.0)
    assert tree_digest(folder) == before and not os.path.exists(str(folder) + ".tmp")


def test_no_room_or_no_write_access_stops_before_training(model_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    monkeypatch.setattr(plumbing.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    with pytest.raises(SystemExit, match="MiB free"):
        plumbing.check_room(str(tmp_path / "out"), model)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write beside"):  # its parent is a file
        plumbing.claim_output_dir(str(tmp_path / "file" / "out"), resume=True)


def test_a_second_run_on_one_folder_is_refused(tmp_path):
    """The lock names its holder; a lock whose holder has died (SIGKILL) is free again."""
    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r}); import plumbing; "
                               f"plumbing.claim_output_dir({out!r}, True); print('held', flush=True); "
                               "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SystemExit, match=f"in use by another run \\(pid {holder.pid} "):
        plumbing.claim_output_dir(out, resume=True)
    holder.kill()
    holder.wait()
    plumbing.claim_output_dir(out, resume=True)  # stale: taken over
    plumbing.claim_output_dir.release()  # what exit does
    assert not os.path.exists(plumbing.lock_path(out))


def test_the_lock_is_never_a_file_of_the_users(tmp_path):
    """--output-dir uv beside a user's uv.lock: the run's lock is a file of its own, and the user's is as it was after
    the run; a lock path that is a link is refused, its target untouched."""
    (tmp_path / "uv.lock").write_text("the user's lock file\n")
    plumbing.claim_output_dir(str(tmp_path / "uv"), resume=True)
    plumbing.claim_output_dir.release()  # what exit does
    assert (tmp_path / "uv.lock").read_text() == "the user's lock file\n"
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    os.symlink(target, plumbing.lock_path(str(tmp_path / "out")))
    with pytest.raises(SystemExit, match="is a link: refused"):
        plumbing.claim_output_dir(str(tmp_path / "out"), resume=True)
    assert target.read_text() == "keep me\n"


def test_a_link_to_the_output_folder_is_that_folder(model_dir, tmp_path):
    """--output-dir given as a link to a folder: a run on the link and one on the folder hold one lock, and a save
    through the link writes the folder and leaves the link a link."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    held = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r}); import plumbing; "
                             f"plumbing.claim_output_dir({str(tmp_path / 'real')!r}, True); print('held', flush=True); "
                             "import time; time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert held.stdout.readline().strip() == "held"
    with pytest.raises(SystemExit, match="in use by another run"):
        plumbing.claim_output_dir(str(tmp_path / "alias"), resume=True)
    held.kill()
    held.wait()
    save(tmp_path / "alias", model_dir, 1.0, training=False)
    assert os.path.islink(tmp_path / "alias") and (tmp_path / "real" / "config.json").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))


def test_logs_that_cannot_be_written_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    """runs/ full mid-training: the log line that fails raises nothing; the loop is asked to stop at the end of the
    step, with a checkpoint, as a signal asks it, so nothing since the last checkpoint is lost."""
    metrics = plumbing.Metrics(str(tmp_path / "runs" / "x"), {})

    class Full:
        name = "metrics.jsonl"

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(metrics, "jsonl", Full())
    monkeypatch.setattr(plumbing.Metrics, "failed", None)
    signals = plumbing.StopSignals()
    try:
        assert not signals.requested(torch.device("cpu"))
        metrics.log(1, {"loss": 1.0})  # no exception
        assert plumbing.Metrics.failed == "No space left on device" and signals.requested(torch.device("cpu"))
        assert signals.checkpoint_due(1, 10, 1000, torch.device("cpu"))
    finally:
        signals.restore()


def test_a_finite_collapse_stops_and_saves_nothing(task_dir, model_dir, tmp_path):
    """A learning rate that leaves every number finite but flattens the model to uniform over its vocabulary, with no
    gradient left (1e3 here), stops the run in one line; the model that was in the output folder is as it was."""
    out = tmp_path / "out"
    save(out, model_dir, 1.0, training=False)
    before = tree_digest(out)
    proc = run_script("sft.py", "--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl",
                      "--output-dir", out, "--learning-rate", "1e3", "--max-steps", "12", "--eval-dataset", "none",
                      "--num-eval-generations", "0", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "training collapsed" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert tree_digest(out) == before


@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "dpo.py", "ppo_rlhf.py"])
def test_divergence_stops_and_saves_nothing(script, task_dir, model_dir, sft_dir, tmp_path):
    """A learning rate that makes the loss or gradient NaN stops the run at that step with one line; the output
    folder that was there (a model from before) is byte for byte as it was."""
    out = tmp_path / "out"
    save(out, model_dir, 1.0, training=False)
    before = tree_digest(out)
    common_args = ["--output-dir", out, "--learning-rate", "1e38", "--eval-reward-fn", ""]
    if script == "ppo_rlhf.py":
        args = ["--sft-model-path", sft_dir, "--dataset", task_dir / "prompts_train.jsonl", "--rollout-batch-size", "8",
                "--response-length", "6", "--num-iterations", "4", "--save-steps", "1", "--num-eval-prompts", "0",
                "--reward-fn", "reward_functions.py:positivity"]
    elif script == "sft.py":
        args = ["--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl", "--max-steps", "6",
                "--save-steps", "1", "--eval-dataset", "none", "--num-eval-generations", "0"]
    else:
        args = ["--model-name-or-path", sft_dir, "--dataset", task_dir / "preference_train.jsonl", "--max-steps", "6",
                "--save-steps", "1", "--eval-dataset", "none"]
        args += ["--num-eval-prompts", "0"] if script == "dpo.py" else ["--num-normalize-samples", "4"]
    proc = run_script(script, *args, *common_args, cwd=tmp_path, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "training diverged" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    files = tree_digest(out)
    assert {k: v for k, v in files.items() if not k.startswith("checkpoint")} == before
    if "checkpoint/training_state.pt" in files:  # checkpoints written before the divergence hold finite weights
        model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_the_rerun_resumes(signum, task_dir, model_dir, tmp_path):
    """SIGTERM (preemption) or Ctrl-C: the step finishes, a checkpoint is written, one line says how to resume, no
    traceback; the same command then resumes at that step and logs each step once."""
    args = ["--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl", "--eval-dataset", "none",
            "--output-dir", tmp_path / "out", "--per-device-train-batch-size", "8", "--save-steps", "1000",
            "--eval-steps", "1000", "--num-eval-generations", "0"]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "sft.py"), *map(str, args), "--max-steps", "400"],
                            cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"TQDM_DISABLE": "1"})
    wait_for_logged(tmp_path, "train/sft/loss", 3)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    step = int(stdout.split("stopped by ")[1].split("after step ")[1].split(";")[0])
    assert torch.load(tmp_path / "out" / "checkpoint" / "training_state.pt", weights_only=True)["step"] == step
    resumed = run_script("sft.py", *args, "--max-steps", str(step + 3), cwd=tmp_path)
    assert f"at step {step}" in resumed.stdout
    steps = [step for step, _ in read_metrics(tmp_path, "train/sft/loss")]
    assert steps == list(range(1, step + 4))  # each step once: what was logged after the checkpoint was dropped


@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "ppo_rlhf.py", "dpo.py", "grpo.py", "distill.py",
                                    "label.py"])
def test_ctrl_c_while_torch_loads_is_one_line(script, tmp_path):
    """Ctrl-C in the first seconds, while torch and transformers load (before any code of ours can catch it): one line,
    no traceback. The signal goes once torch's library is mapped into the process: past the handler, before the end of
    the imports (transformers' alone take seconds); later, the run's own handlers print the same line."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), "--help"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/maps") as f:
                if "libtorch_cpu" in f.read():
                    break
        except OSError:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and stderr.strip().splitlines() == ["interrupted"], stderr[-3000:]


def test_sampling_cuts_prompts_as_training_does(model_dir, monkeypatch):
    """A very long prompt (a 5 MB line) is cut to --max-prompt-length for the samples too, never fed whole."""
    from transformers import AutoTokenizer
    tokenizer = common.setup_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    widths = []
    real = sft.sample
    monkeypatch.setattr(sft, "sample", lambda m, ids, *a: widths.append(ids.shape[1]) or real(m, ids, *a))
    sft.sample_texts(model, tokenizer, ["the pasta was good " * 20_000], 16, 4, torch.device("cpu"))
    assert widths == [16]


def test_bad_files_stop_with_file_line_and_field(tmp_path):
    bad_utf8 = tmp_path / "bad.jsonl"
    bad_utf8.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not UTF-8 text \(byte 50 of the file\)"):
        read_jsonl(str(bad_utf8), "sft")
    errors = []
    assert len(read_jsonl(str(bad_utf8), "sft", errors)) == 1 and "line 2" in errors[0]  # skipped, as bad lines are
    gz = tmp_path / "data.jsonl.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00rest")
    with pytest.raises(DataError, match="gzip"):
        read_jsonl(str(gz), "sft")
    with pytest.raises(DataError, match="a folder"):
        read_jsonl(str(tmp_path), "sft")
    cases = {
        '{"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "yo"}]}':
            r"line 1: field 'messages', message 0: role 'usr' is not one of",
        '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "yo"}]}':
            r"message 0: content must be a non-empty string, got blank text",
        '{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "yo"}]}':
            r"message 0: content must be a non-empty string, got null",
        # a null field is no field, in JSONL as in Parquet (where a missing key reads as null)
        '{"prompt": null, "completion": "yo"}': r"line 1: missing field 'prompt' \(a sft record needs prompt, completion\)",
    }
    for line, message in cases.items():
        with pytest.raises(DataError, match=message):
            read_jsonl(write_jsonl(tmp_path / "case.jsonl", [line]), "sft")
    user, ok, no = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}, {
        "role": "assistant", "content": "no"}
    extra = {"chosen": [user, ok], "rejected": [user, no, user, no]}
    with pytest.raises(DataError, match="'rejected' must be the prompt turns and one assistant turn, got 3 turns"):
        read_jsonl(write_jsonl(tmp_path / "pairs.jsonl", [extra]), "preference")


def test_a_chat_template_that_refuses_a_conversation_is_a_data_error(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
                               "not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match="System role not supported"):
        common.encode_prompt(tokenizer, [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
                             64)


def test_a_model_that_cannot_load_is_one_line(task_dir, tmp_path):
    proc = run_script("sft.py", "--model-name-or-path", tmp_path / "no_such_model", "--dataset",
                      task_dir / "sft_train.jsonl", "--output-dir", tmp_path / "out", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot load a model or tokenizer"), proc.stderr
