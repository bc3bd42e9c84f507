"""The calculator task (calculator_task.py): seeded files whose demonstrations call the tool the way the rollout parses
calls, and a tiny chat model whose tokenizer keeps digits and the call's tags as tokens of their own."""

import filecmp
import json
import os

import pytest
from conftest import REPO

import calculator_task
from common import end_token_id, parse_tool_call, read_jsonl, tool_turn
from plumbing import load_tools


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("calculator")
    sizes = calculator_task.Sizes(sft_train=400, prompts_train=100, prompts_eval=50)
    counts = calculator_task.generate(str(out / "a"), str(out / "model"), seed=0, sizes=sizes)
    calculator_task.generate(str(out / "b"), "", seed=0, sizes=sizes)
    return out, counts


def test_files_are_seeded_disjoint_and_right(made):
    out, counts = made
    assert counts["prompts_train"] == 100 and counts["prompts_eval"] == 50
    for name in counts:  # same seed, same bytes
        assert filecmp.cmp(out / "a" / f"{name}.jsonl", out / "b" / f"{name}.jsonl", shallow=False)
    sft = [json.loads(line) for line in open(out / "a" / "sft_train.jsonl")]
    assert read_jsonl(str(out / "a" / "sft_train.jsonl"), "sft")  # the SFT reader takes them (tool turns included)
    prompts = read_jsonl(str(out / "a" / "prompts_train.jsonl"), "prompt")
    held_out = read_jsonl(str(out / "a" / "prompts_eval.jsonl"), "prompt")
    questions = {r["prompt"][0]["content"] for r in sft}
    assert len(questions) == 400 and not {r["prompt"] for r in held_out} & (questions | {r["prompt"] for r in prompts})
    for r in prompts + held_out:
        a, b = map(int, r["prompt"].removeprefix("Compute ").removesuffix(".").split(" * "))
        assert 10 <= a <= 99 and 10 <= b <= 99 and r["fields"]["answer"] == str(a * b)
    calls = 0
    for r in sft:
        turns = r["prompt"] + r["completion"]
        a, b = map(int, turns[0]["content"].removeprefix("Compute ").removesuffix(".").split(" * "))
        if turns[-1]["content"].startswith("<tool_call>"):  # a call: the one the rollout parses, to the right tool
            assert parse_tool_call(turns[-1]["content"]) == ("multiply", {"a": a, "b": b})
            calls += 1
        else:  # an answer: in the head, or read off the tool's turn right before it
            assert turns[-1]["content"] == f"The answer is {a * b}."
            assert len(turns) == 2 or (turns[2] == {"role": "tool", "content": str(calculator_task.multiply(a, b))})
    answered_with_tool = sum(len(r["prompt"]) == 3 for r in sft)
    assert calls == answered_with_tool and 0.4 < calls / (len(sft) - calls) < 0.6  # about half the problems


def test_the_chat_model_keeps_digits_and_calls_as_tokens(made):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, _ = made
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.embedded_tiny_model and model.config.vocab_size == len(tok)
    assert tok.convert_ids_to_tokens(end_token_id(tok)) == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    ids = tok("<tool_call>4042</tool_call>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and tok.decode(ids[1:5]) == "4042"  # a tag each, a digit each
    assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>4042</tool_call>"  # tags survive, so calls parse
    assert tok.decode(tool_turn(tok, "4042")) == "\n<|im_start|>tool\n4042<|im_end|>\n<|im_start|>assistant\n"
    assert list(load_tools((os.path.join(REPO, "calculator_task.py") + ":multiply",), tok)) == ["multiply"]  # its schema reads


def test_too_many_problems_stop_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="8100 distinct ones"):
        calculator_task.generate(str(tmp_path), "", sizes=calculator_task.Sizes(8000, 100, 100))
