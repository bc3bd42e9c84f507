"""The arithmetic task: the verifier reads final answers the way models write them, says when it cannot, and the
generated files hold what the stages read."""

import filecmp

import pytest
import torch

import arithmetic_task
from arithmetic_task import parse_final_answer, verify
from common import read_jsonl
from grpo import scored


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
