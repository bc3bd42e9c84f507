"""--bf16 is mixed precision: fp32 master weights and optimizer state, bf16 compute. A small learning rate must still
move the weights (pure bf16 weights cannot hold updates ~1e-5 of their size), and the losses must follow fp32's."""

import pytest
import torch
from conftest import read_metrics, run_script
from safetensors.torch import load_file


def stage(script, task_dir, model_dir, sft_dir, out):
    """Arguments for 10 optimizer steps at lr 1e-5, the model the stage starts from, and the loss it logs."""
    if script == "sft.py":
        return ["--model-name-or-path", model_dir, "--dataset", task_dir / "sft_train.jsonl", "--eval-dataset", "none",
                "--output-dir", out, "--max-steps", "10", "--per-device-train-batch-size", "8", "--num-samples", "0",
                "--num-eval-generations", "0", "--warmup-ratio", "0"], model_dir, "train/sft/loss"
    if script == "reward_model.py":
        return ["--model-name-or-path", sft_dir, "--dataset", task_dir / "preference_train.jsonl", "--eval-dataset",
                "none", "--output-dir", out, "--max-steps", "10", "--normalize-on", "none", "--warmup-ratio", "0"], \
            sft_dir, "train/rm/loss"
    return ["--sft-model-path", sft_dir, "--dataset", task_dir / "prompts_train.jsonl", "--eval-dataset", "none",
            "--output-dir", out, "--num-iterations", "1", "--num-ppo-epochs", "5", "--rollout-batch-size", "16",
            "--response-length", "8", "--num-eval-prompts", "4", "--reward-fn", "reward_functions.py:positivity",
            "--value-model", "shared"], sft_dir, "loss/policy_avg"


@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "ppo_rlhf.py"])
def test_bf16_keeps_fp32_master_weights(script, task_dir, model_dir, sft_dir, tmp_path):
    losses = {}
    for precision in ("bf16", "fp32"):
        if script == "ppo_rlhf.py" and precision == "fp32":
            continue  # its rollouts are sampled, so the two runs see different data: no loss to compare
        cwd = tmp_path / precision
        cwd.mkdir()
        args, start, metric = stage(script, task_dir, model_dir, sft_dir, cwd / "out")
        run_script(script, *args, "--learning-rate", "1e-5", *(["--bf16"] if precision == "bf16" else []), cwd=cwd)
        losses[precision] = [v for _, v in read_metrics(cwd, metric)]
    before, after = load_file(start / "model.safetensors"), load_file(tmp_path / "bf16" / "out" / "model.safetensors")
    # the backbone, for the RM; input embeddings aside: rows of tokens absent from 10 batches get no gradient in any
    # precision (the reward model has no tied output layer to give them one)
    shared = [k for k in before if k in after and before[k].shape == after[k].shape and "embed_tokens" not in k]
    assert all(after[k].dtype == torch.float32 for k in shared)  # the master weights are saved, not a bf16 copy
    changed = sum((after[k] != before[k]).sum().item() for k in shared) / sum(before[k].numel() for k in shared)
    assert changed > 0.9, changed
    if script == "ppo_rlhf.py":
        assert read_metrics(tmp_path / "bf16", "val/first_ratio_max_dev") == [(1, 0.0)]  # autocast is deterministic
    else:  # bf16 rounds each matmul to ~3 significant digits: the losses agree to 2%
        assert len(losses["bf16"]) == 10
        assert torch.allclose(torch.tensor(losses["bf16"]), torch.tensor(losses["fp32"]), rtol=0.02), losses
