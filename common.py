"""The contract between the stages, and the part of the shared code a reader does read: the data formats, how prompts
and responses become tokens (pad rule, end token), where a score is read and how reward functions are called, and the
distribution sampled from. Copy it and plumbing.py (the machinery) beside any stage script."""

import importlib
import inspect
import itertools
import json
import math
import numbers
import os
import re
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


class DataError(ValueError):
    """A problem in a user's data, reported with the file (or dataset), the line (or row) and the field."""


FIELDS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"), "prompt": ("prompt",)}
ROLES = ("system", "developer", "user", "assistant", "tool")


def _text(value, where: str, field: str):
    """A field is a non-empty string or a non-empty list of {"role", "content"} messages with non-blank text."""
    if isinstance(value, str):
        if value.strip():
            return value
        raise DataError(f"{where}: field '{field}' is an empty string")
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty string or a list of {{role, content}} messages, "
                        f"got {'null' if value is None else type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{field}', message {i} must be a {{role, content}} object")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: field '{field}', message {i}: role {m.get('role')!r} is not one of {ROLES}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            got = m.get("content")
            raise DataError(f"{where}: field '{field}', message {i}: content must be a non-empty string, got "
                            + ("blank text" if isinstance(got, str) else "null" if got is None else type(got).__name__))
    return value


def _split(messages: list, where: str, field: str) -> tuple[list, list]:
    """A conversation -> (the turns before its last assistant turn, [that turn])."""
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{field}' must end with an assistant message")
    if len(messages) == 1:
        raise DataError(f"{where}: field '{field}' has no turn before the assistant's")
    return messages[:-1], messages[-1:]


def read_data(source: str, kind: str, errors: list | None = None, config: str | None = None, split: str = "train",
              held_out: bool = False) -> list[dict]:
    """Records of `kind` ('sft', 'preference' or 'prompt', fields FIELDS[kind]) from any source: a JSONL file (or a
    .json file of JSON lines or one JSON array), read here; a .parquet or .csv file, a folder written by
    `save_to_disk`, a folder laid out as a Hub dataset, or a Hub dataset id (`config`, `split`), read through the
    optional `datasets` package. Every record is checked the same way: a problem is a DataError naming the source,
    the line or row and the field; with an `errors` list, bad records go there and are skipped. `split` is ignored by
    a source without splits (a file is the one split 'train', as in `datasets`), except `held_out`: asking such a
    source for another split is then an error, not a silent evaluation on the training data."""
    def no_splits():
        if held_out and split != "train":
            raise DataError(f"{source}: no split '{split}' (splits are those of a Hub dataset or a saved DatasetDict; "
                            "a file or a saved Dataset is the one split 'train')")
    if source.endswith(".json") and os.path.isfile(source):
        no_splits()
        with open(source, "rb") as f:
            if f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":  # one JSON array, not JSON lines
                f.seek(0)
                try:
                    rows = json.loads(f.read().decode("utf-8-sig"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{source}: not a valid JSON array ({e})") from None
                return _records(enumerate(rows), source, "record", kind, errors)
    hub_id = (not os.path.exists(source) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source)
              and not re.search(r"\.(jsonl|json|txt|gz|tsv|arrow)$", source))
    if not (source.endswith((".parquet", ".csv")) or os.path.isdir(source) or hub_id):
        no_splits()
        return read_jsonl(source, kind, errors)
    if source.endswith((".parquet", ".csv")):
        if not os.path.isfile(source):
            raise DataError(f"{source}: file not found")
        no_splits()
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise DataError(f"{source}: Parquet and CSV files, dataset folders and Hub datasets are read through the "
                        "optional `datasets` package: pip install datasets") from None
    name = source if source.endswith((".parquet", ".csv")) else f"{source} (split '{split}')"
    try:
        if source.endswith((".parquet", ".csv")):
            ds = datasets.load_dataset(source.rpartition(".")[2], data_files=source, split="train")
        elif os.path.isfile(os.path.join(source, "dataset_dict.json")) or os.path.isfile(os.path.join(source, "state.json")):
            ds = datasets.load_from_disk(source)  # a folder written by save_to_disk: a Dataset or a DatasetDict
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{source}: no split '{split}' (it has {', '.join(ds)})")
                ds = ds[split]
            else:
                no_splits()
                name = source
        else:  # a Hub dataset id, or a local folder in the same layout (data files, optionally a README with configs)
            ds = datasets.load_dataset(source, config, split=split)
    except DataError:
        raise
    except Exception as e:  # a split or config that does not exist, a Hub that cannot be reached, unreadable data
        where = "" if os.path.exists(source) else " (not a local file or folder; tried as a Hub dataset id)"
        cause = e.__cause__ or e.__context__  # `datasets` wraps the parser's error (its row and reason) in its own
        because = f" ({type(cause).__name__}: {' '.join(str(cause).split())[:300]})" if cause else ""
        raise DataError(f"{source}{where}: {type(e).__name__}: {e}{because}") from None
    rows = (dict(zip(batch, values)) for batch in ds.iter(batch_size=1000) for values in zip(*batch.values()))
    return _records(enumerate(rows), name, "row", kind, errors)  # read in batches: twice as fast as row by row


def _records(rows, source: str, unit: str, kind: str, errors: list | None) -> list[dict]:
    """(index, dict) rows -> checked records (`_record`)."""
    records = []
    for i, row in rows:
        where = f"{source}, {unit} {i}"
        try:
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object with named fields, got {type(row).__name__}")
            records.append(_record(row, kind, where) | {"where": where})
        except DataError as e:
            if errors is None:
                raise
            errors.append(str(e))
    if not records:
        raise DataError(f"{source}: no records" + (f" ({len(errors)} bad records skipped)" if errors else ""))
    return records


def read_jsonl(path: str, kind: str, errors: list | None = None) -> list[dict]:
    """A JSONL file -> records (read_data's formats), each line checked; bad lines raise or go to `errors`."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: a folder, not a JSONL file")
    records, offset = [], 0
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise DataError(f"{path}: gzip-compressed; decompress it first (gunzip)")
        f.seek(0)
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: a byte-order mark is skipped
                if line.strip():
                    records.append(_parse(line, kind, f"{path}, line {lineno}") | {"where": f"{path}, line {lineno}"})
            except (DataError, UnicodeDecodeError) as e:
                if isinstance(e, UnicodeDecodeError):
                    e = DataError(f"{path}, line {lineno}: not UTF-8 text (byte {offset + e.start} of the file)")
                if errors is None:
                    raise e from None
                errors.append(str(e))
            offset += len(raw)
    if not records:
        raise DataError(f"{path}: the file has no records" + (f" ({len(errors)} bad lines skipped)" if errors else ""))
    return records


def _parse(line: str, kind: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return _record(row, kind, where)


def _record(row: dict, kind: str, where: str) -> dict:
    """One row (a dict, as read from any source) -> a checked record of `kind`, in the fields of FIELDS[kind]. Nulls are
    dropped first, from every source alike: a Parquet column or message struct holds None where a record lacks the
    key, and `"answer": null` in a JSONL line is no answer either."""
    row = {k: [{mk: mv for mk, mv in m.items() if mv is not None} if isinstance(m, dict) else m for m in v]
           if isinstance(v, list) else v for k, v in row.items() if v is not None}
    # the conversation in `messages` is the record when there is no `prompt`, and for SFT when there is no `completion`
    # (HuggingFaceH4/ultrachat_200k keeps its first user turn as a `prompt` column beside `messages`)
    if "messages" in row and ("prompt" not in row or kind == "sft" and "completion" not in row):
        messages = _text(row["messages"], where, "messages")
        if kind == "prompt" and messages[-1]["role"] != "assistant":  # a conversation awaiting its answer
            row["prompt"] = messages
        else:
            row["prompt"], row["completion"] = _split(messages, where, "messages")
    if kind == "preference" and "prompt" not in row and isinstance(row.get("chosen"), list):
        row["prompt"], row["chosen"] = _split(_text(row["chosen"], where, "chosen"), where, "chosen")
        rejected = _text(row.get("rejected"), where, "rejected")
        if rejected[: len(row["prompt"])] != row["prompt"]:
            raise DataError(f"{where}: conversations 'chosen' and 'rejected' must share the same prompt turns")
        if len(rejected) != len(row["prompt"]) + 1:
            raise DataError(f"{where}: conversation 'rejected' must be the prompt turns and one assistant turn, got "
                            f"{len(rejected) - len(row['prompt'])} turns after the prompt")
        row["rejected"] = _split(rejected, where, "rejected")[1]
    for field in FIELDS[kind]:
        if field not in row:
            raise DataError(f"{where}: missing field '{field}' (a {kind} record needs {', '.join(FIELDS[kind])})")
        row[field] = _text(row[field], where, field)
    if kind == "preference" and row["chosen"] == row["rejected"]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    record = {k: row[k] for k in FIELDS[kind]}
    if kind == "prompt":  # the record's other fields (an `answer`) reach reward functions as keyword arguments
        record["fields"] = {k: v for k, v in row.items() if k not in ("prompt", "messages", "completion", "chosen",
                                                                       "rejected")}
    return record


def _after_reply(tokenizer) -> list[int]:
    """The ids the chat template writes after an assistant turn's text (its end-of-turn token, then "\\n" in ChatML)."""
    marker = "Zq9 reply text"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    tail = text[text.rindex(marker) + len(marker):] if marker in text else ""  # some templates drop it
    return tokenizer(tail, add_special_tokens=False)["input_ids"]


def end_token_id(tokenizer) -> int:
    """The token that ends a response: the chat template's end-of-turn token (<|im_end|>, <end_of_turn>, <|eot_id|>)
    where there is a template, else EOS. Found by rendering one assistant turn and taking the first special token
    after its text, so models whose turns do not end with EOS (Gemma, Phi-3) stop where their template says."""
    if tokenizer.chat_template is None:
        return tokenizer.eos_token_id
    if getattr(tokenizer, "_end_token_key", None) != (tokenizer.chat_template, tokenizer.eos_token_id):
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        tokenizer._end_token_id = next((i for i in _after_reply(tokenizer) if i in special), tokenizer.eos_token_id)
        tokenizer._end_token_key = (tokenizer.chat_template, tokenizer.eos_token_id)
    return tokenizer._end_token_id


def score_suffix(tokenizer) -> list[int]:
    """The ids a chat template writes after a finished assistant turn's end token: "\\n" after ChatML's <|im_end|>,
    none for plain text or Llama 3. A reward model's score is read at the last token of the rendered conversation, where
    transformers' AutoModelForSequenceClassification reads it on `apply_chat_template(conversation)`; so a response
    that ended gets these ids appended before it is scored (reward_model.py's pairs, its normalisation, PPO's scoring)."""
    if tokenizer.chat_template is None:
        return []
    if getattr(tokenizer, "_suffix_key", None) != (tokenizer.chat_template, end_token_id(tokenizer)):
        ids, end = _after_reply(tokenizer), end_token_id(tokenizer)
        tokenizer._suffix = ids[ids.index(end) + 1:] if end in ids else []
        tokenizer._suffix_key = (tokenizer.chat_template, end)
    return tokenizer._suffix


def _spare_token(tokenizer) -> str | None:
    """A special token the tokenizer has and never writes: its unk token (SmolLM2's <|endoftext|>), or a reserved or
    unused one (Llama 3's <|reserved_special_token_0|>, Gemma's <unused0>), and not one its chat template writes."""
    written = {tokenizer.eos_token_id, end_token_id(tokenizer), tokenizer.bos_token_id}
    if tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template([{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                                              {"role": "assistant", "content": "c"}], tokenize=False)
        written |= set(tokenizer(text, add_special_tokens=False)["input_ids"])
    candidates = [tokenizer.unk_token] + [t.content for t in tokenizer.added_tokens_decoder.values()
                                          if t.special and ("reserved" in t.content or "unused" in t.content)]
    return next((c for c in candidates if c is not None and tokenizer.convert_tokens_to_ids(c) not in written), None)


def setup_tokenizer(tokenizer, model=None):
    """A pad token distinct from EOS and the end token. With pad == eos (GPT-2, SmolLM2, Llama 3) masking padding out
    of a loss masks the EOS too, and the model never learns to stop. A spare token the tokenizer has is taken first
    (`_spare_token`): the vocabulary, and so a LoRA adapter's base, stays as it is; else a new <pad> is added (growing
    `model`'s embeddings). Padding is read from attention masks and lengths, never from the pad id."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id in (tokenizer.eos_token_id, end_token_id(tokenizer)):
        added = _spare_token(tokenizer) or "<pad>"
        if added == "<pad>":
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
        else:
            tokenizer.pad_token = added
    else:
        added = None
    if not getattr(tokenizer, "_told", False):  # once per tokenizer: the two tokens every stage's masks depend on
        tokenizer._told = True
        print(f"end token {tokenizer.convert_ids_to_tokens(end_token_id(tokenizer))!r}, pad token {tokenizer.pad_token!r}"
              + ("" if added is None else " (added: the tokenizer had none, or one equal to the end token)"
                 if added == "<pad>" else " (a spare token of the tokenizer's: it had no pad, or one equal to the end "
                 "token)"))
    tokenizer.padding_side = "right"
    if model is not None:
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def encode_prompt(tokenizer, prompt, max_length: int, tools: list | None = None) -> tuple[list[int] | None, bool]:
    """Token ids of a prompt, at most `max_length`, through the chat template (a string becomes one user turn) if the
    tokenizer has one, with `tools`' schemas (functions with type hints and a docstring) where the template shows
    them. Returns (ids, was_truncated); ids is None when it cannot fit. A long prompt loses its oldest text, never its
    frame: plain text keeps its BOS; a conversation keeps the template's BOS, system turn and assistant header while
    its other turns are cut from the left, the earliest first."""
    chat = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]

    def encode(messages):  # rendered chat text holds its special tokens already: only plain text gets a BOS added
        if tokenizer.chat_template is None:
            return tokenizer(prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt))["input_ids"]
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError: e.g. a template without a system role
            raise DataError(f"the model's chat template refuses a conversation ({e}): {str(messages)[:200]}") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = encode(chat)
    if len(ids) <= max_length:
        return ids, False
    if tokenizer.chat_template is None:
        head = 1 if ids[0] == tokenizer.bos_token_id else 0
        return (ids[:head] + ids[len(ids) - max_length + head:] if max_length > head else None), True
    while len(ids) > max_length:
        turn = next((m for m in chat if m["role"] != "system" and m["content"]), None)
        if turn is None:
            return None, True
        content = tokenizer(turn["content"], add_special_tokens=False)["input_ids"]
        keep = max(0, len(content) - (len(ids) - max_length))
        turn["content"] = tokenizer.decode(content[len(content) - keep:]) if keep else ""  # shorter every round
        ids = encode(chat)
    return ids, True


def encode_response(tokenizer, response, max_length: int) -> tuple[list[int], bool]:
    """Token ids of a response and its end token (`end_token_id`), cut from the right to `max_length`. Returns (ids,
    was_truncated). A conversational response is its assistant text. Tokenized apart from the prompt, never found by
    searching for the prompt inside the ids."""
    text = response if isinstance(response, str) else response[-1]["content"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [end_token_id(tokenizer)]
    return ids[:max_length], len(ids) > max_length


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) index of each row's last real token, where a reward is read: from the mask, never from
    `config.pad_token_id` (wrong when pad == eos or padding is on the left)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def reward_scores(model, input_ids, attention_mask=None, position_ids=None, last=None) -> torch.Tensor:
    """Query+response ids -> (N,) rewards: the head at each sequence's last real token (the end token, then
    `score_suffix`: where transformers reads it on a rendered conversation), minus `config.reward_offset`
    (0 = the SFT policy's average sample; Hugging Face's pooled logits do not subtract it). Padded input: (B, T) ids
    and mask. Packed: ids, position ids restarting with each sequence, and `last`, (N, 2) row and column of each end."""
    if last is None:
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # left padding shifts no position
        last = torch.stack([torch.arange(len(input_ids), device=input_ids.device), last_token_index(attention_mask)], 1)
    hidden = getattr(model, model.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask,
                                                     position_ids=position_ids, use_cache=False).last_hidden_state
    return model.score(hidden[last[:, 0], last[:, 1]]).squeeze(-1).float() - getattr(model.config, "reward_offset", 0.0)


class _SampledLogprobs(LogitsProcessor):
    """Records, step by step, log softmax(logits / temperature) at the token drawn: the sampler's own log-probs. It
    sees the logits before generate's temperature warper; a step's token is known at the next call (or at the end)."""

    def __init__(self, temperature: float):
        self.temperature, self.pending, self.logprobs = temperature, None, []

    def __call__(self, input_ids, scores):
        self.take(input_ids)
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (B, V), one step at a time
        return scores

    def take(self, input_ids):
        if self.pending is not None:
            self.logprobs.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
            self.pending = None


@torch.no_grad()
def prefill_once(model, queries: torch.Tensor, query_mask: torch.Tensor):
    """(B, Tq) left-padded queries, some repeated (a group's prompt) -> the KV cache of their first Tq - 1 columns, each
    distinct query computed once, its (U, heads, Tq - 1, d) keys and values copied to the (B, ...) rows that repeat it;
    generate then computes the last column and samples from it, as it would have. None when no query repeats."""
    width = queries.shape[1]
    distinct, row_of = torch.unique(torch.cat([queries, query_mask], dim=1), dim=0, return_inverse=True)  # (U, 2 Tq)
    if len(distinct) == len(queries) or width < 2:
        return None
    ids, mask = distinct[:, : width - 1], distinct[:, width: 2 * width - 1]
    cache = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                  use_cache=True).past_key_values
    cache.reorder_cache(row_of)  # (U, ...) -> (B, ...)
    return cache


@torch.no_grad()
def sample(model, queries, query_mask, max_new_tokens: int, temperature: float, end_id: int, pad_id: int,
           with_logprobs: bool = False, share_prompt: bool = False):
    """Left-padded (B, Tq) queries -> (B, Tq + T) queries + responses, T <= max_new_tokens, drawn from exactly
    softmax(logits / temperature), the distribution PPO computes log-probs of (and the reward model normalises on);
    temperature 0: greedy. generate() fills each field its config leaves unset from the model's
    generation_config.json (repetition_penalty, top_k, suppress_tokens...), so that config is set aside for the call.
    `with_logprobs` (temperature > 0): also the (B, T) log-probs the sampler drew each token with. `share_prompt`: a
    query that repeats is computed once (`prefill_once`): the same distribution, the same random draws."""
    own, model.generation_config = model.generation_config, GenerationConfig()  # nothing left to inherit
    how = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    recorder = _SampledLogprobs(temperature) if with_logprobs and temperature > 0 else None
    try:
        out = model.generate(input_ids=queries, attention_mask=query_mask, generation_config=GenerationConfig(
            **how, max_new_tokens=max_new_tokens, eos_token_id=end_id, pad_token_id=pad_id),
            logits_processor=LogitsProcessorList([recorder] if recorder else []),
            past_key_values=prefill_once(model, queries, query_mask) if share_prompt else None)
    finally:
        model.generation_config = own
    if recorder is None:
        return out
    recorder.take(out)
    return out, torch.stack(recorder.logprobs[: out.shape[1] - queries.shape[1]], dim=1)


def pad(seqs: list[list[int]], pad_value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists of ids -> (B, T) ids and attention mask, padded on `side` ("left" for generation)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """(B, T) sampled ids -> (responses with everything after the first EOS set to pad, (B, T) mask, (B,) has_eos).
    `eos_id` is the token that ends a response (`end_token_id`). The mask keeps the EOS itself: the reward is read
    there and its log-prob is part of the action sequence."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.long().argmax(dim=1), responses.shape[1])  # (B,)
    positions = torch.arange(responses.shape[1], device=responses.device)
    response_mask = positions[None, :] <= first_eos[:, None]  # (B, T), True on valid tokens
    return responses.masked_fill(~response_mask, pad_id), response_mask, has_eos


class Rollout(NamedTuple):
    """Sampled episodes, as `rollout` returns them."""
    query_responses: torch.Tensor  # (B, Tq + T) left-padded queries, then responses padded after their end token
    attention_mask: torch.Tensor  # (B, Tq + T)
    context_length: int  # Tq
    responses: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) bool, True up to and including the end token
    has_eos: torch.Tensor  # (B,) bool: the response ended within the length budget
    sampler_logprobs: torch.Tensor | None = None  # (B, T) the log-probs the sampler drew them with (0 past the end)
    policy_mask: torch.Tensor | None = None  # with tools: (B, T) bool, True on the tokens the policy sampled
    tool_calls: list | None = None  # with tools: per response, (result, outcome) of each call (`rollout_with_tools`)

    def actions(self) -> torch.Tensor:
        """(B, T) bool: the tokens the policy chose, those of the loss, the KL and every per-token count: the response
        tokens, less any a tool's turn inserted."""
        return self.response_mask if self.policy_mask is None else self.policy_mask

    def rows(self, index) -> "Rollout":
        """The episodes at `index` (a slice or a tensor of indices)."""
        def take(x):
            if torch.is_tensor(x):
                return x[index]
            if isinstance(x, list):
                return x[index] if isinstance(index, slice) else [x[i] for i in index.tolist()]
            return x
        return Rollout(*(take(x) for x in self))


@torch.no_grad()
def rollout(model, prompts: list[list[int]], response_length: int, temperature: float, end_id: int, pad_id: int,
            with_logprobs: bool = False, share_prompt: bool = False) -> Rollout:
    """Prompt ids -> a Rollout: the prompts left-padded, a response to each drawn by `sample`, cut after its first end
    token."""
    queries, query_mask = (t.to(model.device) for t in pad(prompts, pad_id, side="left"))  # (B, Tq)
    out = sample(model, queries, query_mask, response_length, temperature, end_id, pad_id, with_logprobs, share_prompt)
    out, sampler_logprobs = out if isinstance(out, tuple) else (out, None)
    context_length = queries.shape[1]
    responses, response_mask, has_eos = truncate_after_eos(out[:, context_length:], end_id, pad_id)  # (B, T)
    return Rollout(torch.cat([queries, responses], dim=1), torch.cat([query_mask, response_mask.long()], dim=1),
                   context_length, responses, response_mask, has_eos,
                   None if sampler_logprobs is None else sampler_logprobs.masked_fill(~response_mask, 0.0))


TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)  # Hermes / Qwen: <tool_call>{"name": .., "arguments": ..}


def parse_tool_call(text: str) -> tuple[str, dict] | str:
    """The first tool call in an assistant turn's text -> (name, arguments), or the error the model will read as the
    tool's result. Another format: replace this function (it sees the turn's text, returns the same)."""
    found = TOOL_CALL.search(text)
    if found is None:
        return "error: no <tool_call>{...}</tool_call> in the turn"
    try:
        call = json.loads(found.group(1))
    except ValueError as e:
        return f"error: the tool call is not JSON ({e})"
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(call.get("arguments", {}),
                                                                                             dict):
        return 'error: a tool call is {"name": "...", "arguments": {...}}'
    return call["name"], call.get("arguments", {})


def call_tool(tools: dict, text: str, timeout: float) -> tuple[str, str]:
    """An assistant turn's text -> (the tool's result as text, what happened: "ok", "parse", "unknown", "error" or
    "timeout"). Whatever goes wrong becomes the result, so the model reads it and the run goes on. The tool runs in a
    thread of this process: a call past `timeout` is abandoned (its thread left to finish), never waited for."""
    call = parse_tool_call(text)
    if isinstance(call, str):
        return call, "parse"
    name, arguments = call
    if name not in tools:
        return f"error: no tool named {name!r} (there are: {', '.join(tools)})", "unknown"
    box = {}

    def run():
        try:
            box["result"] = str(tools[name](**arguments))
        except Exception as e:  # the model called it wrong, or the tool failed: either way the model reads why
            box["error"] = f"error: {type(e).__name__}: {e}"

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return f"error: {name} took longer than {timeout:g} s", "timeout"
    return (box["error"], "error") if "error" in box else (box["result"], "ok")


def tool_turn(tokenizer, result: str) -> list[int]:
    """The ids the chat template puts after an assistant turn's end token to hand the model a tool's result: the rest
    of the assistant turn's closing ("\n" in ChatML), the tool message, and the header of the next assistant turn. They
    go after the sampled ids as they are: the sampled tokens are never decoded and encoded again."""
    marker, conversation = "Zq9 call", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Zq9 call"}]
    before = tokenizer.apply_chat_template(conversation, tokenize=False)
    after = tokenizer.apply_chat_template(conversation + [{"role": "tool", "content": result}], tokenize=False,
                                          add_generation_prompt=True)
    end = tokenizer.convert_ids_to_tokens(end_token_id(tokenizer))
    cut = before.index(end, before.rindex(marker)) + len(end)  # just past the end token the model sampled
    if not after.startswith(before[:cut]):
        raise DataError("the chat template renders an assistant turn differently once a tool message follows it")
    return tokenizer(after[cut:], add_special_tokens=False)["input_ids"]


@torch.no_grad()
def rollout_with_tools(model, tokenizer, prompts: list[list[int]], tools: dict, response_length: int,
                       temperature: float, end_id: int, pad_id: int, max_tool_calls: int = 1,
                       max_tool_output_tokens: int = 64, timeout: float = 10.0, with_logprobs: bool = False) -> Rollout:
    """`rollout`, with tools: a turn that ends (its end token) holding a tool call is not the response's end; the tool
    runs, the template's tool turn is appended (`tool_turn`, its result cut to `max_tool_output_tokens`), and the
    policy goes on from there, up to `max_tool_calls` calls. Each round samples the unfinished responses together; the
    response (sampled and inserted tokens) stays within `response_length`. The Rollout's `policy_mask` marks the tokens
    the policy sampled (the loss's; inserted ones are context), `tool_calls` each call's (result, outcome)."""
    responses, owned, calls = [[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts]
    drawn = [[] for _ in prompts]  # the sampler's log-probs (`with_logprobs`; 0 on inserted tokens)
    active = list(range(len(prompts)))
    for round_ in range(max_tool_calls + 1):
        budget = [response_length - len(responses[i]) for i in active]
        queries, query_mask = (t.to(model.device) for t in pad([prompts[i] + responses[i] for i in active], pad_id,
                                                               side="left"))
        out = sample(model, queries, query_mask, max(budget), temperature, end_id, pad_id, with_logprobs)
        out, logprobs = out if isinstance(out, tuple) else (out, None)
        out = out[:, queries.shape[1]:]
        still = []
        for row, i in enumerate(active):
            new = out[row, : budget[row]].tolist()
            new = new[: new.index(end_id) + 1] if end_id in new else new
            responses[i] += new
            owned[i] += [True] * len(new)
            drawn[i] += logprobs[row, : len(new)].tolist() if logprobs is not None else []
            if round_ == max_tool_calls or not new or new[-1] != end_id:
                continue  # the response ended, ran out of room, or has no calls left
            text = tokenizer.decode(new, skip_special_tokens=False)
            if "<tool_call>" not in text:
                continue
            result, outcome = call_tool(tools, text, timeout)
            ids = tokenizer(result, add_special_tokens=False)["input_ids"]
            if len(ids) > max_tool_output_tokens:
                result, outcome = tokenizer.decode(ids[:max_tool_output_tokens]) + " [cut]", outcome + "+cut"
            calls[i].append((result, outcome))
            inserted = tool_turn(tokenizer, result)
            if len(responses[i]) + len(inserted) >= response_length:
                continue  # no room left to answer: the response ends at its call
            responses[i] += inserted
            owned[i] += [False] * len(inserted)
            drawn[i] += [0.0] * len(inserted)
            still.append(i)
        active = still
        if not active:
            break
    ids, response_mask = pad([r or [pad_id] for r in responses], pad_id)  # right-padded (B, T)
    response_mask = response_mask.bool() & torch.tensor([bool(r) for r in responses])[:, None]
    policy_mask = pad([own or [False] for own in owned], 0)[0].bool() & response_mask
    has_eos = torch.tensor([bool(r) and r[-1] == end_id for r in responses])
    queries, query_mask = pad(prompts, pad_id, side="left")
    sampler_logprobs = None
    if with_logprobs and temperature > 0:
        sampler_logprobs = torch.zeros(ids.shape)
        for i, row in enumerate(drawn):
            sampler_logprobs[i, : len(row)] = torch.tensor(row)
    return Rollout(*(x.to(model.device) if torch.is_tensor(x) else x for x in (
        torch.cat([queries, ids], 1), torch.cat([query_mask, response_mask.long()], 1), queries.shape[1], ids,
        response_mask, has_eos, sampler_logprobs, policy_mask, calls)))


def exchanges(batch: Rollout, tokenizer) -> list[list[dict]]:
    """A tool rollout's responses as messages: each run of sampled tokens an assistant turn (its text), each call's
    result a tool turn, in order; what reward functions that name `messages` receive."""
    out = []
    for ids, mine, calls in zip(batch.responses.tolist(), batch.actions().tolist(), batch.tool_calls):
        runs = [tokenizer.decode([i for i, _ in run], skip_special_tokens=True)  # each run of the policy's tokens
                for own, run in itertools.groupby(zip(ids, mine), key=lambda pair: pair[1]) if own]
        out.append([])
        for k, text in enumerate(runs):
            out[-1].append({"role": "assistant", "content": text})
            if k < len(calls):
                out[-1].append({"role": "tool", "content": calls[k][0]})
    return out


def response_texts(batch: Rollout, tokenizer) -> list[str]:
    """The responses as reward functions and judges read them: the text the policy wrote. With tools, its turns joined
    by newlines, without the tools' results: a verifier that reads the last number would otherwise read the tool's
    result as the answer, and the policy learns to leave the answer out (docs/tools.md). `exchanges` has it all."""
    if batch.policy_mask is None:
        return tokenizer.batch_decode(batch.responses.masked_fill(~batch.response_mask, tokenizer.pad_token_id),
                                      skip_special_tokens=True)
    return ["\n".join(m["content"] for m in turns if m["role"] == "assistant") for turns in exchanges(batch, tokenizer)]


def with_score_suffix(query_responses: torch.Tensor, attention_mask: torch.Tensor, has_eos: torch.Tensor,
                      suffix: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask -> (B, L + k): the k ids of `suffix` (`score_suffix`, the chat template's text after the end
    token) written after the last real token of each response that ended (has_eos), where a reward model reads its
    score; the other rows gain only padding."""
    k = len(suffix)
    ids, mask = F.pad(query_responses, (0, k)), F.pad(attention_mask, (0, k))
    rows = has_eos.nonzero().squeeze(1)  # (E,)
    cols = last_token_index(attention_mask)[rows, None] + 1 + torch.arange(k, device=ids.device)  # (E, k)
    ids[rows[:, None], cols] = torch.tensor(suffix, device=ids.device)
    mask[rows[:, None], cols] = 1
    return ids, mask


def score_texts(reward_model, reward_tokenizer, prompts: list, responses: list[str]) -> torch.Tensor:
    """Score with a reward model that has its own tokenizer: each prompt and response as text, rendered in the reward
    model's chat template if it has one (the prompt as user turns, the response as the assistant turn) or joined as
    plain text, tokenized by its tokenizer, right-padded -> (B,) or (B, num_labels) outputs. A decoder's head is read
    at the last real token (`reward_scores`); an encoder classifier (BERT, DeBERTa) pools its own way, so its own
    forward is used."""
    texts = []
    for prompt, response in zip(prompts, responses):
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if reward_tokenizer.chat_template is not None:
            texts.append(reward_tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}],
                                                              tokenize=False))
        else:
            texts.append((prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)) + response)
    batch = reward_tokenizer(texts, add_special_tokens=reward_tokenizer.chat_template is None, padding=True,
                             truncation=True, return_tensors="pt").to(reward_model.device)
    if hasattr(reward_model, "score"):
        return reward_scores(reward_model, batch["input_ids"], batch["attention_mask"])
    return reward_model(**batch).logits.float().squeeze(-1)


def record_caller(fn):
    """A reward function -> call(prompt, response, fields): fn gets the record's fields it names (all with **kwargs)."""
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return lambda prompt, response, fields: fn(prompt, response, **fields)
    names = {p.name for p in params[2:]}
    return lambda prompt, response, fields: fn(prompt, response, **{k: v for k, v in fields.items() if k in names})


def scored(values: list, device, what: str = "a reward function", records: list | None = None):
    """A reward function's results -> (B,) scores and (B,) bool failures: None, "could not score" (a verifier finding no
    answer), is scored 0 and counted, its share logged (`parse_failures`), not hidden in the mean. Anything else but a
    finite number stops the run, naming `what` returned it for which record."""
    for i, v in enumerate(values):
        number = isinstance(v, numbers.Real) or (torch.is_tensor(v) and v.numel() == 1)
        if v is not None and not (number and math.isfinite(float(v))):
            where = records[i].get("where", "a prompt") if records else "a prompt"
            raise SystemExit(f"error: {what} returned {v!r} ({type(v).__name__}) for {where}: a reward is a finite number, "
                             "or None for 'cannot score this'")
    failed = torch.tensor([v is None for v in values], dtype=torch.bool, device=device)
    return torch.tensor([0.0 if v is None else float(v) for v in values], device=device), failed


def check_record_fields(fn, spec: str, records: list, path: str) -> None:
    """Stop before training if a reward function needs a field (an argument without a default) that a record lacks,
    naming the file and line."""
    needed = [p.name for p in list(inspect.signature(fn).parameters.values())[2:]
              if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for r in records:
        missing = [name for name in needed if name not in r.get("fields", {})]
        if missing:
            raise SystemExit(f"error: {r.get('where', path)}: no field '{missing[0]}', which the reward "
                             f"function {spec} takes")
