"""The machinery every stage script shares, written once: you do not need to read this file to learn any algorithm.

Starting a run (torchrun, seeds, the embedded task's defaults), packing sequences without padding, loading reward
models and scoring with them, the RL stages' evaluation, atomic saves, checkpoints and exact resume, the output lock,
signals and one-line errors, metrics, LoRA (through the optional peft), and torch.distributed (DDP, FSDP2). The
algorithms, and the conventions they depend on, are in the stage scripts and common.py. Copy this file with common.py
beside any stage script."""

import atexit
import contextlib
import ctypes
import errno
import importlib
import importlib.util
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
import transformers
import tyro
import tyro._strings as tyro_strings
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common import (DataError, Rollout, check_record_fields, encode_prompt, exchanges, last_token_index, read_data,
                    record_caller, response_texts, reward_scores, rollout, score_suffix, score_texts, scored,
                    setup_tokenizer, with_score_suffix)

# the embedded "reviews" task: its files and tiny model are made by reviews_task.py on first use of the defaults
TASK_DATA, TINY_MODEL = "data/reviews", "models/tiny-llama"


# Starting a run


def cli(args_class):
    """`python script.py --flags`: the flags parsed by tyro, each field's docstring one paragraph in --help (tyro keeps
    the source's line break before an indented line or one that starts with a symbol), and on the CPU glibc told to
    keep freed memory, a setting of the whole process: made here, as a script starts, never when one is imported."""
    join = tyro_strings.remove_single_line_breaks
    tyro_strings.remove_single_line_breaks = lambda text: re.sub(r"\s*\n\s*", " ", text.strip())
    try:
        args = tyro.cli(args_class)
    finally:
        tyro_strings.remove_single_line_breaks = join
    keep_freed_memory(torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                                   "cpu" if args.device == "auto" else args.device))
    return args


class Run(NamedTuple):
    """What `setup` returns."""
    rank: int
    world_size: int
    device: torch.device
    run_name: str  # logs in runs/{run_name}
    autocast: Callable  # `with autocast():` around a forward: bf16 compute with --bf16
    trained: dict  # from_pretrained's keywords for a model to train
    frozen: dict  # ... and for a frozen one


def setup(args) -> Run:
    """What every stage does first: join torchrun's process group when launched by it (rank 0 of 1 otherwise), check
    --track, name the run, seed Python's and torch's generators, and say how models load. --bf16: trained weights and
    AdamW's state stay fp32 (bf16 cannot hold the small updates of lr ~1e-5) and the forward and backward run in bf16
    under `autocast` (FSDP2's MixedPrecisionPolicy casts instead: autocast is then off); frozen models, and with LoRA
    the frozen base, are held in bf16."""
    rank, world_size, device = init_distributed(args.device)  # rank 0 of 1 without torchrun
    if not sys.stderr.isatty():  # a log file: transformers' progress bars ("Loading weights") would fill it
        transformers.utils.logging.disable_progress_bar()
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("error: --track logs to Weights & Biases, which is not installed: pip install wandb")
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    fsdp = world_size > 1 and args.strategy == "fsdp"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and not fsdp)  # noqa: E731
    trained = dict(dtype=torch.bfloat16 if args.bf16 and args.lora_r and not fsdp else torch.float32,
                   trust_remote_code=args.trust_remote_code)
    frozen = dict(dtype=torch.bfloat16 if args.bf16 else torch.float32, trust_remote_code=args.trust_remote_code)
    return Run(rank, world_size, device, run_name, autocast, trained, frozen)


def prepare_output(args, rank: int, world_size: int, task_file: str, task_eval_file: str) -> tuple[bool, str, str]:
    """Before any model loads: the embedded task's files (and tiny model) written on first use of its defaults, by
    rank 0 and deterministically; the output folder claimed (`claim_output_dir`); and the 'auto' flags resolved: with
    the embedded task's own data (`task_file`) its held-out file (`task_eval_file`) and gold judge, with the user's
    nothing of it (the --eval-split of --dataset, or no held-out set; no judge). -> (embedded, eval_dataset,
    eval_reward_fn)."""
    dataset = args.dataset if isinstance(args.dataset, str) else args.dataset[0]
    embedded = dataset == f"{TASK_DATA}/{task_file}"
    make = ("ensure_tiny_model" if getattr(args, "model_name_or_path", "") == TINY_MODEL and not os.path.isdir(TINY_MODEL)
            else "ensure_data" if embedded and not os.path.exists(dataset) else "")  # the tiny model: the files too
    if make and not os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "reviews_task.py")):
        raise SystemExit("error: the default data and model are the embedded task's, made by reviews_task.py, which is "
                         "not beside this script (it is in the repository): give --dataset and --model-name-or-path "
                         "(or --sft-model-path) of your own")
    if rank == 0 and make:
        load_function(f"reviews_task.py:{make}")()
    claim_output_dir(args.output_dir, args.resume)  # a lock; an interrupted save mended; a save can be written
    if world_size > 1:
        dist.barrier()  # the files are written
    eval_dataset = args.eval_dataset if args.eval_dataset != "auto" else (
        f"{TASK_DATA}/{task_eval_file}" if embedded else dataset if args.eval_split else "none")
    eval_reward_fn = args.eval_reward_fn if args.eval_reward_fn != "auto" else (
        "reviews_task.py:gold_score" if embedded else "")
    return embedded, eval_dataset, eval_reward_fn


def load_function(spec: str):
    """'path/file.py:name' (also looked for beside the scripts) or 'module:name' -> the function, loaded when used."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise SystemExit(f"error: expected 'file.py:function', got '{spec}'")
    if path.endswith(".py") and not os.path.exists(path):
        beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
        if not os.path.exists(beside):
            raise SystemExit(f"error: {spec}: no file {path} (here or beside the scripts)")
        path = beside
    try:
        if path.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(path)
    except Exception as e:  # the user's file fails as it loads: say so in one line
        raise SystemExit(f"error: {spec}: {path} fails to load ({type(e).__name__}: {e})") from None
    if not callable(getattr(module, name, None)):
        raise SystemExit(f"error: {spec}: {path} has no function {name}")
    return getattr(module, name)


def require_stage(path: str, default: str, command: str, flag: str) -> None:
    """A model folder that cannot load says why in one line, before anything waits on it: a stage run out of order
    names the folder and the command that makes it; a folder holding only an interrupted run's checkpoint says so."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        if os.path.isdir(os.path.join(path, "checkpoint")):
            raise SystemExit(f"error: {path} holds an unfinished run (only its checkpoint/): finish it (rerun "
                             f"`{command}`) or point {flag} at a finished model")
        raise SystemExit(f"error: {path} is not a model folder (no config.json): point {flag} at one")
    if path == default and not os.path.isdir(path):
        raise SystemExit(f"error: {path} does not exist: run `{command}` first, or point {flag} at a model")


@contextlib.contextmanager
def quiet_missing_head(quiet: bool = True):
    """transformers' report of a newly initialised head (`score`), silenced where a new head is what is wanted."""
    logger = logging.getLogger("transformers.modeling_utils")
    logger.disabled = quiet
    try:
        yield
    finally:
        logger.disabled = False


def resume_point(args) -> tuple[str, bool]:
    """-> (the checkpoint folder, whether this run resumes from it: an interrupted run left one and --resume is on),
    the checkpoint checked before anything loads from it (`check_checkpoint`)."""
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    resuming = args.resume and os.path.exists(os.path.join(ckpt_dir, "training_state.pt"))
    if resuming:
        check_checkpoint(ckpt_dir, args)
    return ckpt_dir, resuming


def default_learning_rate(args, model, tiny: float, pretrained: float) -> float:
    """--learning-rate, or the stage's default: `tiny` for the embedded tiny model (it learns from scratch), `pretrained`
    for any other, 10x either with LoRA (adapters need about that)."""
    if args.learning_rate is not None:
        return args.learning_rate
    is_tiny = getattr(model.config, "embedded_tiny_model", False)
    learning_rate = (tiny if is_tiny else pretrained) * (10 if args.lora_r else 1)
    print(f"learning rate {learning_rate:g} ({'the embedded tiny model' if is_tiny else 'a pretrained model'}"
          f"{', LoRA: 10x' if args.lora_r else ''}; --learning-rate to change)")
    return learning_rate


def batch_indices(i: int, n: int, size: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This process's `size` indices into n items for the run's i-th global batch: epoch e is a permutation seeded by
    (seed, e), the same in every process, so the processes split each batch between them and a resumed run replays
    it."""
    epoch, j = divmod(i, n // (size * world_size))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10007 + epoch))
    first = (j * world_size + rank) * size
    return order[first: first + size].tolist()


def exact_div(a: int, b: int, what: str) -> int:
    if a % b != 0:
        raise SystemExit(f"{what}: {a} is not divisible by {b}")
    return a // b


def disable_dropout(model) -> None:
    """Dropout off, so every forward pass of the same input gives the same numbers. Three places hold a rate: the
    config, nn.Dropout modules, and floats that modules copy from the config when built (Llama's and Qwen2's
    `self.attention_dropout`, applied in train mode whatever the config says)."""
    for key, value in model.config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(module, name, 0.0)


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """Clip by global norm -> the norm before clipping, a plain tensor (under FSDP2 clip_grad_norm_ gives a DTensor)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm


# Packing: sequences side by side in rows, without padding


def pack(seqs: list[list[int]], pad_value: int, room: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged lists of ids -> padding-free rows: (R, T) ids, (R, T) position ids restarting at 0 with every sequence
    (so transformers keeps packed sequences apart, with a block-diagonal causal mask), and (N, 2) the row and column
    where each sequence starts. Longest first, each into the first row with room; a row holds `room` tokens, by default
    the longest sequence or twice that, whichever costs less as tokens fed x (1 + row length / 640) (longer rows pack
    denser, but masked attention costs more; fitted on CPU by benchmarks/bench_pack_width.py)."""
    lengths = [len(s) for s in seqs]

    def first_fit(room: int):  # -> columns used in each row, (row, start column) of each sequence
        used, starts = [], [None] * len(seqs)
        for i in sorted(range(len(seqs)), key=lambda i: -lengths[i]):
            r = next((r for r, u in enumerate(used) if u + lengths[i] <= room), len(used))
            used += [0] * (r == len(used))
            starts[i], used[r] = (r, used[r]), used[r] + lengths[i]
        return used, starts

    longest = max(lengths)
    cost = lambda used: len(used) * max(used) * (1 + max(used) / 640)  # noqa: E731
    used, starts = first_fit(max(room, longest)) if room else min(first_fit(longest), first_fit(2 * longest),
                                                                  key=lambda layout: cost(layout[0]))
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
    """Does `model` keep packed sequences apart in the layout `pack` makes, several rows of several sequences? True
    for transformers' SDPA and eager attention; false for its flash-attention path, which finds packed sequences only
    in a batch of one row, and for remote code that ignores position ids."""
    backbone, was_training = getattr(model, model.base_model_prefix), model.training
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    seqs = [[t % vocab for t in range(k, k + n)] for k, n in ((11, 5), (23, 3), (31, 4), (47, 4))]
    ids = torch.tensor([seqs[0] + seqs[1], seqs[2] + seqs[3]], device=model.device)  # (2, 8): two rows of two
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]], device=model.device)
    packed = backbone(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state.flatten(0, 1)
    alone = torch.cat([backbone(input_ids=torch.tensor([s], device=model.device), use_cache=False).last_hidden_state[0]
                       for s in seqs])
    model.train(was_training)
    tol = 1e-3 if packed.dtype == torch.float32 else 5e-2
    return torch.allclose(packed.float(), alone.float(), rtol=tol, atol=tol)


def layout(query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int, padding_free: bool,
           share_prompt: bool = False):
    """(B, Tq + T) left-padded queries + responses -> what a forward pass over them needs: the model inputs;
    (rows, cols), each (B, T), where the logit that predicts response token t of sequence b sits; and (B, 2) where
    each sequence's last real token (its EOS) sits, where a reward model reads its score. Computed once per batch and
    shared by the policy, reference, value and reward forwards.

    Padded: positions come from the mask, so left-padded queries see the positions of unpadded ones; the logit at
    column c predicts token c + 1, so response tokens are predicted from columns [context_length - 1, -1).
    Padding-free: each sequence without its padding, packed into rows (`pack`). Past a response's EOS,
    (rows, cols) stay at its last token, so those (masked) entries depend on the sequence alone.
    `share_prompt` (padding-free, where the batch repeats a prompt): `shared_prompt_layout`.
    """
    if padding_free and share_prompt:
        queries = [tuple(q[m.bool()].tolist()) for q, m in zip(query_responses[:, :context_length],
                                                                 attention_mask[:, :context_length])]
        if len(set(queries)) < len(queries):
            return shared_prompt_layout(query_responses, attention_mask, context_length, queries)
    batch, device = query_responses.shape[0], query_responses.device
    t = torch.arange(query_responses.shape[1] - context_length, device=device)
    lengths = attention_mask.sum(1)  # (B,) real tokens: the query without its left padding, the response to its EOS
    if padding_free:
        seqs = [row[mask.bool()].tolist() for row, mask in zip(query_responses, attention_mask)]
        input_ids, position_ids, starts = (x.to(device) for x in pack(seqs, 0))
        inputs = {"input_ids": input_ids, "position_ids": position_ids}
        query_lengths = attention_mask[:, :context_length].sum(1)
        cols = starts[:, 1:] + torch.minimum(query_lengths[:, None] - 1 + t, lengths[:, None] - 1)
        last = torch.stack([starts[:, 0], starts[:, 1] + lengths - 1], dim=1)
    else:
        inputs = {"input_ids": query_responses, "attention_mask": attention_mask,
                  "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0)}  # left padding shifts nothing
        cols = (context_length - 1 + t).expand(batch, -1)
        last = torch.stack([torch.arange(batch, device=device), last_token_index(attention_mask)], dim=1)
    return inputs, (last[:, :1].expand_as(cols), cols), last


def shared_prompt_layout(query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
                         queries: list[tuple]):
    """`layout`'s padding-free result with each distinct prompt fed once: a prompt and every response to it form one
    segment, packed into rows as `pack` packs sequences, and a response attends to its prompt's keys and values and to
    its own earlier tokens, never to a sibling's. The same numbers as one sequence per response (to float rounding):
    the prompt's tokens see the same tokens at the same positions either way.

        columns    [ p_0 ... p_{P-1} | a_0 ... a_{A-1} | b_0 ... b_{B-1} | ... ]   one segment: prompt, responses
        positions    0 ... P-1         P ... P+A-1       P ... P+B-1
        mask (R, 1, W, W): a_i sees p_*, a_0..a_i; b_i sees p_*, b_0..b_i; p_i sees p_0..p_i

    A group of G responses to a P-token prompt costs P + sum of lengths tokens instead of G P + sum of lengths; the
    logit that predicts each response's first token is the prompt's last, computed once for the group. The mask is
    boolean (SDPA's convention; `sharing_works` checks a model honours it). `queries`: each row's prompt ids, unpadded.
    """
    device = query_responses.device
    query_lengths = attention_mask[:, :context_length].sum(1).tolist()
    lengths = attention_mask.sum(1).tolist()
    segment_of, members = {}, []  # prompt ids -> its segment; each segment's rows
    for b, q in enumerate(queries):
        if q not in segment_of:
            segment_of[q] = len(members)
            members.append([])
        members[segment_of[q]].append(b)
    rows = [query_responses[b][attention_mask[b].bool()].tolist() for b in range(len(queries))]
    segments = [list(q) + [tok for b in members[s] for tok in rows[b][len(q):]] for q, s in segment_of.items()]
    input_ids, _, starts = pack(segments, 0)  # (R, W); (S, 2) row and first column of each segment
    R, W = input_ids.shape
    segment = torch.full((R, W), -1, dtype=torch.long)  # per column: its segment (-1: padding),
    branch = torch.full((R, W), -1, dtype=torch.long)  # 0 in the prompt, k on the segment's k-th response
    position_ids = torch.zeros((R, W), dtype=torch.long)
    prompt_start, response_start = torch.zeros(len(queries), dtype=torch.long), torch.zeros(len(queries), dtype=torch.long)
    for s, (q, (r, c)) in enumerate(zip(segment_of, starts.tolist())):
        P = len(q)
        segment[r, c: c + P], branch[r, c: c + P], position_ids[r, c: c + P] = s, 0, torch.arange(P)
        c += P
        for k, b in enumerate(members[s], start=1):
            A = lengths[b] - P
            segment[r, c: c + A], branch[r, c: c + A], position_ids[r, c: c + A] = s, k, torch.arange(P, P + A)
            prompt_start[b], response_start[b] = starts[s, 1], c
            c += A
    causal = torch.ones(W, W, dtype=torch.bool).tril()
    sees = (segment[:, :, None] == segment[:, None, :]) & causal & (  # (R, W queries, W keys)
        (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :]))
    inputs = {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device),
              "attention_mask": sees[:, None].to(device)}
    # sequence index i of response token t's logit, as in `layout`: P - 1 + t, held at the response's last token
    P, L = torch.tensor(query_lengths)[:, None], torch.tensor(lengths)[:, None]
    i = torch.minimum(P - 1 + torch.arange(query_responses.shape[1] - context_length), L - 1)  # (B, T)
    cols = torch.where(i < P, prompt_start[:, None] + i, response_start[:, None] + i - P)
    row = starts[[segment_of[q] for q in queries], 0]  # (B,)
    last = torch.stack([row, response_start + L[:, 0] - P[:, 0] - 1], dim=1).to(device)
    return inputs, (last[:, :1].expand_as(cols), cols.to(device)), last


@torch.no_grad()
def sharing_works(model, max_length: int) -> bool:
    """Does `model` honour `shared_prompt_layout`'s boolean (R, 1, W, W) attention mask, giving each response the
    numbers it gets alone? True for transformers' SDPA attention in the models that build their masks with
    `masking_utils` (Llama, SmolLM2, Qwen2/3, Mistral, Phi-3, OLMo 2, Gemma 3, GPT-2 tested); false for eager attention
    (it adds a mask, so a boolean one means nothing to it: Gemma 2's default), flash attention, remote code that
    ignores the mask, and a sliding window or attention chunk shorter than `max_length` tokens (a custom mask is used
    as given, so the window would not be applied)."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if min(window or max_length, getattr(config, "attention_chunk_size", None) or max_length) < max_length:
        return False
    backbone, was_training = getattr(model, model.base_model_prefix), model.training
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    prompts, responses = [[11, 12, 13], [21, 22]], [[31, 32], [41, 42, 43], [51]]  # 2 responses to the first prompt
    seqs = [[t % vocab for t in p + r] for p, r in zip([prompts[0], prompts[0], prompts[1]], responses)]
    width = max(len(p) for p in prompts)
    ids, mask = torch.zeros(3, width + 3, dtype=torch.long), torch.zeros(3, width + 3, dtype=torch.long)
    for b, (p, r) in enumerate(zip([prompts[0], prompts[0], prompts[1]], responses)):
        ids[b, width - len(p): width + len(r)] = torch.tensor(seqs[b])
        mask[b, width - len(p): width + len(r)] = 1
    queries = [tuple(ids[b, :width][mask[b, :width].bool()].tolist()) for b in range(3)]
    inputs, _, last = shared_prompt_layout(ids.to(model.device), mask.to(model.device), width, queries)
    try:
        shared = backbone(**inputs, use_cache=False).last_hidden_state[last[:, 0], last[:, 1]]
    except (RuntimeError, ValueError, TypeError):  # an attention that refuses a 4D mask
        model.train(was_training)
        return False
    alone = torch.stack([backbone(input_ids=torch.tensor([s], device=model.device), use_cache=False).last_hidden_state[
        0, -1] for s in seqs])
    model.train(was_training)
    tol = 1e-3 if shared.dtype == torch.float32 else 5e-2
    return torch.allclose(shared.float(), alone.float(), rtol=tol, atol=tol)


# Rewards and the RL stages' evaluation


def reward_model_paths(args) -> tuple[str, ...]:
    """--reward-model-path resolved ('auto': models/reward_model, or none with --reward-fn given alone), checked: a
    reward is given, and the default paths exist (else the command that makes them)."""
    paths = args.reward_model_path
    if paths in [("auto",), ("none",)]:
        paths = () if args.reward_fn or paths == ("none",) else ("models/reward_model",)
    if not paths and not args.reward_fn:
        raise SystemExit("error: no reward: give --reward-model-path, --reward-fn, or both")
    require_stage(args.sft_model_path, "models/sft", "python sft.py", "--sft-model-path")
    for path in paths:
        require_stage(path, "models/reward_model", "python reward_model.py", "--reward-model-path")
    return paths


def load_reward_fns(args) -> list[tuple[str, object, float]]:
    """--reward-fn and --reward-fn-weights -> [(name, function, weight)], each name `score_{function}` (`_{i}` when
    there are several), as their parts are logged."""
    weights = args.reward_fn_weights or (1.0,) * len(args.reward_fn)
    if len(weights) != len(args.reward_fn):
        raise SystemExit(f"error: {len(weights)} --reward-fn-weights for {len(args.reward_fn)} --reward-fn")
    return [(f"score_{spec.rpartition(':')[2]}_{i}" if len(args.reward_fn) > 1 else f"score_{spec.rpartition(':')[2]}",
             load_function(spec), weight) for i, (spec, weight) in enumerate(zip(args.reward_fn, weights))]


def load_reward_models(paths, tokenizer, policy, args, frozen: dict, device):
    """The frozen reward models -> ([(model, its tokenizer, whether that is the policy's tokenizer)], whether the first
    can seed the value model). A reward model with the policy's tokenizer scores the policy's ids; one with its own is
    given decoded text. Checks the label layout, and warns when reward_model.py normalised its scores on samples drawn
    unlike this run's rollouts."""
    members, reusable = [], False  # (model, its tokenizer, whether it shares the policy's tokenizer) per reward model
    for path in paths:
        reward_model = AutoModelForSequenceClassification.from_pretrained(path, **frozen).to(device)
        try:
            reward_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError):  # a folder saved without its tokenizer
            print("reward model: no tokenizer in its folder, so the policy's is assumed")
            reward_tokenizer = tokenizer
        if reward_tokenizer.pad_token is None:  # padding is read from the attention mask: any id will do
            reward_tokenizer.pad_token = reward_tokenizer.eos_token or reward_tokenizer.unk_token
        num_labels = reward_model.config.num_labels
        if num_labels > 1 and args.reward_label_index is None:
            raise SystemExit(f"error: {path} has {num_labels} outputs ({reward_model.config.id2label}): "
                             "choose the reward with --reward-label-index")
        if args.reward_label_index is not None and not 0 <= args.reward_label_index < num_labels:
            raise SystemExit(f"error: --reward-label-index {args.reward_label_index}, but {path} has "
                             f"{num_labels} output(s)")
        # the same tokenizer (same vocabulary and ids, once the policy's pad rule is applied): score the policy's ids
        if hasattr(reward_model, "score"):
            setup_tokenizer(reward_tokenizer, reward_model)
        same_tokenizer = hasattr(reward_model, "score") and reward_tokenizer.get_vocab() == tokenizer.get_vocab()
        if not members:  # the value model may start from the first reward model
            reusable = same_tokenizer and num_labels == 1 and (
                reward_model.config.get_text_config().hidden_size == policy.config.get_text_config().hidden_size)
        members.append((reward_model, reward_tokenizer, same_tokenizer))
        print("reward model: " + ("the policy's tokenizer; its token ids are scored directly" if same_tokenizer
              else "its own tokenizer (another vocabulary): responses are decoded and re-tokenized, "
              + ("in its chat template" if reward_tokenizer.chat_template is not None else "as plain text"))
              + (f" ({path})" if len(paths) > 1 else ""))
        rm_args_file = os.path.join(path, "args.json")  # written by reward_model.py
        rm_args = json.load(open(rm_args_file)) if os.path.exists(rm_args_file) else {}
        normalised_on = [rm_args.get(k) for k in ("normalize_temperature", "normalize_response_length",
                                                  "normalize_max_prompt_length")]
        if rm_args.get("normalize_on") == "sft_samples" and normalised_on != [
                args.temperature, args.response_length, args.max_prompt_length]:
            print(f"warning: the reward model was normalised on samples at temperature, response length, prompt length "
                  f"{normalised_on}; this run samples at {[args.temperature, args.response_length, args.max_prompt_length]}"
                  ", so its first rollouts will not score about 0 (rerun reward_model.py with matching --normalize-*)")
    if len(members) > 1:
        print(f"reward: an ensemble of {len(members)} reward models, mean - {args.ensemble_k:g} * std")
    return members, reusable


class Prompts(NamedTuple):
    """What `load_prompts` returns: records (a prompt and its other fields) and their prompts' ids, in step."""
    train_records: list[dict]
    train_prompts: list[list[int]]
    eval_records: list[dict]
    eval_prompts: list[list[int]]


def load_prompts(args, tokenizer, eval_dataset: str, eval_reward_fn: str, reward_fns: list, tools=None) -> Prompts:
    """The RL stages' prompts: the training records and the held-out ones (the first --num-eval-prompts, of the
    training prompts when there are none), checked for the fields the reward functions and the judge take, and encoded
    (`encode_prompt`), without those that cannot fit --max-prompt-length even cut."""
    train_records = read_data(args.dataset, "prompt", None, args.dataset_config, args.dataset_split)
    eval_records = read_data(eval_dataset, "prompt", None, args.dataset_config, args.eval_split or "train", True) if (
        eval_dataset != "none") else []
    for spec, (_, fn, _) in zip(getattr(args, "reward_fn", ()), reward_fns):
        check_record_fields(fn, spec, train_records, args.dataset)
    if eval_reward_fn:
        check_record_fields(load_function(eval_reward_fn), eval_reward_fn, eval_records or train_records,
                            eval_dataset if eval_records else args.dataset)

    def encode(records):
        encoded = [(r, *encode_prompt(tokenizer, r["prompt"], args.max_prompt_length, tools)) for r in records]
        kept = [(r, ids) for r, ids, _ in encoded if ids is not None]
        if len(kept) < len(encoded):
            print(f"skipped {len(encoded) - len(kept)} prompts whose fixed part exceeds --max-prompt-length")
        cut = sum(was_cut for _, ids, was_cut in encoded if ids is not None)
        if cut:
            print(("warning: " if cut > 0.1 * len(encoded) else "") + f"{cut} of {len(encoded)} prompts cut from the "
                  f"left to --max-prompt-length {args.max_prompt_length} (the model sees only their end)")
        return [r for r, _ in kept], [ids for _, ids in kept]
    train_records, train_prompts = encode(train_records)
    if not eval_records:  # evaluation samples training prompts; its scores are then not held-out figures
        print("no held-out prompts (--eval-dataset FILE to add them): evaluation samples training prompts")
    eval_records, eval_prompts = encode((eval_records or train_records)[: args.num_eval_prompts])
    return Prompts(train_records, train_prompts, eval_records, eval_prompts)


@torch.no_grad()
def score_responses(batch: Rollout, records: list[dict], tokenizer, reward_ws: list, reward_fns: list, args,
                    padding_free: bool, autocast, share_prompt: bool = False) -> tuple[torch.Tensor, dict]:
    """(B,) scores of a rollout's responses, and their parts, as PPO and GRPO score them. `reward_ws`: (model wrapper,
    its tokenizer, whether that is the policy's) per reward model. One of the policy's tokenizer reads the last real
    token of the policy's ids (the end token, then `score_suffix`, where transformers reads the rendered conversation);
    one of another reads decoded text (`score_texts`); --reward-label-index and --reward-transform pick and shape a
    classifier's output; an ensemble's score is mean - ensemble_k * std over its members. Each --reward-fn term
    (`score_{name}`, unweighted) reads the text and the record's fields and adds weight * term; None from it is scored
    0 and counted (`parse_failures`)."""
    if batch.tool_calls is not None:  # reward functions that name `messages` get the exchange, the tools' turns in it
        records = [dict(r, fields=r.get("fields", {}) | {"messages": m}) for r, m in zip(records, exchanges(batch,
                                                                                                           tokenizer))]
    texts = None  # decoded only for what reads text: a reward function, or a reward model of another tokenizer
    if reward_fns or not all(same for _, _, same in reward_ws):
        texts = response_texts(batch, tokenizer)  # with tools, the policy's own turns: never a tool's result
    prompts_text = [r["prompt"] for r in records]
    parts, members = {}, []
    for reward_w, reward_tokenizer, same_tokenizer in reward_ws:
        with autocast():
            if same_tokenizer:
                ids, mask = batch.query_responses, batch.attention_mask
                if score_suffix(tokenizer):
                    ids, mask = with_score_suffix(ids, mask, batch.has_eos, score_suffix(tokenizer))
                inputs, _, last = layout(ids, mask, batch.context_length, padding_free, share_prompt)
                outputs = reward_w(reward_scores, **inputs, last=last)
            else:  # the reward model's own tokens
                outputs = reward_w(score_texts, reward_tokenizer, prompts_text, texts)
        if outputs.dim() == 2:  # several labels: the chosen one is the reward
            outputs = outputs[:, args.reward_label_index]
        members.append(F.logsigmoid(outputs) if args.reward_transform == "logsigmoid" else outputs)
    device = batch.responses.device
    scores = torch.zeros(len(records), device=device)
    if members:
        members = torch.stack(members)  # (M, B)
        if len(members) == 1:
            scores = parts["score_rm"] = members[0]
        else:  # the sample standard deviation over members: how much they disagree on each response
            parts["rm_std"] = members.std(dim=0)
            parts.update({f"score_rm_{i}": m for i, m in enumerate(members)})
            scores = parts["score_rm"] = members.mean(dim=0) - args.ensemble_k * parts["rm_std"]
    failed = torch.zeros(len(records), dtype=torch.bool, device=device)
    for name, fn, weight in reward_fns:
        call = timed(record_caller(fn), args.reward_fn_timeout, f"--reward-fn {name[6:]}")
        parts[name], unscored = scored([call(r["prompt"], t, r.get("fields", {})) for r, t in zip(records, texts)],
                                       device, f"--reward-fn {name[6:]}", records)
        scores, failed = scores + weight * parts[name], failed | unscored
    if reward_fns:  # the share of responses a reward function could not score (None: scored 0)
        parts["parse_failures"] = failed.float()
    return scores, parts


def timed(call, seconds: float, what: str):
    """A reward function or judge that may take at most `seconds` on one response (0: no limit): past it, that response
    is scored None ("cannot score", counted in parse_failures) with a warning, and the run goes on, its signals
    heard. SIGALRM: in the main thread on Linux and macOS; elsewhere without a limit."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        return call

    def expire(*_):
        raise TimeoutError

    def limited(*args):
        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return call(*args)
        except TimeoutError:
            print(f"warning: {what} took more than {seconds:g} s on one response: scored None (--reward-fn-timeout)")
            return None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return limited


def parts_to_log(parts: dict) -> dict:
    """The parts of a score worth logging: every term when there are several (a hybrid reward; an ensemble's members
    and their spread), and the share a reward function could not score. One term alone would only repeat the score."""
    terms = {k: v for k, v in parts.items() if k != "parse_failures"}
    return (terms if len(terms) > 1 else {}) | {k: v for k, v in parts.items() if k == "parse_failures"}


@torch.no_grad()
def generate(model_w, prompts: list[list[int]], response_length: int, temperature: float, end_id: int, pad_id: int,
             autocast, with_logprobs: bool = False, share_prompt: bool = False, tools=None) -> Rollout:
    """`common.rollout` from the first model of a `distribute`d wrapper (a policy, or its reference), its parameters
    gathered once for the whole decode loop (`gathered`). `tools`: `common.rollout_with_tools` with the tools and their
    limits bound, which then samples instead (a turn that calls a tool goes on after its result)."""
    def sample_with(model, *_):
        if tools:
            return tools(model, prompts=prompts, response_length=response_length, temperature=temperature,
                         end_id=end_id, pad_id=pad_id, with_logprobs=with_logprobs)
        return rollout(model, prompts, response_length, temperature, end_id, pad_id, with_logprobs, share_prompt)
    with autocast(), gathered(model_w) as generator:
        return generator(sample_with)


def load_tools(specs: tuple[str, ...], tokenizer) -> dict:
    """--tools file.py:name ... -> {name: function}, each loaded at start; says where the chat template shows no tool
    schema (the model then learns of the tools only from the prompts)."""
    tools = {spec.rpartition(":")[2]: load_function(spec) for spec in specs}
    if tools and tokenizer.chat_template is not None:
        chat = [{"role": "user", "content": "Hi"}]
        try:
            shown = tokenizer.apply_chat_template(chat, tools=list(tools.values()), tokenize=False) != (
                tokenizer.apply_chat_template(chat, tokenize=False))
        except Exception as e:  # transformers reads the schema from type hints and a docstring with an Args section
            raise SystemExit(f"error: --tools: {' '.join(str(e).split())[:300]}") from None
        if not shown:
            print("the chat template shows no tool schema: the model learns of --tools only from what the prompts say")
    return tools


def with_and_without_call(values: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """With tools: the share of responses that call one, and the mean of `values` over those that do and over those
    that do not (0 where there are none)."""
    values, used = values.float(), used.to(values.device)
    return (used.float().mean(), (values * used).sum() / used.sum().clamp(min=1),
            (values * ~used).sum() / (~used).sum().clamp(min=1))


def tool_metrics(batch: Rollout, scores: torch.Tensor) -> dict:
    """A tool rollout's tools/* metrics: calls per response, each outcome per response (parse: no JSON call, unknown:
    no such tool, error, timeout, cut: the result was cut), tokens inserted, the share that calls and the mean score
    with and without a call."""
    outcomes = [[o for _, o in calls] for calls in batch.tool_calls]
    used = torch.tensor([bool(o) for o in outcomes])
    out = {f"tools/{name}": sum(sum(o.startswith(name) or o.endswith(name) for o in c) for c in outcomes) / len(outcomes)
           for name in ("parse", "unknown", "error", "timeout", "cut")}
    out["tools/used"], out["tools/scores_with_call"], out["tools/scores_without_call"] = with_and_without_call(scores,
                                                                                                              used)
    return out | {"tools/calls_per_response": sum(map(len, outcomes)) / len(outcomes),
                  "tools/inserted_tokens": (batch.response_mask & ~batch.policy_mask).sum(1).float().mean()}


def stutters(text: str) -> bool:
    """Whether a response repeats a pair of consecutive words ("great and great and"): the degenerate text a reward
    model can come to overrate; the share of such responses is logged as eval/stutter_rate."""
    words = re.findall(r"[\w']+", text.lower())
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) < len(pairs)


def pass_rates(generate, judge, records: list, k: int) -> tuple[dict, torch.Tensor]:
    """Held-out accuracy under a judge that gives 1 for a right answer (a verifier; None or less is wrong): the greedy
    response's pass@1, and with k > 1, from k sampled responses per prompt, their pass@1 (the mean) and pass@k (any of
    the k right: Chen et al. 2021's unbiased estimator with n = k). generate(indices, temperature) -> the texts of
    those records' responses; temperature 0 is greedy, None the training temperature. Returns the figures, and
    which greedy responses were right ((N,) bool)."""
    def right(indices, texts):
        return scored([judge(records[i]["prompt"], t, records[i].get("fields", {})) for i, t in zip(indices, texts)],
                      "cpu", "the judge", [records[i] for i in indices])[0] >= 1
    every = list(range(len(records)))
    greedy = right(every, generate(every, 0.0))
    out = {"eval/pass@1_greedy": greedy.float().mean()}
    if k > 1:
        repeated = [i for i in every for _ in range(k)]
        ok = right(repeated, generate(repeated, None)).view(-1, k)
        out |= {"eval/pass@1": ok.float().mean(), f"eval/pass@{k}": ok.any(1).float().mean()}
    return out, greedy


@torch.no_grad()
def evaluate_policy(step: int, policy_w, ref_w, records: list, prompts: list, generate, score, kl, tokenizer,
                    eval_reward_fn: str, pass_k: int, metrics, num_sample_rows: int, timeout: float,
                    final: bool = False) -> dict:
    """PPO's and GRPO's evaluation: one response per held-out prompt (`generate(model_w, prompts, temperature=...)`),
    its score and parts (`score(batch, records)`), KL to the SFT model (`kl(batch)`: (B,) summed over the response, or
    None), length, end-token rate, distinct responses and stutters; with a judge its gold score, at the end the gold
    win rate against the SFT model (`ref_w`) on the same prompts, and with a verifier (pass_k) held-out accuracy. Every
    process samples (its own draws); the figures are the means over processes, the table rank 0's."""
    if not prompts:  # --num-eval-prompts 0
        return {}
    started = time.time()
    tqdm.write(f"eval @ {step}: {len(prompts)} held-out prompts" + (f", pass@{pass_k}" if pass_k else "") + "...")
    policy_w.eval()
    texts = [r["prompt"] for r in records]
    batch = generate(policy_w, prompts)
    kls = kl(batch)
    scores, parts = score(batch, records)
    out = {"eval/scores": scores.mean(), "eval/response_length": batch.actions().sum(1).float().mean(),
           "eval/eos_rate": batch.has_eos.float().mean()} | ({"eval/kl": kls.mean()} if kls is not None else {})
    if batch.tool_calls is not None:  # with tools: the share of responses that call one, the score with and without
        out["eval/tools_used"], out["eval/scores_with_call"], out["eval/scores_without_call"] = with_and_without_call(
            scores, torch.tensor([bool(c) for c in batch.tool_calls]))
    out.update({f"eval/{k}": v.mean() for k, v in parts_to_log(parts).items()})
    decoded = response_texts(batch, tokenizer)  # with tools, the policy's own turns (the exchange: in the table)
    out["eval/distinct_responses"] = len(set(decoded)) / len(decoded)  # falls when the policy collapses to a template
    if "score_rm" in parts:  # a word pair repeated: the degenerate text a learned reward model can come to overrate
        out["eval/stutter_rate"] = sum(map(stutters, decoded)) / len(decoded)
    if eval_reward_fn:
        judge = timed(record_caller(load_function(eval_reward_fn)), timeout, eval_reward_fn)
        gold, unscored = scored([judge(r["prompt"], t, r.get("fields", {})) for r, t in zip(records, decoded)], "cpu",
                                eval_reward_fn, records)
        out["eval/gold_score"], out["eval/gold_parse_failures"] = gold.mean(), unscored.float().mean()
        if final and ref_w is not None:  # the SFT model answers the same prompts; the gold judge picks (ties half)
            sft_texts = response_texts(generate(ref_w, prompts), tokenizer)
            sft_gold = scored([judge(r["prompt"], t, r.get("fields", {})) for r, t in zip(records, sft_texts)], "cpu",
                              eval_reward_fn, records)[0]
            out["eval/sft_gold_score"] = sft_gold.mean()
            out["eval/gold_win_rate_vs_sft"] = ((gold > sft_gold).float() + 0.5 * (gold == sft_gold).float()).mean()
            metrics.log(step, sft_samples="\n".join(f"  {t!r:.300} -> {d!r}" for t, d in zip(texts, sft_texts)))
        if pass_k:  # a verifier's accuracy: greedy at every evaluation, pass@k at the first and last
            used = []  # with tools: whether each greedy response calls one

            def texts_of(indices, temperature):  # temperature None: the training temperature
                chunks = [indices[k: k + len(prompts)] for k in range(0, len(indices), len(prompts))]
                sampling = {} if temperature is None else {"temperature": temperature}
                batches = [generate(policy_w, [prompts[i] for i in c], **sampling) for c in chunks]
                if temperature == 0.0 and batches[0].tool_calls is not None:
                    used.extend(bool(c) for b in batches for c in b.tool_calls)
                return sum((response_texts(b, tokenizer) for b in batches), [])
            rates, right = pass_rates(texts_of, judge, records, pass_k if step == 0 or final else 1)
            out |= rates
            if used:  # with tools: the share of greedy responses that call one, their accuracy with and without
                out["eval/tools_used_greedy"], out["eval/pass@1_greedy_with_call"], out[
                    "eval/pass@1_greedy_without_call"] = with_and_without_call(right, torch.tensor(used))
    shown = tokenizer.batch_decode(batch.responses, skip_special_tokens=True)  # with tools, the whole exchange
    table = "\n".join(f"  {s:+.2f} | {t!r:.300} -> {d!r}" for s, t, d in zip(scores.tolist(), texts, shown))
    out = {k: all_reduce(torch.as_tensor(v, dtype=torch.float, device=scores.device), "mean") for k, v in out.items()}
    metrics.log(step, out, samples=table)
    tqdm.write(f"eval @ {step} ({time.time() - started:.0f} s): " + "  ".join(f"{k[5:]} {v:.3f}" for k, v in out.items())
               + "\n" +
               "\n".join(table.split("\n")[: num_sample_rows]))
    policy_w.train()
    return out


# Saves, checkpoints and exact resume


def lock_path(out_dir: str) -> str:
    """Where a run on `out_dir` holds its lock: beside the real folder (a link to it is the same folder), under a name no
    other tool uses, so that no file of the user's is ever the lock."""
    real = os.path.realpath(out_dir.rstrip("/"))
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.rlhf-run.lock")


def hold_lock(path: str, what: str, hint: str):
    """An exclusive flock on `path` while this process lives (a killed holder's lock is free again at once), the file
    made if needed and never reached through a link, holding the holder's pid, host and command; removed at exit if it
    is still the file this run locked. Returns the release function."""
    while True:
        try:
            lock = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644), "r+")
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SystemExit(f"error: {path} is a link: refused (a run's lock is never followed)") from None
            raise
        with contextlib.suppress(ImportError):  # fcntl: not on Windows
            import fcntl

            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SystemExit(f"error: {what} is in use by another run ({lock.read().strip()}): {hint}") from None
        if os.fstat(lock.fileno()).st_nlink:  # not removed meanwhile by the run that held it, as it ended
            break
        lock.close()
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {os.uname().nodename}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
               f"{' '.join(sys.argv)[:200]}\n")
    lock.flush()

    def release():  # at exit: the lock file goes (if it is still this run's), then the lock
        if lock.closed:
            return
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(lock.fileno()), os.lstat(path)):
                os.remove(path)
        lock.close()
    atexit.register(release)
    return release


def claim_output_dir(out_dir: str, resume: bool) -> None:
    """Before any work: finish or undo a save that a kill interrupted (of `out_dir` and of its checkpoint), lock the real
    folder against a second run (`lock_path`, a link to it included), and check that a save can be written beside it.
    Under torchrun, rank 0."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    out_dir = os.path.realpath(out_dir.rstrip("/"))  # a link to a folder: the folder it names, saved in place
    parent = os.path.dirname(out_dir)
    if getattr(claim_output_dir, "release", None) is not None:  # a previous main() in this process
        atexit.unregister(claim_output_dir.release)
        claim_output_dir.release()
    try:
        os.makedirs(parent, exist_ok=True)
        claim_output_dir.release = hold_lock(lock_path(out_dir), out_dir, "wait for it to end, or choose another "
                                             "--output-dir")
    except OSError as e:
        raise SystemExit(f"error: cannot write beside {out_dir} ({e.strerror}): choose another --output-dir")
    for folder in (out_dir, os.path.join(out_dir, "checkpoint")):
        tmp, old = folder + ".tmp", folder + ".old"
        if not os.path.exists(folder) and os.path.exists(old):  # killed between the two renames of a save
            if os.path.exists(os.path.join(tmp, "args.json")):  # written last: the new save is whole
                os.replace(tmp, folder)
                print(f"{folder}: a save was interrupted after it was written; it is now in place")
            else:
                os.replace(old, folder)
                print(f"{folder}: a save was interrupted; the previous one is back in place")
        for leftover in (tmp, old):
            if os.path.exists(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
                print(f"removed {leftover}, left by an interrupted save")
    if resume and os.path.isdir(os.path.join(out_dir, "checkpoint")) and not all(
            os.path.exists(os.path.join(out_dir, "checkpoint", f)) for f in ("args.json", "training_state.pt")):
        raise SystemExit(f"error: {out_dir}/checkpoint is incomplete (a run of an older version was killed while "
                         "writing it): remove it, or pass --no-resume, to start over")
    try:
        with open(os.path.join(parent, f".write_test_{os.getpid()}"), "wb") as f:
            f.write(b"\0" * 4096)
        os.remove(f.name)
    except OSError as e:
        raise SystemExit(f"error: cannot write beside {out_dir} ({e.strerror}): choose another --output-dir")


def check_room(out_dir: str, *models) -> None:
    """Stop before training when the disk cannot hold the models' save (fp32 weights as saved); warn when it cannot
    also hold a checkpoint (the weights and AdamW's two moments)."""
    need = sum(p.numel() * 4 for model in models for p in model.parameters())
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(out_dir.rstrip("/")))).free
    if free < need:
        raise SystemExit(f"error: {free / 2**20:.0f} MiB free beside {out_dir}, and the save needs about "
                         f"{need / 2**20:.0f} MiB: free some space or choose another --output-dir")
    if free < 4 * need:
        print(f"warning: {free / 2**20:.0f} MiB free beside {out_dir}; a checkpoint with the model needs about "
              f"{4 * need / 2**20:.0f} MiB")


def save_model(out_dir: str, tokenizer, config: dict, *models, training: tuple | None = None) -> None:
    """Hugging Face folders written whole into `out_dir.tmp`, then swapped in for `out_dir` in one step, so that a kill
    at any moment leaves the previous folder or the new one, complete. `models` are (name, model) pairs: a subfolder
    ("" for the top) for a Hugging Face model, a file name for a plain module (safetensors); `config`, the run's flags,
    goes to args.json. `training` = (state, parallel, optimizer) makes it a resumable checkpoint: the optimizer through
    torch.distributed.checkpoint (under FSDP2 each process writes its own shard), each process's random generators (so
    that a resumed run samples what the uninterrupted one would have) and `state` (step, scheduler...). args.json is
    written last: it marks a whole save. Non-finite weights are never written. A LoRA model is saved merged, with its
    adapter in `adapter/`. Under torchrun every process hands over its shards and rank 0 writes."""
    states = [full_state_dict(model) for _, model in models]
    rank = dist.get_rank() if dist.is_initialized() else 0
    bad = [k for state in states for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    device = next(models[0][1].parameters()).device
    if all_reduce(torch.tensor(float(len(bad)), device=device)).item():  # rank 0 holds the gathered weights
        raise SystemExit(f"error: not saving {out_dir}: non-finite weights ({', '.join(bad[:3])}...), training diverged "
                         "(a lower --learning-rate?); what was saved before is as it was")
    out_dir = os.path.realpath(out_dir.rstrip("/"))  # a link to a folder: the folder is swapped, the link stays
    tmp, old = out_dir + ".tmp", out_dir + ".old"

    def settle(error) -> None:
        """Every process learns whether any failed before the next collective (under torchrun a process left waiting
        would die with a traceback of its own): the partial save goes; a full disk is one line, anything else raises."""
        if all_reduce(torch.tensor(float(error is not None), device=device), "max").item() == 0:
            return
        free = shutil.disk_usage(os.path.dirname(out_dir)).free
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None:
            raise SystemExit(f"error: saving {out_dir} failed in another process (its error is above)")
        causes = [error, *(cause for cause, _ in getattr(error, "failures", {}).values())]
        if all(getattr(c, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) for c in causes) and free > 2**20:
            raise error
        raise SystemExit(f"error: the disk is full: saving {out_dir} failed with {free} bytes free; the partial save "
                         f"is removed and what was saved before is as it was") from None

    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            for (name, model), state in zip(models, states):
                if hasattr(model, "peft_config"):  # LoRA: the adapter in peft's format, and the weights merged
                    save_adapter(model, state, os.path.join(tmp, name, "adapter"), tokenizer)
                    state = merge_lora(state, model.peft_config["default"])
                if hasattr(model, "save_pretrained"):
                    model.save_pretrained(os.path.join(tmp, name), state_dict=state)
                else:
                    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, name))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        except Exception as e:  # a full disk: an OSError, or a library's error after one
            error = e
    settle(error)  # and the folder exists for every process
    if training is not None:
        state, parallel, optimizer = training
        try:
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.save({"optimizer": get_optimizer_state_dict(parallel, optimizer)},
                         checkpoint_id=os.path.join(tmp, "optimizer"))
            torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                       os.path.join(tmp, f"rng_{rank}.pt"))
            if rank == 0:
                torch.save(state, os.path.join(tmp, "training_state.pt"))
        except (Exception, dcp.CheckpointException) as e:
            error = e
        settle(error)  # every process has written its part
    if rank == 0:
        try:
            with open(os.path.join(tmp, "args.json"), "w") as f:
                json.dump(config, f, indent=2, default=str)
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:
            error = e
    settle(error)
    if rank == 0:
        exchanged = False
        if os.path.exists(out_dir):  # Linux: renameat2(RENAME_EXCHANGE) swaps the two folders in one step
            with contextlib.suppress(OSError, AttributeError):  # elsewhere: two renames, claim_output_dir mends a kill
                exchanged = ctypes.CDLL(None, use_errno=True).renameat2(-100, tmp.encode(), -100, out_dir.encode(), 2) == 0
            if not exchanged:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out_dir, old)
        if exchanged:
            shutil.rmtree(tmp, ignore_errors=True)  # the previous folder, now
        else:
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


class _RestrictedUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's .metadata is a plain pickle: only the classes it is made of may be loaded."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                              ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.filesystem",
                                                                       "_StorageInfo")} or (
                module == "torch.distributed.checkpoint.metadata" and name.isidentifier()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"'{module}.{name}' is not part of a checkpoint")


class _CheckedReader(FileSystemReader):
    """torch.distributed.checkpoint's reader, with its metadata read through `_RestrictedUnpickler` whichever file it
    reads (the global .metadata, or a rank's __N.metadata it falls back to when that one does not serve), and required
    to be checkpoint metadata. `refused` says whether it met anything else."""

    refused = False

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _RestrictedUnpickler(f).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
        except pickle.UnpicklingError:
            self.refused = True
            raise
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_checkpoint(ckpt_dir: str, args) -> None:
    """Before a resume reads anything: no file of the checkpoint links out of it; it was made with the flags that shape
    it (LoRA's, PPO's value model); its state, random generators and safetensors files are whole. Each problem is one
    line naming the folder and what is wrong, not a traceback from deep inside a load."""
    real = os.path.realpath(ckpt_dir)
    for root, dirs, files in os.walk(ckpt_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.path.islink(path) and os.path.commonpath([os.path.realpath(path), real]) != real:
                raise SystemExit(f"error: {path} links outside the checkpoint ({os.path.realpath(path)}): refused, "
                                 "unread (remove the checkpoint, or pass --no-resume, to start over)")
    damaged = f"error: {ckpt_dir} is damaged or was made with other flags ({{}}): remove it or pass --no-resume"
    try:
        with open(os.path.join(ckpt_dir, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(damaged.format(f"args.json: {e}")) from None
    differ = [f"--{k.replace('_', '-')} {saved[k]} then, {getattr(args, k)} now" for k in (
        "lora_r", "lora_alpha", "lora_target_modules", "value_model") if k in saved and hasattr(args, k) and
        saved[k] != getattr(args, k)]
    if differ:
        raise SystemExit(damaged.format("; ".join(differ)))
    needed = ["training_state.pt", os.path.join("optimizer", ".metadata")] + (["adapter"] if args.lora_r else [])
    missing = [n for n in needed if not os.path.exists(os.path.join(ckpt_dir, n))]
    if missing or not any(f.startswith("rng_") for f in os.listdir(ckpt_dir)):
        raise SystemExit(damaged.format(f"missing: {', '.join(missing or ['rng_*.pt'])}"))
    for root, _, files in os.walk(ckpt_dir):
        for name in files:
            path = os.path.join(root, name)
            try:
                if name.endswith(".pt"):
                    torch.load(path, weights_only=True)  # a crafted one refused here as in load_state
                elif name.endswith(".safetensors"):
                    with safe_open(path, "pt") as f:  # the header against the file's size: a truncated one fails
                        f.keys()
            except pickle.UnpicklingError:
                raise SystemExit(f"error: {ckpt_dir} holds more than tensors and plain types: refused, unread (remove it "
                                 "to start over)") from None
            except Exception as e:
                raise SystemExit(damaged.format(f"{os.path.relpath(path, ckpt_dir)}: {' '.join(str(e).split())[:200]}"))


class _CheckedLoadPlanner(DefaultLoadPlanner):
    """torch.distributed.checkpoint's planner reads non-tensor entries with torch.load(weights_only=False): each is
    read with weights_only=True first, so anything but tensors and plain types is refused."""

    def load_bytes(self, read_item, value) -> None:
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


def load_state(ckpt_dir: str, parallel, optimizer) -> dict:
    """The saved training state (tensors and plain types only), with the optimizer and random generators restored.
    No file of the checkpoint is unpickled beyond tensors, plain types and checkpoint metadata. The checkpoint must
    come from as many processes as this run has: each one's share of the data depends on it."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    written_by = len([f for f in os.listdir(ckpt_dir) if f.startswith("rng_")])
    if written_by != world_size:
        raise SystemExit(f"error: {ckpt_dir} was written by {written_by} process(es), this run has {world_size}: resume "
                         "with as many, or start again with --no-resume")
    reader = _CheckedReader(os.path.join(ckpt_dir, "optimizer"))
    try:
        target = {"optimizer": get_optimizer_state_dict(parallel, optimizer)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(target, storage_reader=reader, planner=_CheckedLoadPlanner())
        set_optimizer_state_dict(parallel, optimizer, target["optimizer"])
        rng = torch.load(os.path.join(ckpt_dir, f"rng_{rank}.pt"), weights_only=True)
        state = torch.load(os.path.join(ckpt_dir, "training_state.pt"), weights_only=True)
    except (Exception, dcp.CheckpointException) as e:  # the latter wraps what the planner raised
        if reader.refused or isinstance(e, pickle.UnpicklingError) or "UnpicklingError" in str(e):
            raise SystemExit(f"error: {ckpt_dir} holds more than tensors and plain types: refused, unread (remove it "
                             "to start over)") from None
        cause = next(iter(getattr(e, "failures", {}).values()), (e,))[0]  # a CheckpointException: each rank's error
        raise SystemExit(f"error: {ckpt_dir} is damaged or was made with other flags (the optimizer's state: "
                         f"{type(cause).__name__}: {' '.join(str(cause).split())[:200]}): remove it or pass "
                         "--no-resume") from None
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# Signals, errors and metrics


class StopSignals:
    """SIGTERM (a preemption's notice) and Ctrl-C ask the loop to stop at the end of the current step with a checkpoint;
    a second Ctrl-C stops at once. `requested()` gives every process the same answer."""

    def __init__(self):
        self.signal = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signal:
            print(f"\n{signal.Signals(signum).name}: stopping at the end of this step, with a checkpoint (Ctrl-C again "
                  "to stop at once)", file=sys.stderr, flush=True)
        self.signal = self.signal or signum

    def requested(self, device) -> bool:
        """A signal came, or the logs can no longer be written (`Metrics.failed`): the same answer in every process."""
        asked = bool(self.signal) or Metrics.failed is not None
        return all_reduce(torch.tensor(float(asked), device=device), "max").item() > 0

    def checkpoint_due(self, done: int, total: int, every: int, device) -> bool:
        """After step `done` of `total`: whether to write a checkpoint, every `every` steps but the last, or to stop."""
        self.stopping = self.requested(device) and done < total
        return (done % every == 0 and done < total) or self.stopping

    def stop_if_asked(self, ckpt_dir: str, step: int) -> None:
        """After the checkpoint that `checkpoint_due` asked for: exit if a signal asked to stop."""
        if self.stopping:
            why = signal.Signals(self.signal).name if self.signal else (
                f"the logs, which cannot be written ({Metrics.failed})" if Metrics.failed else "a signal")
            print(f"stopped by {why} after step {step}; checkpoint in {ckpt_dir}: run the same command to continue")
            sys.exit(128 + (self.signal or signal.SIGTERM))

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def user_errors_in_one_line():
    """What a user can fix ends with one line, not a traceback: Ctrl-C outside the training loop (which stops at the end
    of a step), a DataError found past reading (a chat template refusing a conversation), a model or tokenizer that
    cannot load (a wrong path, a Hub name offline, an unknown architecture)."""
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit("interrupted") from None
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    except (OSError, ValueError) as e:
        if not any(frame.name == "from_pretrained" for frame in traceback.extract_tb(e.__traceback__)):
            raise
        raise SystemExit(f"error: cannot load a model or tokenizer: {' '.join(str(e).split())[:400]}") from None
    if dist.is_initialized() or getattr(init_distributed, "group", None) is not None:
        # a torchrun worker whose run ended well: exit before the interpreter's finalization, once the exit handlers
        # (the lock) have run. Finalizing, CPython frees the process group while gloo's threads still release the
        # last collectives' tensors, and about one torchrun run in 50 died there with SIGABRT ("terminate called
        # without an active exception"), after the model was saved, failing the launch (pytorch PR 179291 describes
        # the same race)
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(0)


class Clock:
    """Elapsed time and what is left at this pace, for the lines a run prints (a log file has no progress bar)."""

    def __init__(self, done: int, total: int):
        self.start, self.done, self.total = time.time(), done, total  # a resumed run counts from where it resumed

    def __call__(self, done: int) -> str:
        elapsed = time.time() - self.start
        left = elapsed / max(1, done - self.done) * (self.total - done)
        return f"[{self.hms(elapsed)} elapsed, {self.hms(left)} left]"

    @staticmethod
    def hms(seconds: float) -> str:
        return f"{int(seconds) // 3600}:{int(seconds) // 60 % 60:02d}:{int(seconds) % 60:02d}"


def stop_if_not_finite(step: int, output_dir: str, **values: float) -> None:
    """A loss or gradient norm that is NaN or infinite ends the run before the optimizer steps on it: nothing is saved,
    the output folder and its last checkpoint stay as they were."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise SystemExit(f"error: step {step}: {', '.join(f'{k} {v}' for k, v in bad.items())}: training diverged "
                         f"(a lower --learning-rate?); nothing saved: {output_dir} and its last checkpoint are as they were")


class Metrics:
    """Scalars and texts to runs/{run_name}/metrics.jsonl (one JSON object per line), TensorBoard when installed, and
    Weights & Biases with --track. Logs that cannot be written (a full disk) stop nothing at once: `failed` says why,
    and the loop stops at the end of the step with a checkpoint (`StopSignals.requested`)."""

    failed = None

    def __init__(self, run_dir: str, config: dict, track: bool = False, project: str = "rlhf", resume: dict | None = None):
        self.on = not dist.is_initialized() or dist.get_rank() == 0  # rank 0 logs for all processes
        if not self.on:
            return
        os.makedirs(run_dir, exist_ok=True)
        if shutil.disk_usage(run_dir).free < 16 * 2**20:
            raise SystemExit(f"error: {shutil.disk_usage(run_dir).free // 2**20} MiB free for the logs in {run_dir}: free "
                             "some space, or run from a folder on another disk")
        self.jsonl, self.start = open(os.path.join(run_dir, "metrics.jsonl"), "a"), time.time()
        if resume and "log_bytes" in resume:  # what was logged after the checkpoint is logged again: drop it
            self.jsonl.truncate(resume["log_bytes"])
            self.jsonl.seek(resume["log_bytes"])
        self.tb = self.wandb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(run_dir, purge_step=resume["step"] + 1 if resume else None)
        except ImportError:
            print("tensorboard is not installed: logging to metrics.jsonl only")
        if track:  # its own sink: W&B's TensorBoard sync (sync_tensorboard) would drop the sample tables
            import wandb

            self.wandb = wandb.init(project=project, config=config, name=os.path.basename(run_dir))

    def log(self, step: int, scalars: dict | None = None, **texts: str) -> None:
        if not self.on:
            return
        row = {k: float(v) for k, v in (scalars or {}).items()} | {k: v[:100_000] for k, v in texts.items()}
        try:
            self.jsonl.write(json.dumps({"step": step, "time": round(time.time() - self.start, 2)} | row) + "\n")
            self.jsonl.flush()
        except OSError as e:
            if Metrics.failed is None:
                print(f"warning: {self.jsonl.name} cannot be written ({e.strerror}): stopping at the end of this step, "
                      "with a checkpoint", file=sys.stderr, flush=True)
            Metrics.failed = e.strerror or str(e)
            return
        for k, v in row.items():
            if self.tb is not None:
                (self.tb.add_text if isinstance(v, str) else self.tb.add_scalar)(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def position(self) -> int:
        """Bytes of metrics.jsonl written so far: a checkpoint keeps it, a resumed run cuts the file back to it."""
        return self.jsonl.tell() if self.on else 0

    def close(self) -> None:
        if not self.on:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def keep_freed_memory(device: torch.device) -> None:
    """CPU runs: glibc keeps freed memory for reuse instead of unmapping each large block (gradients, activations) and
    faulting it in again next step, 1.3-2.1x per step on SmolLM2 (benchmarks/README.md). A MALLOC_MMAP_MAX_ set wins."""
    if device.type == "cpu" and sys.platform == "linux" and "MALLOC_MMAP_MAX_" not in os.environ:
        with contextlib.suppress(OSError):  # OSError: not glibc (musl)
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: every block from the heap, none with an mmap of its own
            libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: keep up to 2 GB free at the heap's top


# LoRA (Hu et al. 2021), through the optional peft package: only with --lora-r > 0


def add_lora(model, r: int, alpha: float, target_modules: str, base: str, head: str = "", resume_dir: str = ""):
    """Rank-r adapters, dropout off, on `target_modules` of `model` ('all-linear': every linear layer of its decoder,
    never an LM or score head); every other weight frozen except `head`, a reward or value model's score head, trained
    whole. `model` changes in place and keeps its layout, so every pass runs as before; `save_model` writes it merged,
    with the adapter in peft's format (on `base`) in `adapter/`. `resume_dir`: the adapter saved there is loaded."""
    if importlib.util.find_spec("peft") is None:
        raise SystemExit("error: --lora-r needs the optional peft package: pip install peft")
    import peft

    backbone = getattr(model, model.base_model_prefix)
    linear = sorted({name.rpartition(".")[2] for name, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)})
    targets = linear if target_modules == "all-linear" else target_modules.split(",")
    if set(targets) - set(linear):  # peft adapts the names it finds and skips the others
        raise SystemExit(f"error: --lora-target-modules {target_modules}: this model has no linear layer named "
                         f"{', '.join(sorted(set(targets) - set(linear)))} (it has {', '.join(linear)})")
    with warnings.catch_warnings():  # transformers' deprecation notices, raised inside peft
        warnings.simplefilter("ignore", FutureWarning)
        peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                                   base_model_name_or_path=base))  # adapters put into `model` itself
    config = model.peft_config["default"]  # as saved: loads with peft's AutoPeftModelForCausalLM / ...SequenceClassification
    config.task_type, config.modules_to_save = ("SEQ_CLS", [head]) if head else ("CAUSAL_LM", None)
    if head:  # fp32, trained whole (the adapters are fp32 too: peft upcasts them beside a bf16 base)
        getattr(model, head).float().requires_grad_(True)
    if resume_dir:  # peft's names -> the model's: no wrapper prefix, the adapter's name inside its layers
        saved = load_file(os.path.join(resume_dir, "adapter", "adapter_model.safetensors"))
        state = {k.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.").replace(
            ".lora_B.", ".lora_B.default."): v for k, v in saved.items()}
        if model.load_state_dict(state, strict=False).unexpected_keys or not all(v.isfinite().all() for v in state.values()):
            raise SystemExit(f"error: {resume_dir} is damaged or was made with other flags (its adapter does not fit "
                             "this model, or holds non-finite numbers): remove it or pass --no-resume")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA r {r}, alpha {alpha:g} on {', '.join(targets)}: {trainable / 1e6:.2f}M trainable parameters of "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
    return model


def merge_lora(state: dict, config) -> dict:
    """A LoRA model's state dict -> the plain model's, fp32: each adapted weight W + (alpha / r) B A, as peft merges it."""
    merged = {}
    for name, value in state.items():
        if ".lora_" in name:
            continue
        if name.endswith(".base_layer.weight"):
            layer = name.removesuffix(".base_layer.weight")
            value = value + (config.lora_alpha / config.r) * (
                state[f"{layer}.lora_B.default.weight"] @ state[f"{layer}.lora_A.default.weight"])
        merged[name.replace(".base_layer.", ".")] = value.float() if value.is_floating_point() else value  # bf16 base
    return merged


def save_adapter(model, state: dict, folder: str, tokenizer) -> None:
    """The adapter (and a score head; the embeddings too if they grew by a pad token) in peft's format, with the
    tokenizer: `AutoPeftModelForCausalLM.from_pretrained(folder)` rebuilds the trained model from its base."""
    import peft

    config = model.peft_config["default"]
    adapter = peft.get_peft_model_state_dict(model, state_dict=state, save_embedding_layers="auto")
    adapter |= {k: v for k, v in state.items() if k.partition(".")[0] in (config.modules_to_save or [])}
    seen = set()  # tied weights (input and output embeddings) once
    adapter = {k: v for k, v in adapter.items() if not (v.data_ptr() in seen or seen.add(v.data_ptr()))}
    os.makedirs(folder)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in adapter.items()},
              os.path.join(folder, "adapter_model.safetensors"))
    config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def adapters_off(model):
    """LoRA's adapters switched off in `model` for the block: the model it started from, exactly."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "enable_adapters")]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # and trainable again


class WithoutAdapters:
    """The reference for free: called like the `Parallel` of a LoRA policy alone (`ref_w(fn, x)` = fn(policy, x)), it
    runs fn on the policy of `parallel` (its first model) with the adapters off: no second copy of the weights."""

    def __init__(self, parallel, policy):
        self.parallel, self.policy = parallel, policy

    def __call__(self, fn, *args, **kwargs):
        with adapters_off(self.policy):
            return self.parallel(lambda policy, *others: fn(policy, *others[len(others) - len(args):], **kwargs), *args)


# torch.distributed, launched by torchrun: without it these are single-process no-ops and every number is as before


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """-> (rank, world_size, device). Under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK) each process joins the
    process group (NCCL on GPUs, gloo on CPU) on its own device, cuda:LOCAL_RANK; only rank 0 prints (the others'
    stdout goes to os.devnull; errors still reach stderr). Without torchrun: one process, no group."""
    world_size, local_rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if device == "cuda" and world_size > 1 else device)
    if world_size == 1:
        return 0, 1, device
    with contextlib.suppress(OSError, AttributeError):  # Linux: when the launcher dies, even by SIGKILL, its workers
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # get a SIGTERM (PR_SET_PDEATHSIG) instead of running on
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # held until the interpreter exits: were the group freed with main()'s models (DDP's reducer holds it), its gloo
    # threads, still releasing the last collective's tensors, would wait for the GIL while freeing it waits for them
    init_distributed.group = dist.group.WORLD
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank(), world_size, device


class Parallel(torch.nn.Module):
    """Models whose computation runs as this module's forward: `parallel(fn, *args)` returns fn(*models, *args). DDP
    syncs gradients and FSDP2 gathers parameters only around the forward of the module they wrap, and the stages call
    parts of a model (a backbone, then a head at chosen positions), so every pass goes through here."""

    def __init__(self, *models):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, fn, *args, **kwargs):
        return fn(*self.models, *args, **kwargs)


def distribute(models: list, strategy: str, bf16: bool, trainable: bool = True) -> torch.nn.Module:
    """`models` -> their `Parallel`, under torchrun replicated or sharded across the processes. 'ddp': a full copy per
    process, gradients averaged in backward (frozen models are left as they are: nothing to sync). 'fsdp' (FSDP2):
    parameters, gradients and optimizer state sharded, one unit per decoder layer plus the root (embeddings, final
    norm, heads), each gathered just for its forward and backward; with --bf16 the gathered copies are bf16 and the
    fp32 shards, Adam state and gradient reduction stay fp32 (MixedPrecisionPolicy)."""
    parallel = Parallel(*models)
    if not dist.is_initialized() or (strategy == "ddp" and not trainable):
        return parallel
    if strategy == "ddp":
        return DistributedDataParallel(parallel, forward_sync_buffers=False)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for model in models:
        for module in model.modules():  # a model's decoder layer classes are the ones it must not split
            if type(module).__name__ in (getattr(model, "_no_split_modules", None) or []):
                fully_shard(module, mp_policy=policy)
    return fully_shard(parallel, mp_policy=policy)


@contextlib.contextmanager
def gathered(parallel):
    """Yields the `Parallel` to generate with. Under FSDP2 its parameters are all-gathered once for the whole decode
    loop and freed after it (a full copy per process meanwhile): processes stop decoding at different steps, so the
    usual all-gather per forward would leave some waiting on the others. Under DDP, the replica without its hooks."""
    if isinstance(parallel, WithoutAdapters):  # a LoRA policy's reference: the policy gathered, its adapters off
        with gathered(parallel.parallel) as inner:
            yield WithoutAdapters(inner, parallel.policy)
        return
    if isinstance(parallel, DistributedDataParallel):
        yield parallel.module
        return
    units = [m for m in parallel.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        if unit is not parallel:  # the root stays gathered between forwards anyway
            unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield parallel
    finally:
        for unit in units:
            unit.reshard()
            if unit is not parallel:
                unit.set_reshard_after_forward(True, recurse=False)


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The sum (or 'mean', 'max') of a tensor over the processes; itself without torchrun."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x / dist.get_world_size() if op == "mean" else x


def all_gather_1d(x: torch.Tensor) -> torch.Tensor:
    """Every process's 1-D tensor, of whatever length, concatenated in rank order; itself without torchrun."""
    if not dist.is_initialized():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.numel()], device=x.device))
    width = int(max(sizes))
    gathered = [torch.empty(width, dtype=x.dtype, device=x.device) for _ in sizes]
    dist.all_gather(gathered, F.pad(x, (0, width - x.numel())))
    return torch.cat([g[: int(n)] for g, n in zip(gathered, sizes)])


def sync_gradients(parallel, sync: bool) -> None:
    """Gradient accumulation: reduce gradients across processes in the last micro-batch's backward only."""
    if isinstance(parallel, DistributedDataParallel):
        parallel.require_backward_grad_sync = sync
    elif isinstance(parallel, FSDPModule):
        parallel.set_requires_gradient_sync(sync)


def decay_groups(parallel, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay on matrices (linear and embedding weights) only, none on biases and norm
    weights (one-dimensional), as transformers' Trainer exempts them."""
    params = [p for p in parallel.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def full_state_dict(model) -> dict:
    """A model's whole state dict on the CPU: gathered from its shards under FSDP2 (every process must call)."""
    if not dist.is_initialized():
        return model.state_dict()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return state  # empty: rank 0 holds the gathered copy
    first_name = {}  # tied parameters (an LM head that is the input embedding) come back as copies: tie them again
    for name, param in model.named_parameters(remove_duplicate=False):
        state[name] = state[first_name.setdefault(id(param), name)]
    return state
