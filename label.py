"""Collect pairwise preferences: a prompt and two responses, A or B or Tie, written as reward_model.py's JSONL.

    python label.py --output data/my_labels.jsonl                              # you label 20 pairs of models/sft
    python label.py --policy-path models/ppo --policy-b-path models/sft        # compare two models
    python label.py --pairs pairs.jsonl                                        # label existing prompt/response_a/response_b
    python label.py --annotator reviews_task.py:annotate --num-prompts 2000    # the embedded task's simulated annotator
    python reward_model.py --dataset data/reviews/preference_train.jsonl data/my_labels.jsonl

The person's side of RLHF (Christiano et al. 2017; Stiennon et al. 2020, sec. 3.3; Ouyang et al. 2022, sec. 3.4):
responses are sampled from a policy exactly as stage 3 samples them (`common.sample`, pure sampling at
--temperature), shown side by side, and compared. Choices made here:
1. Each answer is one line appended, flushed and synced before the next question, so quitting, Ctrl-C or a kill lose
   at most the answer being typed. Rerun with the same --output to continue: labelled prompts are skipped, and the
   responses of the others are the same as they would have been (each batch is seeded by its place in the list).
2. Preferences go to --output as prompt/chosen/rejected plus who produced each response; ties and skips, which teach
   a Bradley-Terry model nothing, go to `{output}.ties.jsonl`, so that the output feeds reward_model.py as it is.
3. With two models, which one is shown as A is drawn per prompt, so a position bias of the labeller does not become a
   preference for one model.
4. `--annotator file.py:fn` replaces the person with a function (prompt, response_a, response_b) -> "A" | "B" | "Tie",
   for unattended runs (iterate.py) and tests.
"""

import json
import os
import random
import signal
import sys
from dataclasses import dataclass

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C while torch loads: one line, no traceback

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import DataError, encode_prompt, end_token_id, read_data, sample, setup_tokenizer
from plumbing import TASK_DATA, hold_lock, load_function, lock_path

signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C raises KeyboardInterrupt again


@dataclass
class Args:
    policy_path: str = "models/sft"
    """the model whose responses are compared (two samples per prompt)"""
    policy_b_path: str = ""
    """a second model: then each prompt gets one response from each, shown in random order"""
    pairs: str = ""
    """prompt/response_a/response_b records (optionally model_a/model_b) to label instead of sampling: any data
    source the stages read (a JSONL, JSON, Parquet or CSV file, a `save_to_disk` folder, a Hub dataset id)"""
    prompts: str = f"{TASK_DATA}/prompts_train.jsonl"
    """prompts (any format with a prompt, any data source), shuffled by --seed; the first --num-prompts are labelled"""
    dataset_config: str | None = None
    """the configuration (subset) of a Hub dataset given as --prompts or --pairs"""
    dataset_split: str = "train"
    """the split read from --prompts or --pairs when it has splits"""
    output: str = "data/labels/preferences.jsonl"
    """preference JSONL, appended to; ties and skips go to {output}.ties.jsonl"""
    annotator: str = "human"
    """'human' (asks in the terminal) or 'file.py:fn' with fn(prompt, response_a, response_b) -> 'A' | 'B' | 'Tie'"""
    num_prompts: int = 20
    """prompts to label (all of --pairs when that is given and this is larger)"""
    ask_reason: bool = False
    """after each A or B, ask the labeller for a short reason (optional; stored with the pair)"""
    temperature: float = 0.7
    """sampling temperature: stage 3's --temperature, so the labels cover what PPO will generate"""
    response_length: int = 24
    """most tokens per sampled response (stage 3's --response-length)"""
    max_prompt_length: int = 64
    """in tokens; longer prompts lose their oldest text"""
    batch_size: int = 16
    """prompts sampled per generate call"""
    seed: int = 1
    """seeds the prompt order, the sampling and the A/B order"""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:N', or 'auto'"""
    trust_remote_code: bool = False
    """allow a Hub model to run its own code (only for models you trust)"""


def show(value) -> str:
    """A prompt or response for the terminal: text as it is, a conversation as its turns. Control characters (escape
    sequences, carriage returns, backspaces) are shown escaped, never sent raw: a raw one could rewrite what the
    labeller sees, so that the text on screen is not the text recorded."""
    if isinstance(value, str):
        return "".join(c if c == "\n" or c.isprintable() else repr(c)[1:-1] for c in value)
    return "\n".join(f"  [{show(m['role'])}] {show(m['content'])}" for m in value)


def key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


class LabelFiles:
    """The two output files, one line per answer. `undo` truncates the file that took the last answer back to its
    length before it (a single syscall: never a half-removed line)."""

    def __init__(self, output: str):
        self.paths = {"pair": output, "tie": output + ".ties.jsonl"}
        self.history = []  # (path, size before the write, item index, label, asked) of this session's answers
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

    def done(self) -> dict:
        """Counts by label of the answers already on disk, and the prompts they cover. A last line cut off by a kill
        (no newline) is removed."""
        counts, prompts = {"A": 0, "B": 0, "Tie": 0, "skip": 0}, set()
        for path in self.paths.values():
            if not os.path.exists(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if data and not data.endswith(b"\n"):
                print(f"{path}: removing an unfinished last line (the run was stopped while writing it)")
                os.truncate(path, data.rfind(b"\n") + 1)
                data = data[: data.rfind(b"\n") + 1]
            for lineno, line in enumerate(data.splitlines(), start=1):
                try:
                    row = json.loads(line.decode("utf-8"))
                    prompts.add(key(row["prompt"]))
                    counts[row["label"]] += 1
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    raise SystemExit(f"error: {path}, line {lineno}: not a record written by label.py (field "
                                     "'prompt' or 'label' missing); use another --output") from None
        return {"counts": counts, "prompts": prompts}

    def write(self, record: dict, item: int, asked: bool = True) -> None:
        path = self.paths["pair" if record["label"] in ("A", "B") else "tie"]
        size = os.path.getsize(path) if os.path.exists(path) else 0
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.history.append((path, size, item, record["label"], asked))

    def undo(self) -> list[tuple[int, str]]:
        """Take back this session's last answer a person gave, with the ties recorded without asking after it (they
        are recorded again when reached): returns (item index, label) of each line removed, the person's last; empty
        when there is nothing to undo."""
        if not any(asked for *_, asked in self.history):
            return []
        undone = []
        while True:
            path, size, item, label, asked = self.history.pop()
            os.truncate(path, size)  # the file as it was before this line
            undone.append((item, label))
            if asked:
                return undone


def ask(question: str, valid: set) -> str:
    """Read a line until it is one of `valid` (case-insensitive); end of input and Ctrl-C count as 'q'."""
    while True:
        try:
            answer = input(question).strip().lower()
        except (EOFError, KeyboardInterrupt):  # end of input or Ctrl-C: every answer given is already on disk
            print()
            return "q"
        if answer in valid:
            return answer
        print(f"  '{answer}' is not one of {' / '.join(sorted(valid))}; again")


def sample_pairs(args, prompts: list, done: set) -> list:
    """Two responses for each of the first num_prompts prompts: two samples of one policy, or one of each of two
    policies. The (shuffled) prompts are taken in fixed batches, each seeded by (seed, its place), so a resumed run,
    or one with another --num-prompts, draws the same responses for the same prompt."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    paths = [args.policy_path] + ([args.policy_b_path] if args.policy_b_path else [])
    tokenizer = AutoTokenizer.from_pretrained(args.policy_path, trust_remote_code=args.trust_remote_code)
    if args.policy_b_path and AutoTokenizer.from_pretrained(
            args.policy_b_path, trust_remote_code=args.trust_remote_code).get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"error: {args.policy_path} and {args.policy_b_path} have different tokenizers")
    models = []
    for path in paths:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=args.trust_remote_code).to(device).eval()
        setup_tokenizer(tokenizer, model)
        models.append(model)
    end_id, pad_id = end_token_id(tokenizer), tokenizer.pad_token_id
    items = []
    for k in range(0, min(args.num_prompts, len(prompts)), args.batch_size):
        batch = prompts[k: k + args.batch_size]  # the last batch may reach past num_prompts: the grid never moves
        if all(key(p) in done for p in batch[: args.num_prompts - k]):
            continue
        encoded = [encode_prompt(tokenizer, p, args.max_prompt_length) for p in batch]
        ids = [x for x, _ in encoded]
        if any(was_cut for _, was_cut in encoded):
            print(f"note: {sum(was_cut for _, was_cut in encoded)} of these {len(batch)} prompts were cut from the left to "
                  f"--max-prompt-length {args.max_prompt_length}: the models answered only their end")
        keep = [i for i, x in enumerate(ids) if x is not None]
        width = max(len(ids[i]) for i in keep)
        queries = torch.tensor([[pad_id] * (width - len(ids[i])) + ids[i] for i in keep], device=device)
        query_mask = (torch.arange(width, device=device) >= width - torch.tensor([len(ids[i]) for i in keep],
                                                                                  device=device)[:, None]).long()
        torch.manual_seed(args.seed * 100003 + k)
        responses = []
        for model in (models if len(models) == 2 else models * 2):  # response a, then response b
            out = sample(model, queries, query_mask, args.response_length, args.temperature, end_id, pad_id)
            texts = []
            for row in out[:, width:].tolist():
                row = row[: row.index(end_id)] if end_id in row else row
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
            responses.append(texts)
        names = paths if len(paths) == 2 else paths * 2
        items += [{"prompt": batch[i], "response_a": responses[0][j], "response_b": responses[1][j],
                   "model_a": names[0], "model_b": names[1]} for j, i in enumerate(keep) if k + i < args.num_prompts]
    return items


def main(args: Args) -> None:
    annotator = None if args.annotator == "human" else load_function(args.annotator)
    if os.path.isdir(args.output):
        raise SystemExit(f"error: --output {args.output} is a folder: give the file to write the labels to")
    files = LabelFiles(args.output)  # makes its folder
    hold_lock(lock_path(args.output), args.output, "wait for it to end, or label into another --output")
    done = files.done()
    if args.pairs:
        try:
            records = read_data(args.pairs, "prompt", None, args.dataset_config, args.dataset_split)
        except DataError as e:
            raise SystemExit(f"error: {e}")
        items = []
        for r in records:
            row = r["fields"]
            for field in ("response_a", "response_b"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise SystemExit(f"error: {r['where']}: field '{field}' must be a non-empty string")
            items.append({"prompt": r["prompt"], "response_a": row["response_a"], "response_b": row["response_b"],
                          "model_a": row.get("model_a", ""), "model_b": row.get("model_b", "")})
        items = [it for it in items[: args.num_prompts] if key(it["prompt"]) not in done["prompts"]]
    else:
        if args.prompts == f"{TASK_DATA}/prompts_train.jsonl" and not os.path.exists(args.prompts):
            load_function("reviews_task.py:ensure_data")()
        try:
            prompts = [r["prompt"] for r in read_data(args.prompts, "prompt", None, args.dataset_config, args.dataset_split)]
        except DataError as e:
            raise SystemExit(f"error: {e}")
        random.Random(args.seed).shuffle(prompts)
        items = [it for it in sample_pairs(args, prompts, done["prompts"]) if key(it["prompt"]) not in done["prompts"]]
    counts = done["counts"]
    total = len(items) + sum(counts.values())
    if sum(counts.values()):
        print(f"{args.output}: {sum(counts.values())} answered before ({counts['A'] + counts['B']} pairs, "
              f"{counts['Tie']} ties, {counts['skip']} skipped); {len(items)} to go")

    # a second rng for the A/B order, seeded per prompt so that a resumed run shows the same order
    def swapped(item) -> bool:
        return bool(args.policy_b_path or args.pairs) and random.Random(f"{args.seed}:{key(item['prompt'])}").random() < 0.5

    i = 0
    while i < len(items):
        item = items[i]
        a, b, model_a, model_b = item["response_a"], item["response_b"], item["model_a"], item["model_b"]
        if swapped(item):
            a, b, model_a, model_b = b, a, model_b, model_a
        reason = ""
        if a == b:  # nothing to compare: a tie, without asking
            label = "Tie"
            if annotator is None:
                print(f"\nPrompt: {show(item['prompt'])}\n  A = B: {show(a)}\n  identical responses: recorded as a tie")
        elif annotator is None:
            print(f"\n[{total - len(items) + i + 1}/{total}]  pairs {counts['A'] + counts['B']}, ties {counts['Tie']}, "
                  f"skipped {counts['skip']}")
            print(f"Prompt: {show(item['prompt'])}")
            print(f"  A: {show(a)}")
            print(f"  B: {show(b)}")
            choice = ask("Better? [a] A  [b] B  [t] tie  [s] skip  [u] undo  [q] quit > ",
                         {"a", "b", "t", "s", "u", "q"})
            if choice == "q":
                break
            if choice == "u":
                undone = files.undo()
                for _, undone_label in undone:
                    counts[undone_label] -= 1
                if undone:
                    i = undone[-1][0]
                    print(f"  undone: your '{undone[-1][1]}' on the previous prompt; it is asked again")
                else:
                    print("  nothing to undo in this session")
                continue
            label = {"a": "A", "b": "B", "t": "Tie", "s": "skip"}[choice]
            if label in ("A", "B") and args.ask_reason:
                try:
                    reason = input("Reason (optional, Enter to skip) > ").strip()
                except (EOFError, KeyboardInterrupt):  # quit before this answer is written
                    print()
                    break
        else:
            answer = annotator(item["prompt"], a, b)
            label = {"a": "A", "b": "B", "tie": "Tie"}.get(str(answer).strip().lower())
            if label is None:
                raise SystemExit(f"error: {args.annotator} returned {answer!r} for prompt {show(item['prompt'])!r}; "
                                 "expected 'A', 'B' or 'Tie'")
        if label in ("A", "B"):
            chosen, rejected, chosen_model, rejected_model = (a, b, model_a, model_b) if label == "A" else (
                b, a, model_b, model_a)
            if not isinstance(item["prompt"], str):  # a conversation: responses as assistant turns (TRL's format)
                chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
            record = {"prompt": item["prompt"], "chosen": chosen, "rejected": rejected, "chosen_model": chosen_model,
                      "rejected_model": rejected_model, "label": label, "annotator": args.annotator}
            if reason:
                record["reason"] = reason
            files.write(record, i)
        else:
            files.write({"prompt": item["prompt"], "response_a": a, "response_b": b, "model_a": model_a,
                         "model_b": model_b, "label": label, "annotator": args.annotator}, i, asked=a != b)
        counts[label] += 1
        i += 1
    print(f"\n{args.output}: {counts['A'] + counts['B']} pairs, {counts['Tie']} ties, {counts['skip']} skipped "
          f"({args.output}.ties.jsonl); {len(items) - i} of this run's prompts left")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt:  # while the models load or sample: every answer given is already on disk
        raise SystemExit("interrupted: every answer given is on disk; the same command goes on from there") from None
