"""torchrun: the same scripts on several processes train one model. On the CPU with gloo and 2 processes: a step on
2 x B examples equals one process's step on 2B, PPO's statistics are global, a killed run resumes exactly, --bf16
under FSDP2 keeps fp32 master weights, and --gradient-checkpointing changes no number."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, read_metrics, run_script, run_torchrun, wait_for_logged
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification


def one_step(script, task_dir, model_dir, sft_dir, out, batch):
    """One optimizer step on `batch` examples per process, and the loss it logs."""
    if script.startswith("sft.py"):  # sft.py+lora: LoRA adapters, the saved model merged
        return ["--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl", "--eval-dataset", "none",
                "--output-dir", out, "--max-steps", "1", "--per-device-train-batch-size", batch, "--num-samples", "0",
                "--num-eval-generations", "0", *(["--lora-r", "8"] if script.endswith("+lora") else [])
                ], model_dir, "train/sft/loss"
    return ["--model-name-or-path", sft_dir, "--dataset", task_dir / "preference_train.jsonl", "--eval-dataset",
            "none", "--output-dir", out, "--max-steps", "1", "--per-device-train-batch-size", batch, "--normalize-on",
            "none"], sft_dir, "train/rm/loss"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "sft.py+lora"])
def test_two_processes_step_like_one_with_twice_the_batch(script, strategy, task_dir, model_dir, sft_dir, tmp_path):
    """Each process takes its half of the global batch and the loss is normalised by the global count (tokens,
    pairs), so the step is the one-process step on the whole batch: the same loss to 1e-6, the same update to 0.1% of
    its size (summation order differs, and Adam's first step, lr * g / |g|, magnifies that where g is about 0)."""
    for name, launch, batch in (("one", run_script, 16), ("two", run_torchrun, 8)):
        (tmp_path / name).mkdir()
        args, start, metric = one_step(script, task_dir, model_dir, sft_dir, tmp_path / name / "out", batch)
        launch(script.removesuffix("+lora"), *args, *(["--strategy", strategy] if name == "two" else []),
               cwd=tmp_path / name)
    (loss_one,), (loss_two,) = (read_metrics(tmp_path / name, metric) for name in ("one", "two"))
    assert abs(loss_one[1] - loss_two[1]) < 1e-6, (loss_one, loss_two)
    before = load_file(start / "model.safetensors")
    one, two = (load_file(tmp_path / name / "out" / "model.safetensors") for name in ("one", "two"))
    assert set(one) == set(two)  # FSDP2's gathered copy keeps tied weights tied, as save_pretrained expects
    update = sum(((one[k] - before[k]) ** 2).sum() for k in before if k in one) ** 0.5
    gap = sum(((one[k] - two[k]) ** 2).sum() for k in one) ** 0.5
    assert update > 0 and gap / update < 1e-3, (gap, update)


def ppo_args(task_dir, sft_dir, out, *extra):
    return ["--sft-model-path", sft_dir, "--dataset", task_dir / "prompts_train.jsonl", "--eval-dataset",
            task_dir / "prompts_eval.jsonl", "--output-dir", out, "--rollout-batch-size", "8", "--response-length", "8",
            "--num-eval-prompts", "4", "--reward-fn", "reward_functions.py:positivity", "--eval-reward-fn", "",
            "--learning-rate", "1e-3", *extra]


@pytest.mark.parametrize("strategy, value_model", [("ddp", "shared"), ("fsdp", "separate"), ("ddp", "separate+lora")])
def test_ppo_on_two_processes(strategy, value_model, task_dir, sft_dir, tmp_path):
    """separate+lora: LoRA on policy and value model, the reference the policy with its adapters off."""
    lora = ["--lora-r", "8"] if value_model.endswith("+lora") else []
    value_model = value_model.removesuffix("+lora")
    run_torchrun("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, tmp_path / "out", "--num-iterations", "2", "--strategy",
                                          strategy, "--value-model", value_model, *lora), cwd=tmp_path)
    # nothing is updated before the first minibatch: its ratio is exactly 1 on every process (the logged figure is
    # the largest deviation over processes)
    assert read_metrics(tmp_path, "val/first_ratio_max_dev") == [(1, 0.0), (2, 0.0)]
    assert [v for _, v in read_metrics(tmp_path, "charts/episodes")] == [16, 32]  # 8 prompts x 2 processes
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    if value_model == "separate":
        assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "value_model").config.num_labels == 1
    else:
        assert set(load_file(tmp_path / "out" / "value_head.safetensors")) == {"linear.weight", "linear.bias"}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_grpo_on_two_processes(strategy, task_dir, sft_dir, tmp_path):
    """grpo.py under torchrun with off-policy minibatches and a KL term in the loss: the first minibatch repeats the
    rollout's log-probs on every process, the KL starts at 0, each process answers its own prompts."""
    run_torchrun("grpo.py", "--sft-model-path", sft_dir, "--dataset", task_dir / "prompts_train.jsonl", "--eval-dataset",
                 task_dir / "prompts_eval.jsonl", "--output-dir", tmp_path / "out", "--rollout-batch-size", "2",
                 "--num-generations", "4", "--response-length", "8", "--num-iterations", "2", "--num-eval-prompts", "4",
                 "--reward-fn", "reward_functions.py:positivity", "--eval-reward-fn", "", "--num-mini-batches", "2",
                 "--kl-coef", "0.1", "--strategy", strategy, cwd=tmp_path)
    assert read_metrics(tmp_path, "val/first_ratio_max_dev") == [(1, 0.0), (2, 0.0)]
    assert read_metrics(tmp_path, "objective/kl")[0] == (1, 0.0)
    assert [v for _, v in read_metrics(tmp_path, "charts/episodes")] == [16, 32]  # 2 prompts x 4 x 2 processes
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


STATISTICS_WORKER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from grpo import group_advantages
from ppo_rlhf import masked_whiten
dist.init_process_group("gloo")
rank = dist.get_rank()
data = torch.load({data!r})
half = slice(rank * 6, (rank + 1) * 6)  # this process's share of the rollout (3 groups of 2 for GRPO's)
torch.save({{"whitened": masked_whiten(data["advantages"][half], data["mask"][half]),
             "grpo": group_advantages(data["scores"][half], 2, "grpo", "batch"),
             "reinforce_pp": group_advantages(data["scores"][half], 2, "reinforce_pp", "batch")}},
           os.path.join({out!r}, f"statistics_{{rank}}.pt"))
dist.destroy_process_group()
"""


def test_batch_statistics_are_those_of_every_process(tmp_path):
    """Each process whitens its share of a PPO rollout, and scales its share of GRPO's advantages ('batch' scaling,
    REINFORCE++), with the statistics of the whole batch: the halves put together are what one process makes of it."""
    from grpo import group_advantages
    from ppo_rlhf import masked_whiten

    torch.manual_seed(0)
    advantages = torch.cat([torch.randn(6, 5) * 3 + 2, torch.randn(6, 5) * 0.5 - 1])  # the halves differ in scale
    mask = (torch.rand(12, 5) < 0.8).float()
    scores = torch.cat([50 + torch.randn(6), 50 + 0.1 * torch.randn(6)])  # offset, and a spread that differs by half
    torch.save({"advantages": advantages, "mask": mask, "scores": scores}, tmp_path / "data.pt")
    worker = tmp_path / "worker.py"
    worker.write_text(STATISTICS_WORKER.format(repo=REPO, data=str(tmp_path / "data.pt"), out=str(tmp_path)))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker)],
                   check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    halves = [torch.load(tmp_path / f"statistics_{r}.pt") for r in (0, 1)]
    two = torch.cat([h["whitened"] for h in halves])
    one = masked_whiten(advantages, mask)
    assert torch.allclose(two, one, atol=1e-6)
    per_process = torch.cat([masked_whiten(advantages[:6], mask[:6]), masked_whiten(advantages[6:], mask[6:])])
    assert not torch.allclose(two, per_process, atol=1e-2)  # the test can tell global from per-process statistics
    for advantage in ("grpo", "reinforce_pp"):
        two = torch.cat([h[advantage] for h in halves])
        one = group_advantages(scores, 2, advantage, "batch")
        assert torch.allclose(two, one, atol=1e-4), advantage
        per_process = torch.cat([group_advantages(scores[:6], 2, advantage, "batch"),
                                 group_advantages(scores[6:], 2, advantage, "batch")])
        assert not torch.allclose(two, per_process, atol=1e-2), advantage


FULL_DISK_WORKER = """
import errno, os, sys, torch
sys.path.insert(0, {repo!r})
from transformers import AutoModelForCausalLM
import plumbing
rank, world_size, device = plumbing.init_distributed("cpu")
model = AutoModelForCausalLM.from_pretrained({model!r})
parallel = plumbing.distribute([model], "ddp", False)
optimizer = torch.optim.AdamW(parallel.parameters(), lr=1e-3)
makedirs = os.makedirs
def full(path, *args, **kwargs):  # the disk fills as process 0 writes the checkpoint's model
    if rank == 0 and str(path).endswith("checkpoint.tmp"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return makedirs(path, *args, **kwargs)
os.makedirs = full
try:
    plumbing.save_model(os.path.join({out!r}, "checkpoint"), None, {{}}, ("", model),
                        training=({{"step": 1}}, parallel, optimizer))
except SystemExit as e:
    open(os.path.join({out!r}, f"exit_{{rank}}"), "w").write(str(e))
    raise
"""


def test_a_full_disk_in_a_torchrun_checkpoint_is_one_line_in_every_process(model_dir, tmp_path):
    """Process 0 runs out of disk while writing a checkpoint: every process stops with one line (0: the disk is full,
    1: the save failed in another process), none with a traceback from a collective left waiting."""
    worker = tmp_path / "worker.py"
    worker.write_text(FULL_DISK_WORKER.format(repo=REPO, model=str(model_dir), out=str(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker)], capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                          timeout=300)
    workers = proc.stderr.split("failed (exitcode")[0]  # what follows is torchrun's own report of a failed worker
    assert proc.returncode != 0 and "error: the disk is full" in workers and "Traceback" not in workers, workers[-3000:]
    assert (tmp_path / "exit_0").read_text().startswith("error: the disk is full")
    assert "failed in another process" in (tmp_path / "exit_1").read_text()
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "checkpoint").exists()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except OSError:  # gone meanwhile, or not a process
            pass
    return found


def test_two_process_run_killed_and_resumed(task_dir, sft_dir, tmp_path):
    """FSDP2: the optimizer's shards go through torch.distributed.checkpoint and every process keeps its own random
    generators, so a 2-process PPO run killed after a checkpoint continues with the losses of one never stopped."""
    args = ppo_args(task_dir, sft_dir, "out", "--num-iterations", "6", "--save-steps", "2", "--eval-steps", "3",
                    "--strategy", "fsdp", "--value-model", "separate")
    (tmp_path / "ref").mkdir()
    (tmp_path / "x").mkdir()
    run_torchrun("ppo_rlhf.py", *args, cwd=tmp_path / "ref")
    reference = dict(read_metrics(tmp_path / "ref", "loss/policy_avg"))
    proc = run_torchrun("ppo_rlhf.py", *args, cwd=tmp_path / "x", popen=True)
    state = tmp_path / "x" / "out" / "checkpoint" / "training_state.pt"
    while not state.exists() and proc.poll() is None:
        time.sleep(0.02)
    for pid in [proc.pid, *children(proc.pid)]:  # torchrun and both workers (in sessions of their own), at once
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run finished before a checkpoint was seen"
    shutil.copytree(tmp_path / "x" / "out", tmp_path / "one" / "out")
    resumed = run_torchrun("ppo_rlhf.py", *args, cwd=tmp_path / "x")
    assert "resuming" in resumed.stdout
    logged = read_metrics(tmp_path / "x", "loss/policy_avg")
    assert set(dict(logged)) == set(reference)
    for step, value in logged:
        assert abs(value - reference[step]) < 1e-5, (step, value, reference[step])
    one_process = run_script("ppo_rlhf.py", *args, cwd=tmp_path / "one", check=False)  # its data shares would differ
    assert one_process.returncode != 0 and "written by 2 process(es), this run has 1" in one_process.stderr


def test_bf16_under_fsdp_keeps_fp32_master_weights(task_dir, model_dir, tmp_path):
    """FSDP2's MixedPrecisionPolicy: bf16 copies for compute, fp32 shards for AdamW, so lr 1e-5 still moves them."""
    run_torchrun("sft.py", "--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl", "--eval-dataset",
                 "none", "--output-dir", tmp_path / "out", "--max-steps", "10", "--per-device-train-batch-size", "4",
                 "--num-samples", "0", "--num-eval-generations", "0", "--warmup-ratio", "0", "--learning-rate", "1e-5",
                 "--bf16", "--strategy", "fsdp", cwd=tmp_path)
    before, after = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    shared = [k for k in before if "embed_tokens" not in k]  # rows of absent tokens get no gradient in any precision
    assert all(after[k].dtype == torch.float32 for k in shared)
    changed = sum((after[k] != before[k]).sum().item() for k in shared) / sum(before[k].numel() for k in shared)
    assert changed > 0.9, changed
    losses = [v for _, v in read_metrics(tmp_path, "train/sft/loss")]
    assert len(losses) == 10 and all(0 < v < 20 for v in losses)


def test_gradient_checkpointing_changes_no_number(task_dir, sft_dir, tmp_path):
    """--gradient-checkpointing recomputes the policy's and value model's activations in backward: PPO's losses are
    the same, and the forward keeps a fraction of what it kept for backward."""
    for name in ("plain", "checkpointed"):
        (tmp_path / name).mkdir()
        run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, "out", "--num-iterations", "1", "--value-model", "separate",
                                            *(["--gradient-checkpointing"] if name == "checkpointed" else [])),
                   cwd=tmp_path / name)
    for metric in ("loss/policy_avg", "loss/value_avg"):
        assert read_metrics(tmp_path / "plain", metric) == pytest.approx(read_metrics(tmp_path / "checkpointed", metric),
                                                                         abs=1e-6)
    saved = {}
    for name in ("plain", "checkpointed"):  # what the forward keeps for backward, with the scripts' call
        model = AutoModelForCausalLM.from_pretrained(sft_dir).train()
        if name == "checkpointed":
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss = model(input_ids=torch.arange(5, 69)[None], use_cache=False).logits.sum()
        loss.backward()
        saved[name] = sum(sizes)
    assert saved["checkpointed"] < saved["plain"] / 3, saved


def test_workers_checkpoint_and_stop_when_their_launcher_is_killed(task_dir, model_dir, tmp_path):
    """SIGKILL of torchrun itself: its workers are told (a SIGTERM, PR_SET_PDEATHSIG), finish their step, write a
    checkpoint together and exit, instead of training on beside a rerun; the rerun resumes from that checkpoint."""
    args = ["--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl", "--eval-dataset", "none",
            "--output-dir", "out", "--per-device-train-batch-size", "32", "--max-steps", "100000", "--save-steps", "1000",
            "--eval-steps", "1000", "--num-eval-generations", "0"]
    proc = run_torchrun("sft.py", *args, cwd=tmp_path, popen=True)
    wait_for_logged(tmp_path, "train/sft/loss", 3)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 120

    def alive(pid):  # a process that has not exited (a zombie has: it waits only to be reaped)
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    while time.time() < deadline and any(map(alive, workers)):
        time.sleep(0.1)
    assert not any(map(alive, workers)), "the workers ran on after their launcher died"
    step = torch.load(tmp_path / "out" / "checkpoint" / "training_state.pt", weights_only=True)["step"]
    assert step >= 3
    resumed = run_torchrun("sft.py", *args[:-8], "--max-steps", str(step + 2), *args[-6:], cwd=tmp_path)
    assert f"resuming out/checkpoint at step {step}" in resumed.stdout
