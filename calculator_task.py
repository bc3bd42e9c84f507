"""The embedded "calculator" task: products of two-digit numbers, which a tiny model cannot work out in its head and can
read off a tool, for GRPO with tool calls inside its rollouts (docs/tools.md).

    python calculator_task.py        # writes data/calculator/*.jsonl and models/tiny-chat (same seed, same bytes)
    python sft.py --model-name-or-path models/tiny-chat --dataset data/calculator/sft_train.jsonl \\
        --eval-dataset none --num-epochs 20 --output-dir models/sft_calc
    python grpo.py --sft-model-path models/sft_calc --dataset data/calculator/prompts_train.jsonl \\
        --eval-dataset data/calculator/prompts_eval.jsonl --reward-fn calculator_task.py:verify \\
        --eval-reward-fn calculator_task.py:verify --tools calculator_task.py:multiply

A problem is "Compute 47 * 86." with `answer` "4042". The SFT demonstrations answer a share of the problems
(`tool_share`) with a call, `<tool_call>{"name": "multiply", "arguments": {"a": 47, "b": 86}}</tool_call>`, then, in a
second row whose prompt holds the call and the tool's turn, "The answer is 4042."; the others answer directly (the
right product, which the tiny model can only guess at). Held-out problems are never training problems.

The model folder is the embedded tiny Llama with a ChatML chat template, one token per digit (copying a number from the
tool's turn is then copying digits), and `<tool_call>` / `</tool_call>` as tokens of their own (as Qwen's tokenizers
have them). `verify` is arithmetic_task's: the final answer, as a number, against the record's `answer`.
"""

import json
import os
import random
from dataclasses import dataclass

from arithmetic_task import verify  # noqa: F401  (the reward function: `calculator_task.py:verify`)

DATA_DIR = "data/calculator"
MODEL_DIR = "models/tiny-chat"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


@dataclass
class Sizes:
    sft_train: int = 3000
    prompts_train: int = 1000
    prompts_eval: int = 200


def question(a: int, b: int) -> str:
    return f"Compute {a} * {b}."


def call(a: int, b: int) -> str:
    return "<tool_call>" + json.dumps({"name": "multiply", "arguments": {"a": a, "b": b}}) + "</tool_call>"


def generate(out_dir: str = DATA_DIR, model_dir: str = MODEL_DIR, seed: int = 0, sizes: Sizes = Sizes(),
             tool_share: float = 0.5, low: int = 10, high: int = 99) -> dict:
    """Write sft_train (conversational prompt/completion), prompts_train and prompts_eval (prompt/answer) JSONL files,
    and the tiny chat model to start from (`model_dir`, '' for none). Returns the row counts."""
    rng = random.Random(seed)
    total = sizes.sft_train + sizes.prompts_train + sizes.prompts_eval
    if total > (high - low + 1) ** 2:
        raise SystemExit(f"{total} problems asked, {(high - low + 1) ** 2} distinct ones from {low} to {high}")
    pairs = rng.sample([(a, b) for a in range(low, high + 1) for b in range(low, high + 1)], total)
    held_out, train = pairs[: sizes.prompts_eval], pairs[sizes.prompts_eval:]
    sft = []
    for a, b in train[: sizes.sft_train]:
        user, answer = {"role": "user", "content": question(a, b)}, f"The answer is {a * b}."
        if rng.random() < tool_share:  # the call; then, the tool's turn in the prompt, the answer read off it
            asked = {"role": "assistant", "content": call(a, b)}
            sft.append({"prompt": [user], "completion": [asked]})
            sft.append({"prompt": [user, asked, {"role": "tool", "content": str(a * b)}],
                        "completion": [{"role": "assistant", "content": answer}]})
        else:
            sft.append({"prompt": [user], "completion": [{"role": "assistant", "content": answer}]})
    rng.shuffle(sft)
    files = {"sft_train": sft,
             "prompts_train": [{"prompt": question(a, b), "answer": str(a * b)} for a, b in train[sizes.sft_train:]],
             "prompts_eval": [{"prompt": question(a, b), "answer": str(a * b)} for a, b in held_out]}
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in files.items():
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to {os.path.join(out_dir, name)}.jsonl")
    if model_dir:
        build_chat_model([m["content"] for row in sft for m in row["prompt"] + row["completion"]], model_dir)
    return {name: len(rows) for name, rows in files.items()}


def build_chat_model(texts: list[str], out_dir: str, hidden_size: int = 256, num_layers: int = 4) -> None:
    """The embedded tiny Llama (random init) with a tokenizer trained on `texts`: digits one token each, ChatML's
    <|im_start|> and <|im_end|> special (<|im_end|> ends a turn), <tool_call> and </tool_call> plain tokens of their
    own (not special: a decode that skips special tokens keeps them), and a distinct pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from reviews_task import build_tiny_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sorted(set(texts + ["user", "assistant", "tool", "system"])), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<pad>", padding_side="right")
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    tokenizer.chat_template = CHATML
    model = build_tiny_model(tokenizer, hidden_size, num_layers)
    tmp = out_dir.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
        import shutil
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    print(f"wrote the tiny chat model to {out_dir}")


if __name__ == "__main__":
    import tyro

    tyro.cli(generate)
