"""The embedded "arithmetic" task: problems with checkable answers, offline and seeded, for RL against a verifier.

    python arithmetic_task.py                        # writes data/arithmetic/*.jsonl (same seed, same bytes)
    python sft.py --dataset data/arithmetic/sft_train.jsonl --eval-dataset data/arithmetic/sft_eval.jsonl
    python grpo.py --dataset data/arithmetic/prompts_train.jsonl --eval-dataset data/arithmetic/prompts_eval.jsonl \\
        --reward-fn arithmetic_task.py:verify --eval-reward-fn arithmetic_task.py:verify

A problem is one or two additions and subtractions of whole numbers from 0 to 9 ("Compute 7 + 5 - 8."), sized so that
both the embedded tiny model (after SFT) and SmolLM2-135M-Instruct start well above 0 and well below 100% (docs/
verifiable.md says how the size was chosen; --max-operand and --max-steps make it harder). The record's `answer` field
is the result, as text, and reaches the verifier as a keyword argument. The SFT demonstrations answer half the
problems with worked steps ("7 + 5 = 12. 12 - 8 = 4. The answer is 4.") and half directly ("The answer is 4.").
Held-out problems are never training problems.

`verify(prompt, response, answer)` returns 1.0 for a right final answer, 0.0 for a wrong one, and None when the
response holds no number it can read: the RL scripts count those (`parse_failures`) rather than score a silent 0.
"""

import json
import os
import random
import re
from dataclasses import dataclass

DATA_DIR = "data/arithmetic"


@dataclass
class Sizes:
    sft_train: int = 2500
    sft_eval: int = 100
    prompts_train: int = 1300
    prompts_eval: int = 200


def make_problem(rng: random.Random, max_operand: int = 9, max_steps: int = 2, min_steps: int = 1
                 ) -> tuple[str, int, list[str]]:
    """-> (the expression, its value, the worked steps): min_steps to max_steps operations, each + or -, on numbers
    from 0 to max_operand; left to right, as written."""
    numbers = [rng.randint(0, max_operand) for _ in range(rng.randint(min_steps, max_steps) + 1)]
    ops = [rng.choice("+-") for _ in numbers[1:]]
    value, steps = numbers[0], []
    for op, n in zip(ops, numbers[1:]):
        result = value + n if op == "+" else value - n
        steps.append(f"{value} {op} {n} = {result}.")
        value = result
    expression = " ".join([str(numbers[0])] + [f"{op} {n}" for op, n in zip(ops, numbers[1:])])
    return expression, value, steps


_NUMBER = re.compile(r"(?<![\w.)])[-+]?\d+(?:,\d{3})*(?:\.\d+)?")  # a sign only when unary ("-5", not "12-5")
_ANSWER = re.compile(r"answer\s*(?:is|:|=)\s*([-+]?)\s*(\d+(?:,\d{3})*(?:\.\d+)?)", re.IGNORECASE)


def parse_final_answer(text: str) -> float | None:
    """The final answer a response gives: the number after its last "answer is" (or "answer:"), else its last number;
    None when it has none. Reads signs ("-5", "\u2212 5" after "answer is"), thousands separators ("1,000"), and
    trailing punctuation ("34." is 34)."""
    text = text.replace("\u2212", "-")  # the minus sign some tokenizers and models write
    stated = _ANSWER.findall(text)
    if stated:
        sign, digits = stated[-1]
        return float(sign + digits.replace(",", ""))
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def verify(prompt, response: str, answer) -> float | None:
    """1.0 if the response's final answer equals the record's `answer`, 0.0 if it is another number, None if the
    response gives no number (counted as a parse failure by the RL scripts, scored 0)."""
    given = parse_final_answer(response)
    if given is None:
        return None
    return float(given == float(answer))


def generate(out_dir: str = DATA_DIR, seed: int = 0, sizes: Sizes = Sizes(), max_operand: int = 9,
             max_steps: int = 2, min_steps: int = 1) -> dict:
    """Write sft_train/sft_eval (prompt/completion/answer) and prompts_train/prompts_eval (prompt/answer) JSONL files;
    no held-out expression appears in training. Returns the row counts."""
    rng = random.Random(seed)
    seen, problems = set(), []
    total = sizes.sft_train + sizes.sft_eval + sizes.prompts_train + sizes.prompts_eval
    for _ in range(100 * total):  # a bound, not a hang, when the settings allow fewer distinct problems than asked
        if len(problems) == total:
            break
        expression, value, steps = make_problem(rng, max_operand, max_steps, min_steps)
        if expression not in seen:
            seen.add(expression)
            problems.append((expression, value, steps))
    if len(problems) < total:
        raise SystemExit(f"only {len(problems)} distinct problems found for {total} rows: lower --sizes, or raise "
                         "--max-operand or --max-steps")
    # shuffled before the split: in draw order, the rarer kinds (one operation: 200 distinct at 0-9) run out early,
    # and the first rows, the held-out ones, would hold far more of them than the training rows
    rng.shuffle(problems)
    held_out = sizes.sft_eval + sizes.prompts_eval
    eval_problems, train_problems = problems[:held_out], problems[held_out:]

    def sft_row(problem):
        expression, value, steps = problem
        worked = rng.random() < 0.5
        completion = " " + " ".join(steps) + f" The answer is {value}." if worked else f" The answer is {value}."
        return {"prompt": f"Compute {expression}.", "completion": completion, "answer": str(value)}

    def prompt_row(problem):
        return {"prompt": f"Compute {problem[0]}.", "answer": str(problem[1])}

    files = {"sft_train": [sft_row(p) for p in train_problems[: sizes.sft_train]],
             "prompts_train": [prompt_row(p) for p in train_problems[sizes.sft_train:]],
             "sft_eval": [sft_row(p) for p in eval_problems[: sizes.sft_eval]],
             "prompts_eval": [prompt_row(p) for p in eval_problems[sizes.sft_eval:]]}
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in files.items():
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to {os.path.join(out_dir, name)}.jsonl")
    return {name: len(rows) for name, rows in files.items()}


if __name__ == "__main__":
    import tyro

    tyro.cli(generate)
