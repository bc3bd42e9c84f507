"""DPO: the policy trained directly on preference pairs, with no reward model and no sampling (the alternative to
stages 2 and 3).

    python dpo.py                                        # after `python sft.py`; the embedded reviews task, CPU
    python dpo.py --model-name-or-path models/smollm2-sft --dataset prefs.jsonl --beta 0.1 --learning-rate 5e-7
    torchrun --nproc-per-node 8 dpo.py --strategy fsdp --bf16 ...                 # 8 GPUs, one model

The policy pi starts from the SFT model, which also stays, frozen, as the reference pi_ref. With h the difference of
the two responses' log-ratios, h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x)), over
log-probs summed over each response's tokens, the loss of a pair is -log sigmoid(beta * h) (Rafailov et al. 2023,
eq. 7): the Bradley-Terry loss of stage 2 with the implicit reward beta * log(pi / pi_ref) in place of a reward
model. `--loss-type ipo` regresses h onto 1 / (2 beta) instead (Azar et al. 2023, eq. 17); `--label-smoothing e`
treats each label as flipped with probability e (conservative DPO, Mitchell 2023). Where this departs from the
common recipe:
1. Responses are tokenized apart from their prompt and end with the end token, which counts in the log-prob; the
   prompt's tokens do not (as in stage 1).
2. IPO uses the summed log-probs, as its paper writes it (TRL averages them over tokens).
3. A ranking's pairs stay together in a micro-batch and each distinct response is forwarded once, packed without
   padding (as in stage 2).
4. `--precompute-ref-logprobs` computes the reference's log-probs of every training pair once, before training: no
   reference forward per step (with one epoch, the same forwards moved out of the loop; with more, fewer).
5. Evaluated as PPO is: held-out prompts sampled at PPO's temperature, the gold score, the KL to the SFT policy and
   the gold win rate against it; plus the implicit reward's held-out preference accuracy.
"""

import atexit
import contextlib
import ctypes
import errno
import importlib
import importlib.util
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import tyro
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import DataError, encode_prompt, encode_response, end_token_id, read_data, sample, setup_tokenizer

# the embedded "reviews" task: its files are made by reviews_task.py on first use of the default dataset
TASK_DATA = "data/reviews"


@dataclass
class Args:
    # experiment
    exp_name: str = "dpo"
    """the name of this experiment, used in the run name"""
    seed: int = 1
    """seed of the experiment: same seed, same CPU run"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "rlhf"
    """the Weights & Biases project"""
    output_dir: str = "models/dpo"
    """where the trained policy is saved (loads with AutoModelForCausalLM)"""
    resume: bool = True
    """continue from `{output_dir}/checkpoint` if an interrupted run left one"""
    save_steps: int = 200
    """write a resumable checkpoint every this many optimizer steps"""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:N', or 'auto' (cuda if available); under torchrun each process takes cuda:LOCAL_RANK"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: 'ddp' keeps full copies of the policy and reference per process; 'fsdp' (FSDP2) shards both
    (and the policy's gradients and optimizer state) across them"""
    bf16: bool = False
    """bfloat16 mixed precision: fp32 policy weights and optimizer state, bf16 compute (autocast; FSDP2's
    MixedPrecisionPolicy under --strategy fsdp), gradients reduced in fp32; the frozen reference held in bf16"""
    gradient_checkpointing: bool = False
    """recompute the policy's activations in backward (non-reentrant): less memory, more compute"""

    # model & data
    model_name_or_path: str = "models/sft"
    """the SFT model: the policy's start and the frozen reference"""
    trust_remote_code: bool = False
    """allow a Hub model to run its own code (only for models you trust)"""
    dataset: str = f"{TASK_DATA}/preference_train.jsonl"
    """prompt/chosen/rejected, or chosen/rejected conversations (what reward_model.py reads): a JSONL, JSON,
    Parquet or CSV file, a `save_to_disk` folder or a Hub dataset id (docs/details.md#data-sources)"""
    eval_dataset: str = "auto"
    """held-out preferences, for the implicit reward's accuracy; 'auto': the embedded task's held-out file with its
    training file, with yours --eval-split's split of --dataset or none; 'none' to skip"""
    dataset_config: str | None = None
    """the configuration (subset) of a Hub dataset given as --dataset or --eval-dataset"""
    dataset_split: str = "train"
    """the split of --dataset to train on, when it has splits (a Hub dataset, a saved DatasetDict)"""
    eval_split: str = ""
    """held out: the split of --dataset to evaluate on (e.g. 'test'); with --eval-dataset, the split read from it
    (default 'train', a file's only split)"""
    eval_prompts: str = "auto"
    """held-out prompts to sample for the gold score, KL and length; 'auto': the embedded task's held-out prompts
    with its own data, else the prompts of the held-out pairs (or of the training pairs if there are none)"""
    skip_bad_pairs: bool = False
    """count and skip bad lines (missing field, chosen == rejected, empty text) instead of stopping with an error"""
    max_prompt_length: int = 64
    """in tokens; longer prompts lose their oldest text (the chat template's frame is kept)"""
    max_completion_length: int = 48
    """in tokens, EOS included; longer responses are cut from the right"""

    # algorithm
    beta: float = 0.1
    """the KL trade-off: the implicit reward is beta * log(pi / pi_ref); larger stays closer to the reference"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """'sigmoid': DPO's -log sigmoid(beta * h); 'ipo': (h - 1 / (2 beta))^2"""
    label_smoothing: float = 0.0
    """conservative DPO: the probability that a label is wrong, 0 <= e < 0.5 (sigmoid loss only)"""
    precompute_ref_logprobs: bool = False
    """compute the reference's log-probs of every training pair once before training instead of at every step"""

    # optimization
    lora_r: int = 0
    """LoRA: train rank-r adapters on the decoder's linear layers instead of every weight (`pip install peft`); 0: off"""
    lora_alpha: float = 32.0
    """LoRA: the adapters' product is scaled by lora_alpha / lora_r"""
    lora_target_modules: str = "all-linear"
    """LoRA: the layers to adapt, by name ('q_proj,v_proj'), or 'all-linear' (every linear layer of the decoder)"""
    learning_rate: float | None = None
    """peak AdamW learning rate, decayed linearly to 0; default 1e-4 for the embedded tiny model, 5e-7 otherwise (the
    DPO paper's 1e-6 order for 1B-7B models); 10x either with LoRA"""
    weight_decay: float = 0.0
    """AdamW weight decay (of weight matrices: not of biases and norm weights, as transformers' Trainer)"""
    num_epochs: int = 1
    """passes over the preference pairs"""
    max_steps: int = -1
    """optimizer steps; -1 means num_epochs over the data"""
    per_device_train_batch_size: int = 8
    """comparison groups per micro-batch, per process: a group is one pair, or all pairs of one ranking"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    padding_free: bool = True
    """pack each micro-batch's sequences into rows without padding (checked at start; falls back to padding for a
    model that lets packed sequences attend to each other)"""
    warmup_ratio: float = 0.1
    """fraction of the steps spent warming the learning rate up linearly from 0"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    max_group_pairs: int = 36
    """cap on the pairs of one comparison group; 1 = no grouping"""

    # evaluation
    eval_steps: int = 200
    """held-out evaluation every this many steps (and at the start and the end)"""
    num_eval_prompts: int = 128
    """held-out prompts sampled per evaluation"""
    temperature: float = 0.7
    """sampling temperature of the evaluation (PPO's, so that the two are measured alike); its KL is taken at it"""
    response_length: int = 24
    """most tokens per sampled response in evaluation (PPO's --response-length)"""
    num_sample_rows: int = 4
    """sampled responses printed per evaluation"""
    eval_reward_fn: str = "auto"
    """gold judge (prompt, response) -> float for evaluation; 'auto': the embedded task's judge
    (reviews_task.py:gold_score) on its own data, none on yours; '' to skip"""
    gold_tau: float = 0.3
    """Bradley-Terry temperature of the annotators, for the held-out noise ceiling (with a judge); 0 to skip"""


def encode_pairs(records, tokenizer, args):
    """Records -> list of (prompt_ids, chosen_ids, rejected_ids), counting truncated and skipped prompts (copied from
    reward_model.py: the two stages read the same files). A text that recurs is tokenised once."""
    pairs, cut, skipped, responses_cut, cache = [], 0, 0, 0, {}
    def encode(fn, text, limit):
        key = (fn, repr(text))  # repr: conversational prompts are lists of messages
        if key not in cache:
            cache[key] = fn(tokenizer, text, limit)
        return cache[key]
    for r in records:
        prompt_ids, long_prompt = encode(encode_prompt, r["prompt"], args.max_prompt_length)
        if prompt_ids is None:  # cannot fit even cut
            skipped += 1
            continue
        cut += long_prompt
        chosen, long_chosen = encode(encode_response, r["chosen"], args.max_completion_length)
        rejected, long_rejected = encode(encode_response, r["rejected"], args.max_completion_length)
        responses_cut += long_chosen + long_rejected
        pairs.append((prompt_ids, chosen, rejected))
    return pairs, cut, skipped, responses_cut


def group_pairs(pairs, max_pairs: int) -> list[list[int]]:
    """Comparison groups (copied from reward_model.py): runs of consecutive pairs with the same prompt, a labeller's
    ranking of K responses written as its K(K-1)/2 pairs, at most max_pairs each; independent pairs are groups of one.
    Kept in one micro-batch, each response of a ranking is forwarded once for all of its comparisons."""
    groups = []
    for i, (prompt, _, _) in enumerate(pairs):
        if groups and pairs[groups[-1][0]][0] == prompt and len(groups[-1]) < max_pairs:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def collate(pairs, pad_id: int, padding_free: bool):
    """Pairs -> (batch, chosen, rejected). `batch` holds the distinct prompt+response sequences among the pairs
    (right-padded, or packed into rows by `pack`) with `labels`, the response's ids where the response is and -100
    elsewhere, and `sequence`, the index of the sequence each labelled token belongs to. chosen[i] and rejected[i]
    index pair i's two sequences: a response shared by several pairs (a ranking) is forwarded once. num_sequences
    counts them."""
    index, seqs, prompt_lengths = {}, [], []
    def seq_index(prompt, response):
        if tuple(prompt + response) not in index:
            index[tuple(prompt + response)] = len(seqs)
            seqs.append(prompt + response)
            prompt_lengths.append(len(prompt))
        return index[tuple(prompt + response)]
    chosen = torch.tensor([seq_index(p, c) for p, c, _ in pairs])
    rejected = torch.tensor([seq_index(p, r) for p, _, r in pairs])
    if padding_free:
        input_ids, position_ids, starts = pack(seqs, pad_id)
        batch = {"input_ids": input_ids, "position_ids": position_ids}
    else:
        input_ids, attention_mask = pad(seqs, pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        starts = torch.stack([torch.arange(len(seqs)), torch.zeros(len(seqs), dtype=torch.long)], dim=1)
    labels, sequence = torch.full_like(input_ids, -100), torch.zeros_like(input_ids)
    for k, ((row, col), seq, p) in enumerate(zip(starts.tolist(), seqs, prompt_lengths)):
        first, end = col + max(1, p), col + len(seq)  # a first token has no prediction inside its own sequence
        labels[row, first:end], sequence[row, first:end] = input_ids[row, first:end], k
    return batch | {"labels": labels, "sequence": sequence, "num_sequences": len(seqs)}, chosen, rejected


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """(N,) summed log-probs of each sequence's response tokens (its end token included, its prompt not): the logits
    at t predict the token at t + 1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False).logits  # (rows, T, V)
    token_logprobs = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                      ignore_index=-100, reduction="none")  # 0 where not labelled
    return torch.zeros(batch["num_sequences"], device=logits.device).index_add(0, batch["sequence"][:, 1:].flatten(),
                                                                      token_logprobs)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float, loss_type: str,
             label_smoothing: float):
    """(P,) summed response log-probs of policy and reference -> (P,) losses, and the implicit rewards
    beta * log(pi / pi_ref) of chosen and rejected (P,) each. A function of its own, not inline in the loop, so that
    a test can hold it against the papers' formulas."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)  # the log-ratio margin
    if loss_type == "ipo":  # Azar et al. 2023, eq. 17: regress h onto 1 / (2 beta)
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # Rafailov et al. 2023, eq. 7; with label smoothing e, the expected loss under labels flipped w.p. e
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@torch.no_grad()
def response_logprobs(model, query_responses, attention_mask, context_length: int, temperature: float):
    """(B, Tq + T) left-padded queries + responses -> (B, T) log-probs of the response tokens under
    softmax(logits / temperature), the distribution sampled from (as PPO computes them)."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding shifts no position
    logits = model(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits[:, context_length - 1: -1].float() / temperature  # (B, T, V)
    return torch.gather(logits.log_softmax(-1), 2, query_responses[:, context_length:, None]).squeeze(-1)


def disable_dropout(model) -> None:
    """Dropout off, so every forward pass of the same input gives the same numbers (copied in reward_model.py,
    ppo_rlhf.py and dpo.py). Three places hold a rate: the config, nn.Dropout modules, and floats that modules copy
    from the config when built (Llama's and Qwen2's `self.attention_dropout`, applied in train mode whatever the
    config says)."""
    for key, value in model.config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(model.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(module, name, 0.0)


def main(args: Args) -> None:
    rank, world_size, device = init_distributed(args.device)  # rank 0 of 1 without torchrun
    keep_freed_memory(device)  # CPU only
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("error: --track logs to Weights & Biases, which is not installed: pip install wandb")
    if not 0 <= args.label_smoothing < 0.5 or (args.label_smoothing > 0 and args.loss_type != "sigmoid"):
        raise SystemExit("error: --label-smoothing must be in [0, 0.5), and is for --loss-type sigmoid only")
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"  # logs in runs/{run_name}
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # --bf16: the policy keeps fp32 weights and AdamW state and computes in bf16 under autocast (FSDP2 instead gathers
    # bf16 copies of the fp32 shards); the frozen reference is held in bf16
    fsdp = world_size > 1 and args.strategy == "fsdp"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and not fsdp)  # noqa: E731
    if args.model_name_or_path == "models/sft" and not os.path.isdir("models/sft"):
        raise SystemExit("error: models/sft does not exist: run `python sft.py` first, or point --model-name-or-path "
                         "at an SFT model")
    embedded = args.dataset == f"{TASK_DATA}/preference_train.jsonl"  # the embedded task's own data
    if rank == 0 and embedded and not os.path.exists(args.dataset):
        load_function("reviews_task.py:ensure_data")()  # deterministic: the same files every time
    claim_output_dir(args.output_dir, args.resume)  # a lock; an interrupted save mended; a save can be written
    if world_size > 1:
        dist.barrier()  # the files are written
    # 'auto': the embedded task's held-out files and judge with its own data, none with the user's
    eval_dataset = args.eval_dataset if args.eval_dataset != "auto" else (
        f"{TASK_DATA}/preference_eval.jsonl" if embedded else args.dataset if args.eval_split else "none")
    eval_prompts_file = f"{TASK_DATA}/prompts_eval.jsonl" if args.eval_prompts == "auto" and embedded else args.eval_prompts
    eval_reward_fn = args.eval_reward_fn if args.eval_reward_fn != "auto" else (
        "reviews_task.py:gold_score" if embedded else "")

    # 1. two models: the policy (trained) and the reference (frozen), both from the SFT model; with LoRA the reference
    #    is the policy with its adapters off, no second copy
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    resuming = args.resume and os.path.exists(os.path.join(ckpt_dir, "training_state.pt"))
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    policy = AutoModelForCausalLM.from_pretrained(ckpt_dir if resuming and not args.lora_r else args.model_name_or_path,
                                                  dtype=torch.bfloat16 if args.bf16 and args.lora_r and not fsdp else
                                                  torch.float32,  # LoRA with --bf16: the frozen base in bf16
                                                  trust_remote_code=args.trust_remote_code).to(device)
    ref_policy = None if args.lora_r else AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code,
        dtype=torch.bfloat16 if args.bf16 else torch.float32).to(device)
    for model in [m for m in (policy, ref_policy) if m is not None]:
        setup_tokenizer(tokenizer, model)
        disable_dropout(model)  # the log-ratios compare two forward passes: no noise in either
    if ref_policy is not None:
        ref_policy.eval().requires_grad_(False)
    check_room(args.output_dir, policy)
    if args.lora_r:
        add_lora(policy, args.lora_r, args.lora_alpha, args.lora_target_modules, args.model_name_or_path,
                 resume_dir=ckpt_dir if resuming else "")
    learning_rate = args.learning_rate
    if learning_rate is None:
        tiny = getattr(policy.config, "embedded_tiny_model", False)
        learning_rate = (1e-4 if tiny else 5e-7) * (10 if args.lora_r else 1)  # LoRA needs about 10x
        print(f"learning rate {learning_rate:g} ({'the embedded tiny model' if tiny else 'a pretrained model'}"
              f"{', LoRA: 10x' if args.lora_r else ''}; --learning-rate to change)")
    padding_free = args.padding_free and packing_works(policy)
    if args.padding_free and not padding_free:
        print("warning: this model lets packed sequences attend to each other; padding instead (--no-padding-free)")
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy_w = distribute([policy], args.strategy, args.bf16)  # every pass runs as policy_w(fn, ...) = fn(policy, ...)
    ref_w = WithoutAdapters(policy_w, policy) if args.lora_r else distribute([ref_policy], args.strategy, args.bf16,
                                                                             trainable=False)

    # 2. data: the preference pairs of stage 2 (rankings kept together as comparison groups), held-out pairs and prompts
    bad_lines = [] if args.skip_bad_pairs else None
    try:
        train_records = read_data(args.dataset, "preference", bad_lines, args.dataset_config, args.dataset_split)
        eval_records = read_data(eval_dataset, "preference", bad_lines, args.dataset_config,
                                 args.eval_split or "train", True) if eval_dataset != "none" else []
        prompt_records = read_data(eval_prompts_file, "prompt") if eval_prompts_file not in ("auto", "none") else []
    except DataError as e:
        raise SystemExit(f"error: {e}")
    if bad_lines:
        print(f"skipped {len(bad_lines)} bad lines, the first: {bad_lines[0]}")
    train, cut, skipped, responses_cut = encode_pairs(train_records, tokenizer, args)
    for count, total, what, flag in [
            (cut, len(train_records), "prompts were cut from the left", "--max-prompt-length"),
            (responses_cut, 2 * len(train_records), "responses were cut, losing their end token", "--max-completion-length")]:
        if count > 0.1 * total:
            print(f"warning: {count} of {total} {what}: raise {flag} for this data")
    evals = encode_pairs(eval_records, tokenizer, args)[0]
    if eval_prompts_file == "auto":  # the prompts of the pairs, as read_data found them (any preference format)
        prompt_records = eval_records or train_records
    groups = group_pairs(train, args.max_group_pairs)
    eval_prompts = {repr(r["prompt"]): r["prompt"] for r in prompt_records}  # distinct prompts, in file order
    eval_prompts = [(p, *encode_prompt(tokenizer, p, args.max_prompt_length)) for p in eval_prompts.values()]
    eval_prompts = [(p, ids, was_cut) for p, ids, was_cut in eval_prompts if ids is not None][: args.num_eval_prompts]
    if sum(was_cut for _, _, was_cut in eval_prompts):
        print(f"{sum(was_cut for _, _, was_cut in eval_prompts)} of {len(eval_prompts)} prompts to sample cut from the "
              f"left to --max-prompt-length {args.max_prompt_length}")
    eval_prompts = [(p, ids) for p, ids, _ in eval_prompts]
    print(f"{len(train)} training pairs in {len(groups)} comparison groups ({cut} prompts cut, {skipped} skipped), "
          f"{len(evals)} held-out pairs, {len(eval_prompts)} prompts to sample"
          + (" (from the training pairs)" if eval_prompts_file == "auto" and not eval_records else ""))
    if len(groups) < world_size:
        raise SystemExit(f"{args.dataset}: {len(groups)} comparison groups cannot be shared by {world_size} processes")
    micro_batch_size = min(args.per_device_train_batch_size, len(groups) // world_size)  # groups per process
    if micro_batch_size < args.per_device_train_batch_size:
        print(f"only {len(groups)} comparison groups: --per-device-train-batch-size {args.per_device_train_batch_size} "
              f"-> {micro_batch_size}")
    batch_size = micro_batch_size * args.gradient_accumulation_steps * world_size  # groups per optimizer step
    print(f"global batch: {micro_batch_size} comparison groups x {args.gradient_accumulation_steps} "
          f"micro-batches x {world_size} process(es) = {batch_size} per optimizer step")
    batches_per_epoch = len(groups) // (micro_batch_size * world_size)  # global micro-batches
    num_steps = args.max_steps if args.max_steps > 0 else max(
        1, args.num_epochs * batches_per_epoch // args.gradient_accumulation_steps)
    warmup_steps = int(args.warmup_ratio * num_steps)

    def micro_batch(i: int):
        """This process's share of the i-th global micro-batch: epoch e is a permutation seeded by (seed, e), the same
        in every process, so the processes split each batch between them and a resumed run replays it. Also returns
        the indices of its pairs (for precomputed reference log-probs)."""
        epoch, j = divmod(i, batches_per_epoch)
        order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(args.seed * 10007 + epoch))
        first = (j * world_size + rank) * micro_batch_size
        pair_ids = [k for g in order[first: first + micro_batch_size] for k in groups[g]]
        batch, chosen, rejected = collate([train[k] for k in pair_ids], tokenizer.pad_token_id, padding_free)
        batch = {k: t.to(device) if torch.is_tensor(t) else t for k, t in batch.items()}
        return batch, chosen.to(device), rejected.to(device), pair_ids

    @torch.no_grad()
    def pair_logprobs(model_w, pairs, batch: int = 64):
        """(P, 2) summed log-probs of each pair's chosen and rejected response under the model."""
        out = []
        for k in range(0, len(pairs), batch):
            inputs, chosen_rows, rejected_rows = collate(pairs[k: k + batch], tokenizer.pad_token_id, padding_free)
            with autocast():
                logps = model_w(sequence_logprobs, {k: t.to(device) if torch.is_tensor(t) else t for k, t in inputs.items()})
            out.append(torch.stack([logps[chosen_rows.to(device)], logps[rejected_rows.to(device)]], dim=1))
        return torch.cat(out) if out else torch.zeros(0, 2, device=device)

    # 3. reference log-probs: of the held-out pairs once (the reference never changes), and with
    #    --precompute-ref-logprobs of every training pair: each process computes its share, then they are summed
    ref_policy_eval = pair_logprobs(ref_w, evals)
    ref_table = None
    if args.precompute_ref_logprobs:
        t0 = time.time()
        own = list(range(rank, len(train), world_size))  # this process's pairs
        padded = own + own[:1] * (math.ceil(len(train) / world_size) - len(own))  # equal counts: FSDP2 forwards together
        ref_table = torch.zeros(len(train), 2, device=device)
        ref_table[own] = pair_logprobs(ref_w, [train[k] for k in padded])[: len(own)]
        ref_table = all_reduce(ref_table)  # each row was filled by one process
        print(f"reference log-probs of {len(train)} pairs in {time.time() - t0:.1f} s")

    # 4. optimizer: AdamW, linear warm-up then linear decay to 0
    optimizer = torch.optim.AdamW(decay_groups(policy_w, args.weight_decay), lr=learning_rate,
                                  fused=device.type in ("cpu", "cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / (warmup_steps + 1) if s < warmup_steps
                                                  else max(0.0, 1 - (s - warmup_steps) / max(1, num_steps - warmup_steps)))
    start_step = 0
    if resuming:
        state = load_state(ckpt_dir, policy_w, optimizer)  # also restores the optimizer and the random generators
        scheduler.load_state_dict(state["scheduler"])
        start_step, run_name = state["step"], state["run_name"]
        print(f"resuming {ckpt_dir} at step {start_step}")
    elif world_size > 1:
        torch.manual_seed(args.seed + rank)  # every process samples its own (models are built: they had to match)
    # the flags as this run resolved them: args.json beside the model, the logs' config
    config = vars(args) | {"run_name": run_name, "eval_dataset": eval_dataset, "eval_prompts": eval_prompts_file,
                           "eval_reward_fn": eval_reward_fn, "learning_rate": learning_rate, "padding_free": padding_free,
                           "per_device_train_batch_size": micro_batch_size, "batch_size": batch_size}
    metrics = Metrics(f"runs/{run_name}", config, args.track, args.wandb_project, state if resuming else None)
    judge = load_function(eval_reward_fn) if eval_reward_fn else None
    end_id, pad_id = end_token_id(tokenizer), tokenizer.pad_token_id

    @torch.no_grad()
    def sample_responses(model_w, prompt_ids):
        """Sample from the first model of `model_w` (`common.sample`: softmax(logits / temperature)) -> the
        left-padded query+responses, their mask, the query width, (B, T) response mask (to the end token) and texts."""
        queries, query_mask = (t.to(device) for t in pad(prompt_ids, pad_id, side="left"))
        with autocast(), gathered(model_w) as generator:
            out = generator(lambda model, *_: sample(model, queries, query_mask, args.response_length, args.temperature,
                                                     end_id, pad_id))
        responses = out[:, queries.shape[1]:]
        is_end = responses == end_id
        first_end = torch.where(is_end.any(1), is_end.long().argmax(1), responses.shape[1])
        response_mask = torch.arange(responses.shape[1], device=device)[None] <= first_end[:, None]  # (B, T)
        texts = tokenizer.batch_decode(responses.masked_fill(~response_mask, pad_id), skip_special_tokens=True)
        attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
        return out.masked_fill(attention_mask == 0, pad_id), attention_mask, queries.shape[1], response_mask, texts

    @torch.no_grad()
    def evaluate(step: int, final: bool = False) -> None:
        """Held-out pairs: the implicit reward's accuracy. Held-out prompts, sampled as PPO evaluates: gold score, KL
        to the reference at the sampling temperature, length; at the end the gold win rate against the SFT policy.
        Every process runs it (its own draws); the figures are the means over processes."""
        policy_w.eval()
        out = {}
        if evals:
            logps = pair_logprobs(policy_w, evals)
            margins = args.beta * ((logps - ref_policy_eval)[:, 0] - (logps - ref_policy_eval)[:, 1])
            accuracy = ((margins > 0).float() + 0.5 * (margins == 0).float()).mean()  # a tie counts half (step 0)
            out |= {"eval/dpo/accuracy": accuracy, "eval/dpo/margin": margins.mean()}
            if judge and final and args.gold_tau > 0:  # the best accuracy any judge reaches on these noisy labels
                gaps = torch.tensor([judge(r["prompt"], r["chosen"]) - judge(r["prompt"], r["rejected"])
                                     for r in eval_records])
                p = torch.sigmoid(gaps / args.gold_tau)
                out["eval/dpo/noise_ceiling"] = torch.maximum(p, 1 - p).mean()
        table = ""
        if eval_prompts:
            prompts, prompt_ids = zip(*eval_prompts)
            query_responses, attention_mask, context_length, response_mask, texts = sample_responses(policy_w, prompt_ids)
            with autocast():
                logprobs = policy_w(response_logprobs, query_responses, attention_mask, context_length, args.temperature)
                ref_logprobs = ref_w(response_logprobs, query_responses, attention_mask, context_length, args.temperature)
            out |= {"eval/kl": ((logprobs - ref_logprobs) * response_mask).sum(1).mean(),
                    "eval/response_length": response_mask.sum(1).float().mean(),
                    "eval/eos_rate": (query_responses[:, context_length:] == end_id).any(1).float().mean(),
                    "eval/distinct_responses": len(set(texts)) / len(texts)}
            gold = torch.tensor([judge(p, t) for p, t in zip(prompts, texts)]) if judge else None
            if judge:
                out["eval/gold_score"] = gold.mean()
            if judge and final:  # the SFT policy answers the same prompts; the gold judge picks (ties count half)
                sft_texts = sample_responses(ref_w, prompt_ids)[-1]
                sft_gold = torch.tensor([judge(p, t) for p, t in zip(prompts, sft_texts)])
                out["eval/sft_gold_score"] = sft_gold.mean()
                out["eval/gold_win_rate_vs_sft"] = ((gold > sft_gold).float() + 0.5 * (gold == sft_gold).float()).mean()
            table = "\n".join(f"  {p!r:.300} -> {t!r}" for p, t in zip(prompts, texts))
        out = {k: all_reduce(torch.as_tensor(v, dtype=torch.float, device=device), "mean") for k, v in out.items()}
        metrics.log(step, out, samples=table)
        tqdm.write(f"eval @ {step}: " + "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in out.items()) + "\n"
                   + "\n".join(table.split("\n")[: args.num_sample_rows]))
        policy_w.train()

    # 5. training loop
    if start_step == 0:
        evaluate(0)
    policy_w.train()
    progress = tqdm(range(start_step, num_steps), initial=start_step, total=num_steps, desc="dpo",
                    disable=rank != 0 or None)  # None: on in a terminal, off in a log file
    step_end = time.perf_counter()
    signals = StopSignals()  # SIGTERM, Ctrl-C: a checkpoint at the end of the step, then exit
    for step in progress:
        micro = [micro_batch(step * args.gradient_accumulation_steps + m) for m in range(args.gradient_accumulation_steps)]
        num_pairs = all_reduce(torch.tensor(sum(len(chosen_rows) for _, chosen_rows, _, _ in micro), device=device))
        stats = torch.zeros(6, device=device)  # kept on device, summed over pairs / num_pairs; no sync per micro-batch
        for m, (batch, chosen_rows, rejected_rows, pair_ids) in enumerate(micro):
            sync_gradients(policy_w, m == len(micro) - 1)
            with autocast():
                logps = policy_w(sequence_logprobs, batch)  # (N,): every distinct response, one pass
                if ref_table is not None:
                    ref_chosen_logps, ref_rejected_logps = ref_table[pair_ids].unbind(1)
                else:
                    with torch.no_grad():
                        ref_logps = ref_w(sequence_logprobs, batch)
                    ref_chosen_logps, ref_rejected_logps = ref_logps[chosen_rows], ref_logps[rejected_rows]
            chosen_logps, rejected_logps = logps[chosen_rows], logps[rejected_rows]  # (P,) each, P pairs
            losses, chosen_rewards, rejected_rewards = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                                                                ref_rejected_logps, args.beta, args.loss_type,
                                                                args.label_smoothing)
            loss = losses.sum() / num_pairs  # divided by the pairs of the whole batch: accumulation = one big batch
            (loss * world_size).backward()  # DDP and FSDP2 average gradients over processes: this makes it their sum
            stats += torch.stack([loss.detach(), chosen_rewards.sum() / num_pairs, rejected_rewards.sum() / num_pairs,
                                  (chosen_rewards > rejected_rewards).float().sum() / num_pairs,
                                  chosen_logps.detach().sum() / num_pairs, rejected_logps.detach().sum() / num_pairs])
        stats = all_reduce(stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy_w.parameters(), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        stop_if_not_finite(step + 1, args.output_dir, loss=stats[0].item(), grad_norm=grad_norm.item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds, step_end = time.perf_counter() - step_end, time.perf_counter()  # includes any evaluation
        progress.set_postfix(loss=f"{stats[0]:.3f}", acc=f"{stats[3]:.2f}")
        if progress.disable and (step + 1) % args.eval_steps == 0:  # no progress bar (a log file): the loss here
            print(f"step {step + 1}/{num_steps}: train loss {stats[0]:.4f}, accuracy {stats[3]:.3f}")
        metrics.log(step + 1, {"train/dpo/loss": stats[0], "rewards/chosen": stats[1], "rewards/rejected": stats[2],
                               "rewards/margins": stats[1] - stats[2], "rewards/accuracies": stats[3],
                               "logps/chosen": stats[4], "logps/rejected": stats[5], "train/dpo/grad_norm": grad_norm,
                               "charts/lr": scheduler.get_last_lr()[0], "time/step": step_seconds})
        if (step + 1) % args.eval_steps == 0 and step + 1 < num_steps:
            evaluate(step + 1)
        stop = signals.requested(device) and step + 1 < num_steps
        if ((step + 1) % args.save_steps == 0 and step + 1 < num_steps) or stop:
            state = {"scheduler": scheduler.state_dict(), "step": step + 1, "run_name": run_name,
                     "log_bytes": metrics.position()}
            save_model(ckpt_dir, tokenizer, config, ("", policy), training=(state, policy_w, optimizer))
        if stop:
            signals.stop(ckpt_dir, step + 1)
    signals.restore()
    progress.close()

    # 6. save first (atomically; replacing the output folder also removes the checkpoint inside it), then the final
    #    evaluation
    save_model(args.output_dir, tokenizer, config, ("", policy))
    print(f"saved to {args.output_dir}")
    evaluate(num_steps, final=True)
    metrics.close()
    print(f"logs in runs/{run_name}")
    if world_size > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Plumbing, the same in sft.py, reward_model.py, ppo_rlhf.py, dpo.py and grpo.py: copied rather than shared, so that a
# stage script and common.py are all a user copies (tests/test_copy.py holds the copies equal).


def pad(seqs: list[list[int]], pad_value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged lists of ids -> (B, T) ids and attention mask, padded on `side` ("left" for generation)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


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


def load_function(spec: str):
    """'path/file.py:name' (also looked for beside this script) or 'module:name' -> the function, loaded when used."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise SystemExit(f"error: expected 'file.py:function', got '{spec}'")
    if not path.endswith(".py"):
        return getattr(importlib.import_module(path), name)
    if not os.path.exists(path):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def claim_output_dir(out_dir: str, resume: bool) -> None:
    """Before any work: finish or undo a save that a kill interrupted (of `out_dir` and of its checkpoint), lock
    `out_dir` against a second run (`{out_dir}.lock`, held with flock while this process lives, so a killed run's
    lock is free again; removed at exit), and check that a save can be written beside it. Under torchrun, rank 0."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    out_dir = out_dir.rstrip("/")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if getattr(claim_output_dir, "release", None) is not None:  # a previous main() in this process
        atexit.unregister(claim_output_dir.release)
        claim_output_dir.release()
    try:
        os.makedirs(parent, exist_ok=True)
        while True:
            lock = open(out_dir + ".lock", "a+")
            with contextlib.suppress(ImportError):  # fcntl: not on Windows
                import fcntl

                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    lock.seek(0)
                    raise SystemExit(f"error: {out_dir} is in use by another run ({lock.read().strip()}): wait for it "
                                     "to end, or choose another --output-dir") from None
            if os.fstat(lock.fileno()).st_nlink:  # not removed meanwhile by the run that held it, as it ended
                break
            lock.close()
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {os.uname().nodename}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                   f"{' '.join(sys.argv)[:200]}\n")
        lock.flush()
    except OSError as e:
        raise SystemExit(f"error: cannot write beside {out_dir} ({e.strerror}): choose another --output-dir")

    def release():  # at exit: the lock file goes, then the lock
        with contextlib.suppress(OSError):
            os.remove(lock.name)
        lock.close()
    claim_output_dir.release = release
    atexit.register(release)
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
    out_dir = out_dir.rstrip("/")
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    try:
        if rank == 0:
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
        if training is not None:
            state, parallel, optimizer = training
            if dist.is_initialized():
                dist.barrier()  # the folder exists
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.save({"optimizer": get_optimizer_state_dict(parallel, optimizer)},
                         checkpoint_id=os.path.join(tmp, "optimizer"))
            torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                       os.path.join(tmp, f"rng_{rank}.pt"))
            if dist.is_initialized():
                dist.barrier()  # every process has written its part
            if rank == 0:
                torch.save(state, os.path.join(tmp, "training_state.pt"))
        if rank == 0:
            with open(os.path.join(tmp, "args.json"), "w") as f:
                json.dump(config, f, indent=2, default=str)
                f.flush()
                os.fsync(f.fileno())
    except (Exception, dcp.CheckpointException) as e:  # a full disk: an OSError, or a library's error after one
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(out_dir))).free
        shutil.rmtree(tmp, ignore_errors=True)
        causes = [e, *(cause for cause, _ in getattr(e, "failures", {}).values())]
        if all(getattr(c, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) for c in causes) and free > 2**20:
            raise
        raise SystemExit(f"error: the disk is full: saving {out_dir} failed with {free} bytes free; the partial save "
                         f"is removed and what was saved before is as it was") from None
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
    try:
        with open(os.path.join(ckpt_dir, "optimizer", ".metadata"), "rb") as f:
            _RestrictedUnpickler(f).load()
        target = {"optimizer": get_optimizer_state_dict(parallel, optimizer)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(target, checkpoint_id=os.path.join(ckpt_dir, "optimizer"), planner=_CheckedLoadPlanner())
        set_optimizer_state_dict(parallel, optimizer, target["optimizer"])
        rng = torch.load(os.path.join(ckpt_dir, f"rng_{rank}.pt"), weights_only=True)
        state = torch.load(os.path.join(ckpt_dir, "training_state.pt"), weights_only=True)
    except (Exception, dcp.CheckpointException) as e:  # the latter wraps what the planner raised
        if not isinstance(e, pickle.UnpicklingError) and "UnpicklingError" not in str(e):
            raise
        raise SystemExit(f"error: {ckpt_dir} holds more than tensors and plain types: refused, unread (remove it to "
                         "start over)") from None
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


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
        return all_reduce(torch.tensor(float(self.signal), device=device), "max").item() > 0

    def stop(self, ckpt_dir: str, step: int) -> None:
        name = signal.Signals(self.signal).name if self.signal else "a signal"
        print(f"stopped by {name} after step {step}; checkpoint in {ckpt_dir}: run the same command to continue")
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


def stop_if_not_finite(step: int, output_dir: str, **values: float) -> None:
    """A loss or gradient norm that is NaN or infinite ends the run before the optimizer steps on it: nothing is saved,
    the output folder and its last checkpoint stay as they were."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise SystemExit(f"error: step {step}: {', '.join(f'{k} {v}' for k, v in bad.items())}: training diverged "
                         f"(a lower --learning-rate?); nothing saved: {output_dir} and its last checkpoint are as they were")


class Metrics:
    """Scalars and texts to runs/{run_name}/metrics.jsonl (one JSON object per line), TensorBoard when installed, and
    Weights & Biases with --track."""

    def __init__(self, run_dir: str, config: dict, track: bool = False, project: str = "rlhf", resume: dict | None = None):
        self.on = not dist.is_initialized() or dist.get_rank() == 0  # rank 0 logs for all processes
        if not self.on:
            return
        os.makedirs(run_dir, exist_ok=True)
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
        if track:
            import wandb  # only with --track

            self.wandb = wandb.init(project=project, config=config, name=os.path.basename(run_dir))

    def log(self, step: int, scalars: dict | None = None, **texts: str) -> None:
        if not self.on:
            return
        row = {k: float(v) for k, v in (scalars or {}).items()} | {k: v[:100_000] for k, v in texts.items()}
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time() - self.start, 2)} | row) + "\n")
        self.jsonl.flush()
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
        if model.load_state_dict(state, strict=False).unexpected_keys:
            raise SystemExit(f"error: {resume_dir}/adapter does not fit this model: start again with --no-resume")
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


if __name__ == "__main__":
    with user_errors_in_one_line():
        main(tyro.cli(Args))
