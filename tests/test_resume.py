"""An interrupted run, started again with the same command, continues from its checkpoint and gives the same numbers
as a run that was never interrupted (CPU, same seed)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, read_metrics, run_script


def stage_args(script, task_dir, model_dir, sft_dir, out, variant=""):
    if script == "sft.py":
        return ["--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl", "--eval-dataset",
                task_dir / "sft_eval.jsonl", "--output-dir", out, "--per-device-train-batch-size", "16",
                "--max-steps", "30", "--save-steps", "10", "--eval-steps", "5", "--num-eval-generations", "4",
                "--eval-reward-fn", ""], "train/sft/loss"
    if script == "reward_model.py":  # the default normalisation samples the SFT policy after training
        return ["--model-name-or-path", sft_dir, "--dataset", task_dir / "preference_train.jsonl", "--eval-dataset",
                task_dir / "preference_eval.jsonl", "--output-dir", out, "--per-device-train-batch-size", "16",
                "--max-steps", "30", "--save-steps", "10", "--eval-steps", "5", "--num-normalize-samples", "64",
                "--eval-reward-fn", ""], "train/rm/loss"
    if script == "dpo.py":
        return ["--model-name-or-path", sft_dir, "--dataset", task_dir / "preference_train.jsonl", "--eval-dataset",
                task_dir / "preference_eval.jsonl", "--eval-prompts", task_dir / "prompts_eval.jsonl", "--output-dir", out,
                "--max-steps", "30", "--save-steps", "10", "--eval-steps", "5", "--num-eval-prompts", "4",
                "--response-length", "8", "--eval-reward-fn", ""], "train/dpo/loss"
    if script == "grpo.py":  # off-policy minibatches and a KL term: the old-log-prob and reference passes too
        return ["--sft-model-path", sft_dir, "--dataset", task_dir / "prompts_train.jsonl", "--eval-dataset",
                task_dir / "prompts_eval.jsonl", "--output-dir", out, "--rollout-batch-size", "4", "--num-generations",
                "4", "--response-length", "8", "--num-iterations", "9", "--save-steps", "3", "--eval-steps", "2",
                "--num-eval-prompts", "4", "--reward-fn", "reward_functions.py:positivity", "--learning-rate", "1e-3",
                "--eval-reward-fn", "", "--num-mini-batches", "2", "--kl-coef", "0.05"], "loss/policy"
    return ["--sft-model-path", sft_dir, "--dataset", task_dir / "prompts_train.jsonl", "--eval-dataset",
            task_dir / "prompts_eval.jsonl", "--output-dir", out, "--rollout-batch-size", "8", "--response-length",
            "8", "--num-iterations", "9", "--save-steps", "3", "--eval-steps", "2", "--num-eval-prompts", "4",
            "--reward-fn", "reward_functions.py:positivity", "--learning-rate", "1e-3", "--eval-reward-fn", "",
            "--value-model", variant.removesuffix("+lora"), *(["--lora-r", "8"] if variant.endswith("+lora") else [])
            ], "loss/policy_avg"


def logged_after(cwd, metric, step) -> bool:
    """Has the run under cwd logged `metric` for a step after `step`?"""
    try:
        return any(s > step for s, _ in read_metrics(cwd, metric))
    except (OSError, ValueError):  # no log yet, or a line being written
        return False


@pytest.mark.parametrize("script, variant", [("sft.py", ""), ("reward_model.py", ""), ("ppo_rlhf.py", "separate"),
                                             ("ppo_rlhf.py", "shared"), ("dpo.py", ""), ("grpo.py", ""),
                                             ("ppo_rlhf.py", "separate+lora")])  # LoRA: base + adapters, value head
def test_interrupted_run_resumes_where_it_stopped(script, variant, task_dir, model_dir, sft_dir, tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "x").mkdir()
    args, metric = stage_args(script, task_dir, model_dir, sft_dir, tmp_path / "ref" / "out", variant)
    run_script(script, *args, cwd=tmp_path / "ref")
    reference = dict(read_metrics(tmp_path / "ref", metric))

    args, _ = stage_args(script, task_dir, model_dir, sft_dir, tmp_path / "x" / "out", variant)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=tmp_path / "x",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "x" / "out" / "checkpoint" / "training_state.pt"
    first_checkpoint = 3 if script in ("ppo_rlhf.py", "grpo.py") else 10
    while proc.poll() is None and not (state.exists() and logged_after(tmp_path / "x", metric, first_checkpoint)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # as abrupt as a power cut, after the run logged past its checkpoint
    proc.wait()
    assert state.exists(), "the run finished before a checkpoint was seen"
    resumed = run_script(script, *args, cwd=tmp_path / "x")
    assert "resuming" in resumed.stdout
    logged = read_metrics(tmp_path / "x", metric)
    assert [step for step, _ in logged] == sorted(reference)  # every step once: what was logged after the checkpoint
    # and before the kill is dropped when the run resumes
    for step, value in logged:
        assert abs(value - reference[step]) < 1e-5, (step, value, reference[step])
    # what follows training draws from the random generators too (the reward model's normalisation samples the SFT
    # policy; PPO's held-out evaluation samples the policy): it must come out the same
    if script == "reward_model.py":
        offsets = [json.load(open(tmp_path / run / "out" / "config.json"))["reward_offset"] for run in ("ref", "x")]
        assert offsets[0] == pytest.approx(offsets[1], abs=1e-6), offsets
    if script in ("ppo_rlhf.py", "grpo.py"):
        assert read_metrics(tmp_path / "ref", "eval/scores")[-1] == read_metrics(tmp_path / "x", "eval/scores")[-1]
    if script == "dpo.py":  # the final evaluation samples the policy
        assert read_metrics(tmp_path / "ref", "eval/kl")[-1] == read_metrics(tmp_path / "x", "eval/kl")[-1]
