"""What the three stages share: the data contract, tokenizer setup, which token a reward is read at, checkpoints,
seeding and the metrics writer. No training math lives here; each script writes its own out where it is used."""

import json
import os
import random
import shutil
import time

import torch
from transformers import GenerationConfig


class DataError(ValueError):
    """A problem in a user's data file, reported with the file, the line and the field."""


# the fields each kind of record needs; a conversational record may replace them with `messages`
FIELDS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"), "prompt": ("prompt",)}


def _check_text(value, where: str, field: str):
    """A field is a non-empty string or a non-empty list of {"role", "content"} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{field}' is an empty string")
        return value
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return value
    raise DataError(f"{where}: field '{field}' must be a non-empty string or a list of {{role, content}} messages, "
                    f"got {type(value).__name__}")


def _split_messages(messages: list, where: str) -> tuple[list, list]:
    """A conversation -> (everything before the last assistant turn, [that turn])."""
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'messages' must end with an assistant message")
    return messages[:-1], messages[-1:]


def read_jsonl(path: str, kind: str, errors: list | None = None) -> list[dict]:
    """Read a JSONL file of `kind` ('sft', 'preference' or 'prompt') into records with the fields of FIELDS[kind].

    Accepted forms: prompt/completion, prompt/chosen/rejected, prompt-only, and conversational ones: `messages`
    (its last assistant turn is the completion), or `chosen`/`rejected` as whole conversations sharing a prefix.
    Every problem is a DataError naming the file, line and field; with an `errors` list, bad lines are appended to it
    and skipped instead (a file with no good line still raises).
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors, spreadsheets) is skipped
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                records.append(_parse_line(line, kind, where) | {"line": lineno})
            except DataError as e:
                if errors is None:
                    raise
                errors.append(str(e))
    if not records:
        raise DataError(f"{path}: the file has no records" + (f" ({len(errors)} bad lines skipped)" if errors else ""))
    return records


def _parse_line(line: str, kind: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row and "prompt" not in row:
        messages = _check_text(row["messages"], where, "messages")
        if kind == "prompt" and messages[-1]["role"] != "assistant":  # a conversation waiting for its answer
            return {"prompt": messages}
        prompt, completion = _split_messages(messages, where)
        if not prompt:
            raise DataError(f"{where}: field 'messages' has no turn before the assistant's")
        row = {"prompt": prompt, "completion": completion}
    if kind == "preference" and "prompt" not in row and isinstance(row.get("chosen"), list):
        chosen = _check_text(row["chosen"], where, "chosen")
        rejected = _check_text(row.get("rejected"), where, "rejected")
        prompt, row["chosen"] = _split_messages(chosen, where)
        if rejected[: len(prompt)] != prompt:
            raise DataError(f"{where}: conversations 'chosen' and 'rejected' must share the same prompt turns")
        row = {"prompt": prompt, "chosen": row["chosen"], "rejected": _split_messages(rejected, where)[1]}
    for field in FIELDS[kind]:
        if field not in row:
            raise DataError(f"{where}: missing field '{field}' (a {kind} record needs {', '.join(FIELDS[kind])})")
        row[field] = _check_text(row[field], where, field)
    if kind == "preference" and row["chosen"] == row["rejected"]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    return {k: row[k] for k in FIELDS[kind]}


def end_token_id(tokenizer) -> int:
    """The token that ends a response: the chat template's end-of-turn token (<|im_end|>, <end_of_turn>, <|eot_id|>,
    <|end|>) where there is a template, else EOS. Found by rendering one assistant turn and taking the first special
    token after its text, so Gemma and Phi-3, whose turns do not end with EOS, stop where their template says."""
    if tokenizer.chat_template is None:
        return tokenizer.eos_token_id
    key = (tokenizer.chat_template, tokenizer.eos_token_id)
    if getattr(tokenizer, "_end_token_key", None) != key:
        marker = "Zq9 reply text"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
        tail = text[text.rindex(marker) + len(marker):] if marker in text else ""  # some templates drop it
        after = tokenizer(tail, add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        tokenizer._end_token_id = next((i for i in after if i in special), tokenizer.eos_token_id)
        tokenizer._end_token_key = key
    return tokenizer._end_token_id


def setup_tokenizer(tokenizer, model=None):
    """Give the tokenizer a pad token distinct from EOS and from the end-of-turn token (resizing `model`'s embeddings
    if one is added).

    With pad == eos (GPT-2, SmolLM2, Llama 3), masking padding out of a loss also masks the EOS that ends every target,
    and the model never learns to stop. So such tokenizers get a new '<pad>' token. Padding is on the right for
    training; generation pads on the left explicitly where it needs to.
    """
    if tokenizer.pad_token is None or tokenizer.pad_token_id in (tokenizer.eos_token_id, end_token_id(tokenizer)):
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "right"
    if model is not None:
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def render_prompt(tokenizer, prompt) -> str:
    """Prompt text as the model sees it: through the chat template (with the assistant header) if it has one."""
    if tokenizer.chat_template is None:
        if not isinstance(prompt, str):
            return "\n".join(m["content"] for m in prompt)
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _prompt_ids(tokenizer, prompt) -> list[int]:
    # rendered chat text already holds its special tokens, so only plain text gets the tokenizer's own (a BOS)
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=tokenizer.chat_template is None)["input_ids"]


def encode_prompt(tokenizer, prompt, max_length: int) -> tuple[list[int] | None, bool]:
    """Token ids of a prompt of at most `max_length`. Returns (ids, was_truncated); ids is None when it cannot fit.

    A long prompt loses its oldest text, never its frame: plain text keeps its BOS; a conversation keeps the
    template's BOS, system turn, turn markers and assistant header, and its non-system turns are cut from the left
    (an earlier turn is emptied before the last one is cut). None: even with those turns empty it is too long.
    """
    ids = _prompt_ids(tokenizer, prompt)
    if len(ids) <= max_length:
        return ids, False
    if tokenizer.chat_template is None:
        head = 1 if ids[0] == tokenizer.bos_token_id else 0
        return (ids[:head] + ids[len(ids) - max_length + head:] if max_length > head else None), True
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    while len(ids) > max_length:
        turn = next((m for m in messages if m["role"] != "system" and m["content"]), None)
        if turn is None:
            return None, True
        content = tokenizer(turn["content"], add_special_tokens=False)["input_ids"]
        keep = max(0, len(content) - (len(ids) - max_length))
        turn["content"] = tokenizer.decode(content[len(content) - keep:]) if keep else ""  # shrinks every round
        ids = _prompt_ids(tokenizer, messages)
    return ids, True


def encode_response(tokenizer, response, max_length: int) -> tuple[list[int], bool]:
    """Token ids of a response followed by its end token, cut from the right to `max_length`. Returns (ids,
    was_truncated).

    A conversational response is its assistant text; the end token is the template's end-of-turn token (SmolLM2's
    <|im_end|>, Gemma's <end_of_turn>), or EOS without a template (`end_token_id`). Tokenized on its own, never by
    searching for the prompt inside the ids.
    """
    text = response if isinstance(response, str) else response[-1]["content"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [end_token_id(tokenizer)]
    return ids[:max_length], len(ids) > max_length


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of the last real token of each row, for left, right or no padding.

    This is where a reward model reads its score (the EOS of a response). It is taken from the mask, never from
    `config.pad_token_id`, which breaks when pad == eos or padding is on the left.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row sees the same positions as an unpadded one."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def reward_scores(model, input_ids, attention_mask=None, position_ids=None, last=None) -> torch.Tensor:
    """Query+response ids -> one reward per sequence: the head applied at its last real token, minus the offset.

    Padded input: (B, T) ids and attention mask. Packed input (see `pack`): ids, position ids, and `last`, the (N, 2)
    row and column of each sequence's last token. `config.reward_offset` (set by reward_model.py's normalisation) is
    subtracted so a score of 0 means "as good as the SFT policy's average sample". Hugging Face's own pooled logits
    read at the last non-pad *id* and skip the offset: subtract `config.reward_offset` yourself elsewhere.
    """
    if last is None:
        position_ids = position_ids_from_mask(attention_mask)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = torch.stack([rows, last_token_index(attention_mask)], dim=1)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # (rows, T, H)
    return model.score(hidden[last[:, 0], last[:, 1]]).squeeze(-1).float() - getattr(model.config, "reward_offset", 0.0)


def disable_dropout(model) -> None:
    """Dropout off (RLHF needs the same log-probs and scores in every forward pass of the same input).

    Three places hold a dropout rate: the config, nn.Dropout modules, and plain float attributes that modules copy
    from the config when they are built (Llama and Qwen2 attention's `self.attention_dropout`, applied in train mode
    whatever the config says afterwards). All three are set to 0.
    """
    for key, value in model.config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(module, name, 0.0)


def pad(seqs: list[list[int]], pad_value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists of ids -> (B, T) ids and attention mask, padded on `side` ("left" for generation)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def first_fit(lengths: list[int], room: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Longest first, each sequence into the first row with `room` left. Returns the columns used in each row and
    each sequence's (row, start column)."""
    used, starts = [], [None] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, u in enumerate(used) if u + lengths[i] <= room), len(used))
        used += [0] * (r == len(used))
        starts[i], used[r] = (r, used[r]), used[r] + lengths[i]
    return used, starts


def pack(seqs: list[list[int]], pad_value: int, room: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged lists of ids -> padding-free rows: (R, T) ids, (R, T) position ids, and (N, 2) the row and column where
    each sequence starts. Positions restart at 0 with every sequence: that is how transformers (its attention
    masks, or flash-attention's variable-length kernels) keeps packed sequences from attending to each other. A
    row's unused tail is filler, positioned like one more sequence, that no loss or score reads.

    A row holds `room` tokens; by default as many as the longest sequence, or twice that where it is cheaper. Longer
    rows pack denser, but masked attention over a row costs more the longer it is, so a layout's cost is taken as
    tokens fed x (1 + row length / 640), fitted on CPU to benchmarks/bench_pack_width.py and to PPO rows of ~140.
    """
    lengths = [len(s) for s in seqs]
    longest = max(lengths)
    if room:
        used, starts = first_fit(lengths, max(room, longest))
    else:
        cost = lambda used: len(used) * max(used) * (1 + max(used) / 640)  # noqa: E731
        used, starts = min(first_fit(lengths, longest), first_fit(lengths, 2 * longest), key=lambda u: cost(u[0]))
    width = max(used)
    ids = torch.full((len(used), width), pad_value, dtype=torch.long)
    positions = torch.zeros((len(used), width), dtype=torch.long)
    for s, (r, c) in zip(seqs, starts):
        ids[r, c: c + len(s)], positions[r, c: c + len(s)] = torch.tensor(s, dtype=torch.long), torch.arange(len(s))
    for r, u in enumerate(used):
        positions[r, u:] = torch.arange(width - u)
    return ids, positions, torch.tensor(starts, dtype=torch.long)


@torch.no_grad()
def packing_works(model) -> bool:
    """Does `model` keep packed sequences apart in the layout the scripts use, several rows of several sequences?
    The hidden states of four sequences packed two per row must equal those of each sequence alone. True for
    transformers' SDPA and eager attention; false for its flash-attention path, which finds packed sequences only
    in a batch of one row, and for remote code that ignores position ids."""
    backbone, was_training = getattr(model, model.base_model_prefix), model.training
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    seqs = [[t % vocab for t in range(k, k + n)] for k, n in ((11, 5), (23, 3), (31, 4), (47, 4))]
    ids = torch.tensor([seqs[0] + seqs[1], seqs[2] + seqs[3]], device=model.device)  # (2, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]], device=model.device)
    packed = backbone(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state.flatten(0, 1)  # (16, H)
    alone = torch.cat([backbone(input_ids=torch.tensor([s], device=model.device), use_cache=False).last_hidden_state[0]
                       for s in seqs])
    model.train(was_training)
    tol = 1e-3 if packed.dtype == torch.float32 else 5e-2
    return torch.allclose(packed.float(), alone.float(), rtol=tol, atol=tol)


@torch.no_grad()
def sample(model, queries, query_mask, max_new_tokens: int, temperature: float, end_id: int, pad_id: int):
    """Left-padded (B, Tq) queries -> (B, Tq + T) queries + responses, T <= max_new_tokens, drawn from exactly
    softmax(logits / temperature): no top-k, top-p, repetition penalty or anything else. Shared by every stage that
    samples, so the reward model is normalised on the distribution PPO samples from.

    `generate()` fills each field its config leaves unset from the model's own generation_config.json (a
    repetition_penalty, no_repeat_ngram_size, suppress_tokens, min_new_tokens...), and PPO's log-probs would then
    belong to another distribution than its samples. So that config is set aside for the call.
    """
    own = model.generation_config
    model.generation_config = GenerationConfig()  # nothing left to inherit
    try:
        return model.generate(input_ids=queries, attention_mask=query_mask, generation_config=GenerationConfig(
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            eos_token_id=end_id, pad_token_id=pad_id))
    finally:
        model.generation_config = own


def load_function(spec: str):
    """'path/to/file.py:name' (or 'module:name') -> the function, e.g. a reward function f(prompt, response)."""
    import importlib
    import importlib.util

    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise ValueError(f"expected 'file.py:function', got '{spec}'")
    if path.endswith(".py"):
        if not os.path.exists(path):  # a relative path may name a file of this repository, e.g. reward_functions.py
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
        module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(path)
    return getattr(module, name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def save_model(out_dir: str, tokenizer=None, args=None, *models) -> None:
    """Save HF folders atomically: write everything to `out_dir.tmp`, then swap it in, so a crash keeps the old one.

    `models` are (subfolder, model) pairs; subfolder "" saves at the top. `args` (a dataclass) goes to args.json.
    """
    out_dir = out_dir.rstrip("/")
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub, model in models:
        model.save_pretrained(os.path.join(tmp, sub))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if args is not None:
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2, default=str)
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_state(out_dir: str, state: dict) -> None:
    """Training state (optimizer, scheduler, step...) beside a checkpoint, written atomically, with the state of
    every random generator the run draws from (CPU, each CUDA device, Python's), so a resumed run samples the same."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    tmp = os.path.join(out_dir, "training_state.pt.tmp")
    torch.save(state | {"rng": rng}, tmp)
    os.replace(tmp, os.path.join(out_dir, "training_state.pt"))


def load_state(ckpt_dir: str) -> dict:
    """The saved training state; restores the random generators as they were when it was saved."""
    state = torch.load(os.path.join(ckpt_dir, "training_state.pt"), weights_only=True)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


class Metrics:
    """Scalars to TensorBoard, `metrics.jsonl` (one JSON object per step) and, with --track, Weights & Biases."""

    def __init__(self, run_dir: str, config: dict, track: bool = False, project: str = "rlhf"):
        os.makedirs(run_dir, exist_ok=True)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self.start = time.time()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(run_dir)
            self.tb.add_text("args", "\n".join(f"|{k}|{v}|" for k, v in config.items()))
        except ImportError:
            print("tensorboard is not installed: logging to metrics.jsonl only")
            self.tb = None
        self.wandb = None
        if track:
            import wandb  # imported only with --track

            self.wandb = wandb.init(project=project, config=config, name=os.path.basename(run_dir))

    def log(self, step: int, scalars: dict) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time() - self.start, 2)} | scalars) + "\n")
        self.jsonl.flush()
        for k, v in scalars.items():
            if self.tb is not None:
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.jsonl.write(json.dumps({"step": step, tag: text}) + "\n")
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
