"""The pieces of iterative RLHF: a reward model that continues training on several files, PPO from a later policy
with the SFT reference, hybrid and ensemble rewards, and iterate.py running two rounds unattended."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, read_metrics, run_script
from transformers import AutoModelForSequenceClassification

GOLD = os.path.join(REPO, "reviews_task.py") + ":gold_score"
ANNOTATE = os.path.join(REPO, "reviews_task.py") + ":annotate"


def rm_flags(sft_dir, task_dir, out, *extra):
    return ["--model-name-or-path", sft_dir, "--eval-dataset", task_dir / "preference_eval.jsonl", "--output-dir", out,
            "--num-normalize-samples", "16", "--normalize-response-length", "12", "--eval-reward-fn", "", *extra]


def ppo_flags(task_dir, sft_dir, out, *extra):
    return ["--sft-model-path", sft_dir, "--dataset", task_dir / "prompts_train.jsonl",
            "--eval-dataset", task_dir / "prompts_eval.jsonl", "--output-dir", out, "--rollout-batch-size", "16",
            "--response-length", "12", "--num-eval-prompts", "8", "--eval-steps", "1000", "--learning-rate", "1e-3",
            "--eval-reward-fn", "", *extra]


@pytest.fixture(scope="module")
def reward_models(sft_dir, task_dir, tmp_path_factory):
    """Two reward models of the tiny task, trained with different seeds."""
    out = tmp_path_factory.mktemp("ensemble")
    for seed in (1, 2):
        (out / f"logs{seed}").mkdir()
        run_script("reward_model.py", *rm_flags(sft_dir, task_dir, out / f"rm{seed}", "--dataset",
                                                task_dir / "preference_train.jsonl", "--max-steps", "12",
                                                "--seed", seed), cwd=out / f"logs{seed}")
    return out / "rm1", out / "rm2"


def test_reward_model_continues_from_a_reward_model_on_several_files(sft_dir, task_dir, reward_models, tmp_path):
    """--continue-from keeps the trained model, head and all: one step at a negligible learning rate leaves the head
    and the held-out accuracy as they were, where the default draws a fresh head; several --dataset files are read
    as one."""
    with open(task_dir / "preference_train.jsonl") as f:
        rows = f.readlines()
    (tmp_path / "a.jsonl").write_text("".join(rows[:200]))
    (tmp_path / "b.jsonl").write_text("".join(rows[200:320]))
    rm1, _ = reward_models
    trained = read_metrics(rm1.parent / "logs1", "eval/rm/accuracy")[-1][1]
    runs = {}
    for name, extra in [("continued", ["--continue-from", rm1]), ("fresh", [])]:
        (tmp_path / name).mkdir()
        proc = run_script("reward_model.py", *rm_flags(sft_dir, task_dir, tmp_path / name / "rm", "--dataset",
                                                       tmp_path / "a.jsonl", tmp_path / "b.jsonl", "--max-steps", "1",
                                                       "--learning-rate", "1e-12", *extra), cwd=tmp_path / name)
        assert "320 training pairs" in proc.stdout
        runs[name] = read_metrics(tmp_path / name, "eval/rm/accuracy")[-1][1]
    assert runs["continued"] == pytest.approx(trained, abs=1e-6)
    head = {name: AutoModelForSequenceClassification.from_pretrained(path).score.weight
            for name, path in [("trained", rm1), ("continued", tmp_path / "continued" / "rm"),
                               ("fresh", tmp_path / "fresh" / "rm")]}
    assert torch.allclose(head["continued"], head["trained"], atol=1e-6)
    assert not torch.allclose(head["fresh"], head["trained"], atol=1e-3)


def test_ensemble_and_hybrid_rewards_combine_as_documented(sft_dir, task_dir, reward_models, tmp_path):
    """Two reward models and a rule: score_rm = mean - k * std per response (so, in batch means, the mean of the
    members' means minus k times the mean std), score = score_rm + w * rule; each member scores as it does alone."""
    rm1, rm2 = reward_models
    rule = os.path.join(REPO, "reward_functions.py") + ":count_token_the"
    (tmp_path / "ensemble").mkdir()
    run_script("ppo_rlhf.py", *ppo_flags(task_dir, sft_dir, tmp_path / "ensemble" / "ppo", "--reward-model-path", rm1,
                                         rm2, "--ensemble-k", "1.5", "--reward-fn", rule, "--reward-fn-weights", "0.5",
                                         "--num-iterations", "1"), cwd=tmp_path / "ensemble")
    m = {k: read_metrics(tmp_path / "ensemble", k)[0][1] for k in
         ["objective/scores", "objective/score_rm", "objective/score_rm_0", "objective/score_rm_1", "objective/rm_std",
          "objective/score_count_token_the"]}
    assert m["objective/rm_std"] > 0
    assert m["objective/score_rm"] == pytest.approx(
        (m["objective/score_rm_0"] + m["objective/score_rm_1"]) / 2 - 1.5 * m["objective/rm_std"], abs=1e-5)
    assert m["objective/scores"] == pytest.approx(m["objective/score_rm"] + 0.5 * m["objective/score_count_token_the"],
                                                  abs=1e-5)
    (tmp_path / "single").mkdir()
    run_script("ppo_rlhf.py", *ppo_flags(task_dir, sft_dir, tmp_path / "single" / "ppo", "--reward-model-path", rm1,
                                         "--num-iterations", "1"), cwd=tmp_path / "single")
    assert read_metrics(tmp_path / "single", "objective/scores")[0][1] == pytest.approx(m["objective/score_rm_0"],
                                                                                          abs=1e-5)
    assert not read_metrics(tmp_path / "single", "objective/rm_std")  # one reward model: no parts logged

    # PPO from a later policy: the SFT model stays the reference, so the KL at the iteration-0 evaluation is above 0
    # (exactly 0 from the SFT model, as in the run above)
    (tmp_path / "from_ppo").mkdir()
    run_script("ppo_rlhf.py", *ppo_flags(task_dir, sft_dir, tmp_path / "from_ppo" / "ppo", "--reward-model-path", rm1,
                                         "--num-iterations", "1", "--init-policy-path", tmp_path / "ensemble" / "ppo"),
               cwd=tmp_path / "from_ppo")
    assert read_metrics(tmp_path / "single", "eval/kl")[0] == (0, 0)
    assert read_metrics(tmp_path / "from_ppo", "eval/kl")[0][1] > 0.05


def test_iterate_runs_two_rounds_unattended_and_resumes(sft_dir, task_dir, reward_models, tmp_path):
    """iterate.py: round 0 and two rounds of label -> reward model on all labels -> PPO from the last policy, with the
    simulated annotator; rounds.jsonl has each round's gold score; rerun, it runs no stage again."""
    rm1, _ = reward_models
    flags = ["--out-dir", tmp_path / "iter", "--sft-model-path", sft_dir, "--reward-model-path", rm1,
             "--preference-data", task_dir / "preference_train.jsonl", "--prompts", task_dir / "prompts_train.jsonl",
             "--annotator", ANNOTATE, "--rounds", "2", "--num-label-prompts", "24", "--label-passes", "1",
             "--ppo-iterations", "2",
             f"--ppo-args=--rollout-batch-size 16 --response-length 12 --num-eval-prompts 8 --learning-rate 1e-3 "
                           f"--eval-dataset {task_dir / 'prompts_eval.jsonl'} --eval-reward-fn {GOLD}",
             "--rm-args=--max-steps 4 --num-normalize-samples 16 --normalize-response-length 12 --eval-reward-fn '' "
                          f"--eval-dataset {task_dir / 'preference_eval.jsonl'}",
             "--label-args=--response-length 12 --batch-size 8"]
    first = run_script("iterate.py", *flags, cwd=tmp_path)
    with open(tmp_path / "iter" / "rounds.jsonl") as f:
        rounds = [json.loads(line) for line in f]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(-3 < r["eval/gold_score"] < 2 and "eval/stutter_rate" in r for r in rounds)
    for r in (1, 2):
        with open(tmp_path / "iter" / f"round_{r}" / "labels_0.jsonl") as f:
            assert len(f.readlines()) > 5
        with open(tmp_path / "iter" / f"round_{r}" / "reward_model" / "args.json") as f:
            rm_args = json.load(f)
        assert len(rm_args["dataset"]) == 1 + r  # the initial labels and every round's
        assert rm_args["continue_from"] == str(rm1 if r == 1 else tmp_path / "iter" / "round_1" / "reward_model")
        with open(tmp_path / "iter" / f"round_{r}" / "ppo" / "args.json") as f:
            ppo_args = json.load(f)
        assert ppo_args["init_policy_path"] == str(tmp_path / "iter" / f"round_{r - 1}" / "ppo")
        assert ppo_args["sft_model_path"] == str(sft_dir)
        assert ppo_args["reward_model_path"] == [str(tmp_path / "iter" / f"round_{r}" / "reward_model")]
    again = run_script("iterate.py", *flags, cwd=tmp_path)
    assert "$ python ppo_rlhf.py" in first.stdout and "$ python reward_model.py" in first.stdout
    assert "$ python ppo_rlhf.py" not in again.stdout and "$ python reward_model.py" not in again.stdout


def test_iterate_checks_its_flags_first_and_passes_a_stop_on(tmp_path):
    """An unbalanced quote in --ppo-args is one line before any round; a SIGTERM sent to iterate.py reaches the stage it
    runs, which gets to checkpoint (here a stand-in that records the signal), instead of dying with its parent."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "iterate.py"), "--ppo-args", "--kl-coef '0.1"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--ppo-args" in proc.stderr
    stage = tmp_path / "stage.py"
    stage.write_text("import signal, sys, time\n"
                     "def stop(*_):\n    open(sys.argv[1] + '/checkpointed', 'w').close()\n    sys.exit(143)\n"
                     "signal.signal(signal.SIGTERM, stop)\nopen(sys.argv[1] + '/started', 'w').close()\n"
                     "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {REPO!r}); import iterate; "
                               f"sys.exit(iterate.wait_for([sys.executable, {str(stage)!r}, {str(tmp_path)!r}]))"])
    while not (tmp_path / "started").exists() and parent.poll() is None:
        time.sleep(0.05)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 143 and (tmp_path / "checkpointed").exists()
