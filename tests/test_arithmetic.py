"""The arithmetic task: the verifier reads final answers the way models write them, says when it cannot, and the
generated files hold what the stages read."""

import filecmp
import json
import os

import pytest
import torch
from conftest import REPO, read_metrics, run_script, write_jsonl

import arithmetic_task
import reviews_task
from arithmetic_task import parse_final_answer, verify
from common import read_jsonl
from common import record_caller, scored
from plumbing import pass_rates


@pytest.mark.parametrize("text, expected", [
    ("The answer is 34.", 34), ("The answer is 34", 34), ("answer: 34!", 34), ("The Answer IS   34 .", 34),
    ("17 + 25 = 42. 42 - 8 = 34. The answer is 34.", 34),     # steps first: the stated answer wins
    ("The answer is 34. Check: 34 + 8 = 42.", 34),           # numbers after the stated answer do not count
    ("I think 12, then 19", 19),                              # no stated answer: the last number
    ("The answer is -5.", -5), ("The answer is - 5", -5), ("The answer is \u22125.", -5), ("= -7", -7),
    ("12-5 gives 7", 7), ("it is +3", 3),                     # a binary minus is not a sign
    ("The answer is 1,000.", 1000), ("The answer is 34.0", 34), ("The answer is 34.5", 34.5),
    ("The answer is 3 and the answer is 4.", 4),              # several stated: the last
    ("no idea", None), ("", None), ("The answer is", None), ("x2y", None),
])
def test_final_answers_are_parsed(text, expected):
    assert parse_final_answer(text) == expected


def test_verify_scores_right_wrong_and_unreadable():
    assert verify("Compute 2 + 3.", " The answer is 5.", "5") == 1.0
    assert verify("Compute 2 + 3.", " 2 + 3 = 5. The answer is 6.", "5") == 0.0
    assert verify("Compute 2 - 3.", " The answer is -1.", "-1") == 1.0
    assert verify("Compute 2 + 3.", " five", "5") is None


def test_unscorable_responses_are_counted_not_hidden():
    scores, failed = scored([1.0, None, 0.0, None], "cpu")
    assert scores.tolist() == [1.0, 0.0, 0.0, 0.0] and failed.tolist() == [False, True, False, True]
    assert failed.float().mean() == torch.tensor(0.5)


def test_generated_files_are_seeded_disjoint_and_readable(tmp_path):
    sizes = arithmetic_task.Sizes(sft_train=300, sft_eval=20, prompts_train=300, prompts_eval=40)
    counts = arithmetic_task.generate(str(tmp_path / "a"), seed=0, sizes=sizes)
    arithmetic_task.generate(str(tmp_path / "b"), seed=0, sizes=sizes)
    assert counts == {"sft_train": 300, "prompts_train": 300, "sft_eval": 20, "prompts_eval": 40}
    for name in counts:  # same seed, same bytes
        assert filecmp.cmp(tmp_path / "a" / f"{name}.jsonl", tmp_path / "b" / f"{name}.jsonl", shallow=False)
    sft = read_jsonl(str(tmp_path / "a" / "sft_train.jsonl"), "sft")
    prompts = read_jsonl(str(tmp_path / "a" / "prompts_train.jsonl"), "prompt")
    held_out = read_jsonl(str(tmp_path / "a" / "prompts_eval.jsonl"), "prompt")
    held_out += read_jsonl(str(tmp_path / "a" / "sft_eval.jsonl"), "prompt")
    assert not {r["prompt"] for r in held_out} & {r["prompt"] for r in sft + prompts}
    for r in prompts + held_out:  # every answer is right, and reaches reward functions as a field
        expression = r["prompt"].removeprefix("Compute ").removesuffix(".")
        assert int(r["fields"]["answer"]) == eval(expression)
    for r in sft:  # demonstrations end with the stated answer, which the verifier accepts
        assert r["completion"].endswith(".") and verify(r["prompt"], r["completion"], str(eval(
            r["prompt"].removeprefix("Compute ").removesuffix(".")))) == 1.0
    worked = sum("=" in r["completion"] for r in sft) / len(sft)
    assert 0.4 < worked < 0.6  # about half show their steps


def test_held_out_and_training_problems_come_from_one_distribution(tmp_path):
    """One-operation problems are few (200 at 0-9) and are used up by the first draws: the splits must still hold them
    in the same share (drawn in order, the held-out files held 40-50% of them and the training files 0-3%)."""
    arithmetic_task.generate(str(tmp_path))
    share = {}
    for name in ("sft_train", "sft_eval", "prompts_train", "prompts_eval"):
        records = read_jsonl(str(tmp_path / f"{name}.jsonl"), "prompt")
        share[name] = sum(r["prompt"].count(" + ") + r["prompt"].count(" - ") == 1 for r in records) / len(records)
    overall = 200 / 4100  # every one-operation problem is used, among 4,100 distinct ones
    for name, value in share.items():
        assert abs(value - overall) < 0.05, share


def test_settings_with_too_few_problems_stop_with_a_message(tmp_path):
    sizes = arithmetic_task.Sizes(sft_train=220, sft_eval=10, prompts_train=10, prompts_eval=10)  # 10 x 2 x 10 exist
    with pytest.raises(SystemExit, match="only 200 distinct problems found for 250 rows"):
        arithmetic_task.generate(str(tmp_path), sizes=sizes, max_operand=9, min_steps=1, max_steps=1)


def test_pass_rates_greedy_and_pass_at_k_by_hand():
    """Three problems; greedy gets the first right. Sampled 4 times each: problem 0 right 2 of 4, problem 1 right 1 of
    4 (and one unreadable), problem 2 never: pass@1 = 3/12, pass@4 = 2/3 (any right), greedy pass@1 = 1/3."""
    records = [{"prompt": f"Compute {a}.", "fields": {"answer": str(v)}} for a, v in [("1 + 1", 2), ("2 + 2", 4),
                                                                                       ("3 + 3", 6)]]
    greedy = [" The answer is 2.", " The answer is 5.", " The answer is 7."]
    sampled = {0: ["The answer is 2.", "3", "2", "1"], 1: ["no idea", "4", "5", "5"], 2: ["5", "7", "8", "9"]}
    calls = []

    def generate(indices, temperature):
        calls.append(temperature)
        if temperature == 0:
            return [greedy[i] for i in indices]
        seen = {}
        out = []
        for i in indices:  # the j-th time index i appears: its j-th sample
            out.append(sampled[i][seen.get(i, 0)])
            seen[i] = seen.get(i, 0) + 1
        return out

    judge = record_caller(verify)  # as the scripts call it: judge(prompt, response, fields)
    out, right = pass_rates(generate, judge, records, 4)
    assert calls == [0.0, None] and right.tolist() == [True, False, False]  # which greedy ones
    assert out["eval/pass@1_greedy"].item() == pytest.approx(1 / 3)
    assert out["eval/pass@1"].item() == pytest.approx(3 / 12)
    assert out["eval/pass@4"].item() == pytest.approx(2 / 3)
    assert set(pass_rates(generate, judge, records, 1)[0]) == {"eval/pass@1_greedy"}  # k 1: greedy only


def test_grpo_with_the_verifier_learns_to_answer(tokenizer, tmp_path):
    """SFT on one-operation problems (numbers 0 to 3) where every problem is demonstrated twice, once answered and once
    declined ("I am not sure.", which the verifier cannot read: None, a parse failure scored 0). The SFT model's greedy
    response declines; GRPO with the verifier as its only reward learns to answer: greedy accuracy on the problems rises
    by at least 20 points and the share of unreadable responses falls to near 0. (The same mechanism, choosing the way
    of answering that the verifier rewards, is what raised the embedded tiny model's held-out accuracy: docs/
    verifiable.md. This test model is too small to generalise to unseen problems, so it is scored on its own.)"""
    data = tmp_path / "arith"
    arithmetic_task.generate(str(data), seed=0, max_operand=3, min_steps=1, max_steps=1, sizes=arithmetic_task.Sizes(
        sft_train=28, sft_eval=4, prompts_train=0, prompts_eval=0))
    with open(data / "sft_train.jsonl") as f:
        problems = [{k: r[k] for k in ("prompt", "answer")} for r in map(json.loads, f)]
    demos = [dict(p, completion=c) for p in problems for c in (f" The answer is {p['answer']}.", " I am not sure.")]
    reviews_task.build_tiny_model(tokenizer, hidden_size=128, num_layers=2).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run_script("sft.py", "--model-name-or-path", tmp_path / "model", "--dataset", write_jsonl(tmp_path / "demos.jsonl",
               demos), "--eval-dataset", data / "sft_eval.jsonl", "--output-dir", tmp_path / "sft", "--max-steps", "200",
               "--learning-rate", "3e-3", "--per-device-train-batch-size", "16", "--eval-steps", "1000",
               "--num-eval-generations", "4", "--eval-reward-fn", "", cwd=tmp_path)
    (tmp_path / "rl").mkdir()
    verifier, prompts = f"{os.path.join(REPO, 'arithmetic_task.py')}:verify", write_jsonl(tmp_path / "p.jsonl", problems)
    run_script("grpo.py", "--sft-model-path", tmp_path / "sft", "--dataset", prompts, "--eval-dataset", prompts,
               "--reward-fn", verifier, "--eval-reward-fn", verifier, "--eval-pass-k", "1", "--num-eval-prompts", "28",
               "--response-length", "24", "--rollout-batch-size", "8", "--num-generations", "8", "--num-iterations",
               "20", "--learning-rate", "3e-4", "--eval-steps", "1000", "--output-dir", tmp_path / "rl" / "out",
               cwd=tmp_path / "rl")
    accuracy = [v for _, v in read_metrics(tmp_path / "rl", "eval/pass@1_greedy")]
    unreadable = [v for _, v in read_metrics(tmp_path / "rl", "objective/parse_failures")]
    assert accuracy[-1] >= accuracy[0] + 0.2, accuracy
    assert unreadable[0] > 0.2 and max(unreadable[-3:]) < 0.05, unreadable
