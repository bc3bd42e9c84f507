"""Stage 3 of RLHF: PPO against a reward model, with a per-token KL penalty to a frozen reference policy.

    python ppo_rlhf.py                                  # after sft.py and reward_model.py; embedded task, CPU
    python ppo_rlhf.py --kl-coef 0.2 --reward-fn my_rewards.py:score     # an algorithmic reward instead of the RM
    python ppo_rlhf.py --reward-model-path rm1 rm2 rm3 --ensemble-k 1      # an ensemble of reward models: mean - std
    torchrun --nproc-per-node 8 ppo_rlhf.py --sft-model-path ... --strategy fsdp --bf16     # 8 GPUs, models sharded

Four models: the policy and a frozen reference (both from the SFT model), a frozen reward model, and a value
network. Each iteration has a rollout phase (generate, score, KL-shape the rewards, GAE) and an update phase
(PPO epochs over minibatches). Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022; the implementation
details follow Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO". Where this departs from them:
1. The value network is by default a separate model initialised from the reward model (their recipe); with
   `--value-model shared` it is a linear head on the policy's last hidden state (the tutorials' design).
2. `--dual-clip c` optionally bounds the loss on negative advantages by -c * A (Ye et al. 2020), the fix for
   unbounded penalties on negative advantages; off by default.
3. The KL penalty's estimator is k1 (log pi - log pi_ref) or k3 ((r - 1) - log r, r = pi_ref / pi), by flag;
   both are always logged. k3 is never negative per token; k1 can be, per token, and is unbiased.
4. Forward passes are padding-free by default: each query+response is stripped of its padding and packed into rows
   with other sequences (`pack`, below); log-probs and values come back in the usual (B, T) layout.
"""

import atexit
import contextlib
import ctypes
import errno
import importlib
import importlib.util
import inspect
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
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Literal, NamedTuple

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
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from common import (DataError, encode_prompt, end_token_id, last_token_index, read_data, reward_scores, sample,
                    score_suffix, setup_tokenizer)

# the embedded "reviews" task: its files are made by reviews_task.py on first use of the default dataset
TASK_DATA = "data/reviews"


@dataclass
class Args:
    # experiment
    exp_name: str = "ppo"
    """the name of this experiment, used in the run name"""
    seed: int = 1
    """seed of the experiment: same seed, same CPU run"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "rlhf"
    """the Weights & Biases project"""
    output_dir: str = "models/ppo"
    """where the policy (and `value_model/`) are saved"""
    resume: bool = True
    """continue from `{output_dir}/checkpoint` if an interrupted run left one"""
    save_steps: int = 20
    """write a resumable checkpoint every this many iterations"""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:N', or 'auto' (cuda if available); under torchrun each process takes cuda:LOCAL_RANK"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: 'ddp' keeps full copies of the four models per process; 'fsdp' (FSDP2) shards all four (and
    the trained ones' gradients and optimizer state) across them, for models that do not fit one device"""
    bf16: bool = False
    """bfloat16 mixed precision: policy and value in fp32 with their AdamW state, bf16 compute (autocast; FSDP2's
    MixedPrecisionPolicy under --strategy fsdp), gradients reduced in fp32; the frozen reference and reward model
    held in bf16"""
    gradient_checkpointing: bool = False
    """recompute the policy's and value model's activations in backward (non-reentrant): less memory, more compute"""

    # models & data
    sft_model_path: str = "models/sft"
    """the SFT model: the policy's start and the frozen reference"""
    init_policy_path: str = ""
    """start the policy from this model instead of the SFT model, which stays the KL reference (iterative RLHF's
    later rounds continue from the last policy); '' = the SFT model"""
    reward_model_path: tuple[str, ...] = ("auto",)
    """the frozen reward model: from reward_model.py, or any sequence classifier (its own tokenizer and labels are
    handled: see --reward-label-index); several paths form an ensemble (--ensemble-k); 'auto': models/reward_model,
    or none when --reward-fn is given alone; 'none': no reward model"""
    ensemble_k: float = 0.0
    """with several reward models the score is mean - ensemble_k * std over the members, per response (Coste et al.
    2023: a conservative estimate, penalising where the members disagree); 0 = their mean"""
    reward_fn: tuple[str, ...] = ()
    """'file.py:function' terms added to the reward model's score (a hybrid reward), each times its
    --reward-fn-weights entry; with no reward model they are the whole score; called as fn(prompt, response, **fields)
    with the prompt record's other fields (an `answer`) that the function names, or fn(prompt, response)"""
    reward_fn_weights: tuple[float, ...] = ()
    """one weight per --reward-fn term (default 1 each)"""
    reward_label_index: int | None = None
    """for a reward model with several outputs (a sentiment classifier's labels), the one that is the reward, e.g. the
    'positive' logit; required then"""
    reward_transform: Literal["none", "logsigmoid"] = "none"
    """applied to the reward model's output: 'logsigmoid' turns a classifier's logit into log P(label), at most 0"""
    value_model: Literal["separate", "shared"] = "separate"
    """'separate': a model initialised from the (first) reward model (the SFT model without one); 'shared': a policy
    head"""
    eval_reward_fn: str = "auto"
    """a judge fn(prompt, response, **fields) -> float used only for evaluation; 'auto': the embedded task's gold judge
    (reviews_task.py:gold_score) on its own prompts, none on yours; '' to skip"""
    trust_remote_code: bool = False
    """allow a Hub model to run its own code (only for models you trust)"""
    dataset: str = f"{TASK_DATA}/prompts_train.jsonl"
    """prompts (prompt-only, or any format with a prompt; other fields reach reward functions):
    a JSONL, JSON, Parquet or CSV file, a `save_to_disk` folder or a Hub dataset id (docs/details.md#data-sources)"""
    eval_dataset: str = "auto"
    """held-out prompts for evaluation; 'auto': the embedded task's held-out prompts with its training prompts, with
    yours --eval-split's split of --dataset or none (evaluation then samples training prompts); 'none' likewise"""
    dataset_config: str | None = None
    """the configuration (subset) of a Hub dataset given as --dataset or --eval-dataset"""
    dataset_split: str = "train"
    """the split of --dataset to train on, when it has splits (a Hub dataset, a saved DatasetDict)"""
    eval_split: str = ""
    """held out: the split of --dataset to evaluate on (e.g. 'test'); with --eval-dataset, the split read from it
    (default 'train', a file's only split)"""
    max_prompt_length: int = 64
    """in tokens; longer prompts lose their oldest text (the chat template's frame is kept)"""

    # rollout
    num_iterations: int = 60
    """rollout + update iterations"""
    rollout_batch_size: int = 64
    """prompts (episodes) per iteration, per process (reduced to fit a smaller prompt file)"""
    response_length: int = 24
    """most tokens generated per response"""
    temperature: float = 0.7
    """sampling temperature; log-probs for the loss are taken from logits divided by it as well"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that reaches response_length without EOS"""

    # algorithm
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty (the initial value when adaptive)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """'k1' (log-ratio) or 'k3' (unbiased, always >= 0) in the reward; both are logged"""
    adaptive_kl: bool = False
    """adapt kl_coef towards target_kl (Ziegler et al. 2019, sec. 2.2)"""
    target_kl: float = 3.0
    """with --adaptive-kl: the per-sequence KL to aim for, in nats"""
    kl_horizon: int = 10000
    """with --adaptive-kl: episodes over which kl_coef can change by ~e^0.2"""
    whiten_rewards: bool = False
    """whiten the per-token rewards over valid tokens before GAE (without shifting their mean)"""
    reward_clip: float = 0.0
    """clip scores to [-reward_clip, reward_clip]; 0 = off"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    num_ppo_epochs: int = 4
    """passes over each rollout batch"""
    num_mini_batches: int = 2
    """minibatches per PPO epoch (one optimizer step each)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch"""
    cliprange: float = 0.2
    """policy ratio clip epsilon"""
    cliprange_value: float = 0.2
    """value clip around the rollout-time values"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    ent_coef: float = 0.0
    """weight of the entropy bonus; 0 = off"""
    dual_clip: float = 0.0
    """c > 1 bounds the loss of negative advantages at -c * A (Ye et al. 2020); 0 = off"""
    lora_r: int = 0
    """LoRA: train rank-r adapters on the decoder's linear layers instead of every weight (`pip install peft`); 0: off"""
    lora_alpha: float = 32.0
    """LoRA: the adapters' product is scaled by lora_alpha / lora_r"""
    lora_target_modules: str = "all-linear"
    """LoRA: the layers to adapt, by name ('q_proj,v_proj'), or 'all-linear' (every linear layer of the decoder)"""
    learning_rate: float | None = None
    """AdamW learning rate of policy and value, decayed linearly to 0; default 1e-4 for the embedded tiny model,
    3e-6 otherwise (the N+ details' rate for 1B-7B models); 10x either with LoRA"""
    weight_decay: float = 0.0
    """AdamW weight decay of policy and value (of weight matrices: not of biases and norm weights)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    padding_free: bool = True
    """pack query+response sequences without padding in every forward pass (checked at start; falls back to
    padding for a model that lets packed sequences attend to each other)"""

    # evaluation
    eval_steps: int = 20
    """evaluate on held-out prompts every this many iterations (and at the end)"""
    num_eval_prompts: int = 128
    """held-out prompts per evaluation (0: no evaluation)"""
    eval_pass_k: int = 0
    """with a verifier as --eval-reward-fn (1 = right): held-out greedy accuracy (eval/pass@1_greedy) at every
    evaluation and, at the first and the last, pass@1 and pass@k from k sampled responses per prompt; 0: off"""
    num_sample_rows: int = 4
    """sample responses printed and logged per evaluation"""


def exact_div(a: int, b: int, what: str) -> int:
    if a % b != 0:
        raise SystemExit(f"{what}: {a} is not divisible by {b}")
    return a // b


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """(B, T) sampled ids -> (responses with everything after the first EOS set to pad, (B, T) mask, (B,) has_eos).
    `eos_id` is the token that ends a response: the chat template's end-of-turn token, or EOS (`end_token_id`).

    The mask keeps the EOS itself: the reward is read there and its log-prob is part of the action sequence.
    """
    is_eos = responses == eos_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.long().argmax(dim=1), responses.shape[1])  # (B,)
    positions = torch.arange(responses.shape[1], device=responses.device)
    response_mask = positions[None, :] <= first_eos[:, None]  # (B, T), True on valid tokens
    return responses.masked_fill(~response_mask, pad_id), response_mask, has_eos


def logprobs_and_entropy(logits: torch.Tensor, responses: torch.Tensor, temperature: float, entropy_grad: bool = True):
    """(B, T, V) logits that predict `responses` (B, T) -> their log-probs (B, T) and the entropy (B, T).

    Divided by the sampling temperature, so these are the log-probs of the distribution actually sampled from. The
    entropy is differentiable only with `entropy_grad` (the entropy bonus is on): otherwise autograd would keep a
    (B, T, V) softmax for a backward whose result the loss multiplies by 0.
    """
    logits = logits.float() / temperature
    logsumexp = torch.logsumexp(logits, dim=-1)  # (B, T)
    logprobs = torch.gather(logits, 2, responses.unsqueeze(-1)).squeeze(-1) - logsumexp
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = logsumexp - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


def kl_shaped_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef: float, kl_estimator: str = "k1"):
    """Per-token rewards (B, T): -kl_coef * KL at every valid token, plus the (B,) score at the last valid token,
    which is the EOS (or the last token of a response cut at response_length). Not one past it: that is padding.

    Returns (rewards, non_score_reward, kl_k1, kl_k3); the KL tensors are per token and zero on padding.
    """
    logr = ref_logprobs - logprobs  # log(pi_ref / pi) of the sampled tokens
    kl_k1 = -logr * response_mask
    kl_k3 = (torch.exp(logr) - 1 - logr) * response_mask
    non_score_reward = -kl_coef * (kl_k1 if kl_estimator == "k1" else kl_k3)
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(rewards), device=rewards.device), last_token_index(response_mask)] += scores
    return rewards, non_score_reward, kl_k1, kl_k3


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) using statistics of the valid tokens only; invalid ones become 0.
    Under torchrun the statistics are those of every process's valid tokens: the whole rollout batch is normalised
    as one, as it would be on one device (per-process statistics would give each share its own scale)."""
    def global_mean(v):
        sums = all_reduce(torch.stack([(v * mask).sum(), mask.sum()]))  # itself without torchrun
        return sums[0] / sums[1].clamp(min=1)
    mean = global_mean(x)
    var = global_mean((x - mean) ** 2)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized Advantage Estimation (Schulman et al. 2016) over (B, T) per-token rewards and values.

    delta_t = r_t + gamma * V(t + 1) - V(t);  A_t = delta_t + gamma * lam * A_(t + 1). Values and rewards past a
    response's end are zeroed, so the EOS token bootstraps from 0 and padding contributes nothing.
    Returns (advantages, returns = advantages + values), both (B, T) and zero on invalid tokens.
    """
    rewards, values = rewards * mask, values * mask
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    return advantages, advantages + values


def policy_loss(new_logprobs, logprobs, advantages, mask, cliprange: float, dual_clip: float = 0.0):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss; masked mean over valid tokens.

    Returns (pg_loss, ratio, clipfrac) with ratio (B, T).
    """
    ratio = torch.exp(new_logprobs - logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    if dual_clip > 0:  # for A < 0 the clipped loss grows without bound in the ratio; cap it at -c * A
        pg_loss_max = torch.where(advantages < 0, torch.min(pg_loss_max, -dual_clip * advantages), pg_loss_max)
    clipfrac = masked_mean((pg_losses2 > pg_losses).float(), mask)
    return masked_mean(pg_loss_max, mask), ratio, clipfrac


def value_loss(new_values, values, returns, mask, cliprange_value: float):
    """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within cliprange_value of the
    rollout-time value (the N+ details, #12). Returns (vf_loss, vf_clipfrac)."""
    vpredclipped = values + torch.clamp(new_values - values, -cliprange_value, cliprange_value)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), mask)
    return 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask), vf_clipfrac


def layout(query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int, padding_free: bool):
    """(B, Tq + T) left-padded queries + responses -> what a forward pass over them needs: the model inputs;
    (rows, cols), each (B, T), where the logit that predicts response token t of sequence b sits; and (B, 2) where
    each sequence's last real token (its EOS) sits, where a reward model reads its score. Computed once per batch and
    shared by the policy, reference, value and reward forwards.

    Padded: positions come from the mask, so left-padded queries see the positions of unpadded ones; the logit at
    column c predicts token c + 1, so response tokens are predicted from columns [context_length - 1, -1).
    Padding-free: each sequence without its padding, packed into rows (`pack`, below). Past a response's EOS,
    (rows, cols) stay at its last token, so those (masked) entries depend on the sequence alone.
    """
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


def with_score_suffix(query_responses: torch.Tensor, attention_mask: torch.Tensor, has_eos: torch.Tensor,
                      suffix: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask -> (B, L + k): the k ids of `suffix` (`common.score_suffix`, the chat template's text after
    the end token) written after the last real token of each response that ended (has_eos), where a reward model reads
    its score; the other rows gain only padding."""
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
    """A reward function -> call(prompt, response, fields): the function gets the record's fields it names (all of them
    if it takes **kwargs); fn(prompt, response) is called as before. (Copied in ppo_rlhf.py and grpo.py.)"""
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return lambda prompt, response, fields: fn(prompt, response, **fields)
    names = {p.name for p in params[2:]}
    return lambda prompt, response, fields: fn(prompt, response, **{k: v for k, v in fields.items() if k in names})


def scored(values: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A reward function's results -> (B,) scores and (B,) bool failures: None means "could not score" (a verifier
    that found no answer to read), scored 0 and counted, so that its share is logged (`parse_failures`) rather than
    hidden in the mean. (Copied in ppo_rlhf.py and grpo.py.)"""
    failed = torch.tensor([v is None for v in values], dtype=torch.bool, device=device)
    return torch.tensor([0.0 if v is None else float(v) for v in values], device=device), failed


def pass_rates(generate, judge, records: list, k: int) -> dict:
    """Held-out accuracy under a judge that gives 1 for a right answer (a verifier; None or less is wrong): the greedy
    response's pass@1, and with k > 1, from k sampled responses per prompt, their pass@1 (the mean) and pass@k (any of
    the k right: Chen et al. 2021's unbiased estimator with n = k). generate(indices, temperature) -> the texts of
    those records' responses; temperature 0 is greedy, None the training temperature. (Copied in ppo_rlhf.py and
    grpo.py.)"""
    def right(indices, texts):
        return scored([judge(records[i]["prompt"], t, records[i].get("fields", {})) for i, t in zip(indices, texts)],
                      "cpu")[0] >= 1
    every = list(range(len(records)))
    out = {"eval/pass@1_greedy": right(every, generate(every, 0.0)).float().mean()}
    if k > 1:
        repeated = [i for i in every for _ in range(k)]
        ok = right(repeated, generate(repeated, None)).view(-1, k)
        out |= {"eval/pass@1": ok.float().mean(), f"eval/pass@{k}": ok.any(1).float().mean()}
    return out


def check_record_fields(fn, spec: str, records: list, path: str) -> None:
    """Stop before training if a reward function needs a field (an argument without a default) that a record lacks,
    naming the file and line. (Copied in ppo_rlhf.py and grpo.py.)"""
    needed = [p.name for p in list(inspect.signature(fn).parameters.values())[2:]
              if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for r in records:
        missing = [name for name in needed if name not in r.get("fields", {})]
        if missing:
            raise SystemExit(f"error: {r.get('where', path)}: no field '{missing[0]}', which the reward "
                             f"function {spec} takes")


class ValueHead(torch.nn.Module):
    """The shared value network (`--value-model shared`): a linear map of the policy's last hidden state to a value
    per token, zero-initialised so that the first values are 0. Saved beside the policy as value_head.safetensors."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (...)
        return self.linear(hidden).squeeze(-1).float()


class Rollout(NamedTuple):
    """Sampled episodes, as `rollout` in main returns them."""
    query_responses: torch.Tensor  # (B, Tq + T) left-padded queries, then responses padded after their end token
    attention_mask: torch.Tensor  # (B, Tq + T)
    context_length: int  # Tq
    responses: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T) bool, True up to and including the end token
    has_eos: torch.Tensor  # (B,) bool: the response ended within response_length


def forward(policy, value_net, batch_layout, responses: torch.Tensor, temperature: float, with_values: bool = True,
            entropy_grad: bool = True):
    """One pass over a `layout` of query+responses -> logprobs, entropy and values of the (B, T) `responses`.
    `value_net` is a separate value model (a sequence classifier), a ValueHead on the policy, or None."""
    inputs, (rows, cols), _ = batch_layout
    shared = isinstance(value_net, ValueHead)
    # The LM head only where a response token is predicted: its (R, L, H) input is gathered to (B, T, H) first. A hook,
    # not a call of the head, so what a model does to logits after it (Gemma 2's soft-capping) still happens.
    hook = policy.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0][rows, cols],))
    try:
        out = policy(**inputs, use_cache=False, output_hidden_states=shared and with_values)
    finally:
        hook.remove()
    logprobs, entropy = logprobs_and_entropy(out.logits, responses, temperature, entropy_grad)  # out.logits (B, T, V)
    values = None
    if with_values and shared:
        values = value_net(out.hidden_states[-1][rows, cols])
    elif with_values:  # the value model's head at the same positions (its backbone reads like the reward model's)
        hidden = getattr(value_net, value_net.base_model_prefix)(**inputs, use_cache=False).last_hidden_state
        values = value_net.score(hidden[rows, cols]).squeeze(-1).float()
        values = values - getattr(value_net.config, "reward_offset", 0.0)
    return logprobs, entropy, values  # each (B, T)


def reference_logprobs(ref_policy, batch_layout, responses: torch.Tensor, temperature: float) -> torch.Tensor:
    """The frozen reference's (B, T) log-probs of the responses: `forward` without a value network."""
    return forward(ref_policy, None, batch_layout, responses, temperature, with_values=False)[0]


def stutters(text: str) -> bool:
    """Whether a response repeats a pair of consecutive words ("great and great and"): the degenerate text a reward
    model can come to overrate; the share of such responses is logged as eval/stutter_rate."""
    words = re.findall(r"[\w']+", text.lower())
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) < len(pairs)


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
    return members, reusable


def main(args: Args) -> None:
    if args.dual_clip != 0 and args.dual_clip <= 1:
        raise SystemExit(f"--dual-clip {args.dual_clip}: c must be > 1 (the bound -c * A must lie beyond the clipped "
                         "loss), or 0 to turn dual clipping off")
    rank, world_size, device = init_distributed(args.device)  # rank 0 of 1 without torchrun
    keep_freed_memory(device)  # CPU only
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("error: --track logs to Weights & Biases, which is not installed: pip install wandb")
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"  # logs in runs/{run_name}
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # --bf16: the trained models (policy, value) keep fp32 weights and AdamW state and compute in bf16 under
    # autocast (FSDP2 instead gathers bf16 copies of the fp32 shards); the frozen ones (reference, reward model) are
    # held in bf16
    fsdp = world_size > 1 and args.strategy == "fsdp"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and not fsdp)  # noqa: E731
    reward_model_paths = args.reward_model_path  # 'auto': models/reward_model, unless reward functions are given
    if reward_model_paths in [("auto",), ("none",)]:
        reward_model_paths = () if args.reward_fn or reward_model_paths == ("none",) else ("models/reward_model",)
    if not reward_model_paths and not args.reward_fn:
        raise SystemExit("error: no reward: give --reward-model-path, --reward-fn, or both")
    reward_fn_weights = args.reward_fn_weights or (1.0,) * len(args.reward_fn)
    if len(reward_fn_weights) != len(args.reward_fn):
        raise SystemExit(f"error: {len(reward_fn_weights)} --reward-fn-weights for {len(args.reward_fn)} --reward-fn")
    for path, default, command in [(args.sft_model_path, "models/sft", "python sft.py"),
                                   *[(p, "models/reward_model", "python reward_model.py") for p in reward_model_paths]]:
        if path == default and not os.path.isdir(path):
            raise SystemExit(f"error: {path} does not exist: run `{command}` first, or point the flag at a model")
    embedded = args.dataset == f"{TASK_DATA}/prompts_train.jsonl"  # the embedded task's own prompts
    if rank == 0 and embedded and not os.path.exists(args.dataset):
        load_function("reviews_task.py:ensure_data")()  # deterministic: the same files every time
    claim_output_dir(args.output_dir, args.resume)  # a lock; an interrupted save mended; a save can be written
    if world_size > 1:
        dist.barrier()  # the files are written
    # 'auto': the embedded task's held-out prompts and judge with its own prompts, none with the user's
    eval_dataset = args.eval_dataset if args.eval_dataset != "auto" else (
        f"{TASK_DATA}/prompts_eval.jsonl" if embedded else args.dataset if args.eval_split else "none")
    eval_reward_fn = args.eval_reward_fn if args.eval_reward_fn != "auto" else (
        "reviews_task.py:gold_score" if embedded else "")

    # 1. four models: policy, frozen reference, frozen reward model(s) (and/or reward functions), value network
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    resuming = args.resume and os.path.exists(os.path.join(ckpt_dir, "training_state.pt"))
    # LoRA with --bf16: the frozen base in bf16, as a frozen reference is
    trained = dict(dtype=torch.bfloat16 if args.bf16 and args.lora_r and not fsdp else torch.float32,
                   trust_remote_code=args.trust_remote_code)
    frozen = dict(dtype=torch.bfloat16 if args.bf16 else torch.float32, trust_remote_code=args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(args.sft_model_path, trust_remote_code=args.trust_remote_code)
    policy_from = args.init_policy_path or args.sft_model_path
    policy = AutoModelForCausalLM.from_pretrained(ckpt_dir if resuming and not args.lora_r else policy_from,
                                                  **trained).to(device)
    # LoRA on a policy that starts from the SFT model: the reference is the policy with its adapters off, no second copy
    shared_reference = args.lora_r > 0 and os.path.abspath(policy_from) == os.path.abspath(args.sft_model_path)
    ref_policy = None if shared_reference else AutoModelForCausalLM.from_pretrained(args.sft_model_path,
                                                                                   **frozen).to(device)
    for model in [m for m in (policy, ref_policy) if m is not None]:
        setup_tokenizer(tokenizer, model)
    check_room(args.output_dir, policy)
    if args.lora_r:
        add_lora(policy, args.lora_r, args.lora_alpha, args.lora_target_modules, policy_from,
                 resume_dir=ckpt_dir if resuming else "")
        if shared_reference:
            print("LoRA: the reference is the policy with its adapters off, no second copy of the weights")
    reward_fns = [(f"score_{spec.rpartition(':')[2]}_{i}" if len(args.reward_fn) > 1 else
                   f"score_{spec.rpartition(':')[2]}", load_function(spec), weight)
                  for i, (spec, weight) in enumerate(zip(args.reward_fn, reward_fn_weights))]  # (name, fn, weight)
    reward_members, value_from_reward_model = load_reward_models(reward_model_paths, tokenizer, policy, args, frozen,
                                                                  device)
    if len(reward_members) > 1:
        print(f"reward: an ensemble of {len(reward_members)} reward models, mean - {args.ensemble_k:g} * std")
    if args.value_model == "separate":
        value_base = reward_model_paths[0] if value_from_reward_model else args.sft_model_path
        value_from = os.path.join(ckpt_dir, "value_model") if resuming and not args.lora_r else value_base
        if not resuming and reward_members and not value_from_reward_model:
            print("value model: from the SFT model, not the reward model (another tokenizer, width or label layout)")
        logging.getLogger("transformers.modeling_utils").disabled = value_from == args.sft_model_path  # a new
        value_net = AutoModelForSequenceClassification.from_pretrained(value_from, num_labels=1, **trained).to(device)
        logging.getLogger("transformers.modeling_utils").disabled = False  # head is expected: no report of it
        value_net.train()
        if args.lora_r:  # its score head trained whole, beside the backbone's adapters
            add_lora(value_net, args.lora_r, args.lora_alpha, args.lora_target_modules, value_base, head="score",
                     resume_dir=os.path.join(ckpt_dir, "value_model") if resuming else "")
    else:
        value_net = ValueHead(policy.config.get_text_config().hidden_size).to(device)
        if resuming:
            value_net.load_state_dict(load_file(os.path.join(ckpt_dir, "value_head.safetensors")))
    reward_models = [m for m, _, _ in reward_members]
    hf_models = [m for m in (policy, ref_policy, *reward_models, value_net) if isinstance(m, torch.nn.Module) and
                 hasattr(m, "config")]  # the Hugging Face models among the four
    for model in hf_models:
        disable_dropout(model)  # PPO needs identical log-probs in rollout and update (N+ details, #2)
    for model in [m for m in (ref_policy, *reward_models) if m is not None]:
        model.eval().requires_grad_(False)
    packed = [m for m in hf_models if m is not ref_policy and all(m is not r or same for r, _, same in reward_members)]
    padding_free = args.padding_free and all(packing_works(m) for m in packed)
    if args.padding_free and not padding_free:
        print("warning: a model lets packed sequences attend to each other; padding instead (--no-padding-free)")
    learning_rate = args.learning_rate
    if learning_rate is None:
        tiny = getattr(policy.config, "embedded_tiny_model", False)
        learning_rate = (1e-4 if tiny else 3e-6) * (10 if args.lora_r else 1)  # LoRA needs about 10x
        print(f"learning rate {learning_rate:g} ({'the embedded tiny model' if tiny else 'a pretrained model'}"
              f"{', LoRA: 10x' if args.lora_r else ''}; --learning-rate to change)")
    if args.gradient_checkpointing:
        for model in (policy, value_net):
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # Every pass runs as a wrapper's forward: policy_w(fn, x, ...) computes fn(policy, value_net, x, ...), ref_w(fn, x)
    # fn(ref_policy, x). DDP syncs gradients and FSDP2 gathers parameters only around the forward of the module they
    # wrap, and a pass calls parts of a model (`forward` puts the LM head at response positions only), so the pass is
    # handed to the wrapper (`Parallel`, in the plumbing). Without torchrun the wrappers only call fn. Under torchrun
    # the frozen two are sharded too with --strategy fsdp, and replicated with ddp.
    policy_w = distribute([policy, value_net], args.strategy, args.bf16)
    ref_w = WithoutAdapters(policy_w, policy) if shared_reference else distribute([ref_policy], args.strategy,
                                                                                   args.bf16, trainable=False)
    reward_ws = [(distribute([m], args.strategy, args.bf16, trainable=False), tok, same) for m, tok, same in reward_members]
    policy_w.train()

    # 2. prompts, left-padded per batch for generation
    try:
        train_records = read_data(args.dataset, "prompt", None, args.dataset_config, args.dataset_split)
        eval_records = read_data(eval_dataset, "prompt", None, args.dataset_config, args.eval_split or "train", True) if (
            eval_dataset != "none") else []
    except DataError as e:
        raise SystemExit(f"error: {e}")
    for spec, (_, fn, _) in zip(args.reward_fn, reward_fns):
        check_record_fields(fn, spec, train_records, args.dataset)
    if eval_reward_fn:
        check_record_fields(load_function(eval_reward_fn), eval_reward_fn, eval_records or train_records,
                            eval_dataset if eval_records else args.dataset)

    def encode_prompts(records):
        """Records -> (records, prompt ids) without the prompts that cannot fit max_prompt_length even cut."""
        encoded = [(r, *encode_prompt(tokenizer, r["prompt"], args.max_prompt_length)) for r in records]
        kept = [(r, ids) for r, ids, _ in encoded if ids is not None]
        if len(kept) < len(encoded):
            print(f"skipped {len(encoded) - len(kept)} prompts whose fixed part exceeds --max-prompt-length")
        cut = sum(was_cut for _, ids, was_cut in encoded if ids is not None)
        if cut:
            print(("warning: " if cut > 0.1 * len(encoded) else "") + f"{cut} of {len(encoded)} prompts cut from the "
                  f"left to --max-prompt-length {args.max_prompt_length} (the model sees only their end)")
        return [r for r, _ in kept], [ids for _, ids in kept]
    train_records, train_prompts = encode_prompts(train_records)
    if not eval_records:  # evaluation samples training prompts; its scores are then not held-out figures
        print("no held-out prompts (--eval-dataset FILE to add them): evaluation samples training prompts")
    eval_records, eval_prompts = encode_prompts((eval_records or train_records)[: args.num_eval_prompts])
    unit = args.num_mini_batches * args.gradient_accumulation_steps  # the rollout batch must split into micro-batches
    rollout_batch_size = args.rollout_batch_size  # prompts per process per iteration
    if len(train_prompts) < rollout_batch_size * world_size:
        if len(train_prompts) < unit * world_size:
            raise SystemExit(f"{args.dataset}: {len(train_prompts)} prompts is fewer than num_mini_batches * "
                             f"gradient_accumulation_steps * processes = {unit * world_size}")
        print(f"only {len(train_prompts)} prompts: --rollout-batch-size {args.rollout_batch_size} -> "
              f"{len(train_prompts) // world_size // unit * unit}")
        rollout_batch_size = len(train_prompts) // world_size // unit * unit
    mini_batch_size = exact_div(rollout_batch_size, args.num_mini_batches, "rollout_batch_size / num_mini_batches")
    micro_batch_size = exact_div(mini_batch_size, args.gradient_accumulation_steps,  # episodes per forward/backward
                                 "mini_batch_size / gradient_accumulation_steps")
    print(f"global batch: {rollout_batch_size} prompts x {world_size} process(es) = "
          f"{rollout_batch_size * world_size} episodes per iteration")
    batches_per_epoch = len(train_prompts) // (rollout_batch_size * world_size)

    def prompt_batch(iteration: int) -> list[int]:
        """Indices of this process's prompts of an iteration: its share of the global batch, from epoch-wise
        permutations seeded by (seed, epoch), the same in every process; resumable."""
        epoch, j = divmod(iteration, batches_per_epoch)
        order = torch.randperm(len(train_prompts), generator=torch.Generator().manual_seed(args.seed * 10007 + epoch))
        first = (j * world_size + rank) * rollout_batch_size
        return order[first: first + rollout_batch_size].tolist()

    # 3. one AdamW for policy and value (eps 1e-5, N+ details #5), learning rate decayed linearly to 0
    params = list(policy_w.parameters())  # the policy's, then the value network's
    optimizer = torch.optim.AdamW(decay_groups(policy_w, args.weight_decay), lr=learning_rate, eps=1e-5,
                                  fused=device.type in ("cpu", "cuda"))
    num_updates = args.num_iterations * args.num_ppo_epochs * args.num_mini_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / num_updates)
    kl_coef, start_iteration = args.kl_coef, 0
    if resuming:
        state = load_state(ckpt_dir, policy_w, optimizer)  # also restores the optimizer and the random generators
        scheduler.load_state_dict(state["scheduler"])
        start_iteration, kl_coef, run_name = state["iteration"], state["kl_coef"], state["run_name"]
        print(f"resuming {ckpt_dir} at iteration {start_iteration}")
    elif world_size > 1:
        torch.manual_seed(args.seed + rank)  # every process samples its own (models are built: they had to match)
    # the flags as this run resolved them: args.json beside the model, the logs' config
    config = vars(args) | {"run_name": run_name, "reward_model_path": reward_model_paths,
                           "reward_fn_weights": reward_fn_weights, "eval_dataset": eval_dataset,
                           "eval_reward_fn": eval_reward_fn, "learning_rate": learning_rate, "padding_free": padding_free,
                           "rollout_batch_size": rollout_batch_size}
    metrics = Metrics(f"runs/{run_name}", config, args.track, args.wandb_project,
                      state | {"step": start_iteration} if resuming else None)
    value_saved_as = ("value_head.safetensors" if isinstance(value_net, ValueHead) else "value_model", value_net)
    pad_id, eos_id = tokenizer.pad_token_id, end_token_id(tokenizer)  # eos_id: the token that ends a response

    @torch.no_grad()
    def rollout(model_w, prompts: list[list[int]], temperature: float | None = None) -> Rollout:
        """Generate from the first model of `model_w` (the policy, or the reference) with pure sampling
        (`common.sample`: softmax(logits / temperature), nothing from the model's generation_config), cut after the
        first end token."""
        queries, query_mask = pad(prompts, pad_id, side="left")  # (B, Tq)
        queries, query_mask = queries.to(device), query_mask.to(device)
        with autocast(), gathered(model_w) as generator:
            out = generator(lambda model, *_: sample(model, queries, query_mask, args.response_length,
                                                     args.temperature if temperature is None else temperature,
                                                     eos_id, pad_id))
        context_length = queries.shape[1]
        responses, response_mask, has_eos = truncate_after_eos(out[:, context_length:], eos_id, pad_id)  # (B, T)
        return Rollout(torch.cat([queries, responses], dim=1), torch.cat([query_mask, response_mask.long()], dim=1),
                       context_length, responses, response_mask, has_eos)

    suffix = score_suffix(tokenizer)  # what the chat template writes after the end token ("\n" in ChatML)
    callers = [record_caller(fn) for _, fn, _ in reward_fns]

    def reward_layout(query_responses, attention_mask, context_length, has_eos, batch_layout):
        """The layout a reward model of the policy's tokenizer reads: the policy's, with `suffix` after each response
        that ended, so the score is read where transformers reads it on the rendered conversation."""
        if not suffix:
            return batch_layout
        return layout(*with_score_suffix(query_responses, attention_mask, has_eos, suffix), context_length, padding_free)

    @torch.no_grad()
    def get_scores(batch_layout, responses, response_mask, records) -> tuple[torch.Tensor, dict]:
        """(B,) sequence scores and their parts. A reward model reads the last real token of the policy's ids (the end
        token and `suffix`: `reward_layout`), or of its own tokens (another tokenizer); an ensemble's score is mean -
        ensemble_k * std over its members (`score_rm`, `rm_std`); each --reward-fn term (`score_{name}`, unweighted)
        reads text and the prompt record's fields, and adds weight * term."""
        prompts_text = [r["prompt"] for r in records]
        texts = None  # decoded only for what reads text: a reward function, or a reward model of another tokenizer
        if reward_fns or not all(same for _, _, same in reward_ws):
            texts = tokenizer.batch_decode(responses.masked_fill(~response_mask, pad_id), skip_special_tokens=True)
        parts, members = {}, []
        for reward_w, reward_tokenizer, same_tokenizer in reward_ws:
            with autocast():
                if same_tokenizer:
                    inputs, _, last = batch_layout
                    outputs = reward_w(reward_scores, **inputs, last=last)
                else:  # the reward model's own tokens
                    outputs = reward_w(score_texts, reward_tokenizer, prompts_text, texts)
            if outputs.dim() == 2:  # several labels: the chosen one is the reward
                outputs = outputs[:, args.reward_label_index]
            members.append(F.logsigmoid(outputs) if args.reward_transform == "logsigmoid" else outputs)
        scores = torch.zeros(len(responses), device=device)
        if members:
            members = torch.stack(members)  # (M, B)
            if len(members) == 1:
                scores = parts["score_rm"] = members[0]
            else:  # the sample standard deviation over members: how much they disagree on each response
                parts["rm_std"] = members.std(dim=0)
                parts.update({f"score_rm_{i}": m for i, m in enumerate(members)})
                scores = parts["score_rm"] = members.mean(dim=0) - args.ensemble_k * parts["rm_std"]
        failed = torch.zeros(len(records), dtype=torch.bool, device=device)
        for (name, _, weight), call in zip(reward_fns, callers):
            parts[name], unscored = scored([call(r["prompt"], t, r.get("fields", {})) for r, t in zip(records, texts)],
                                           device)
            scores, failed = scores + weight * parts[name], failed | unscored
        if reward_fns:  # the share of responses a reward function could not score (None: scored 0)
            parts["parse_failures"] = failed.float()
        return scores, parts

    @torch.no_grad()
    def evaluate(iteration: int, final: bool = False):
        """Held-out prompts: reward, gold score, KL to the reference and length; at the end also the gold win rate
        of the policy against the SFT policy on the same prompts. Every process samples them (its own draws); the
        figures are the means over processes, the table rank 0's."""
        if not eval_prompts:  # --num-eval-prompts 0
            return {}
        policy_w.eval()
        texts = [r["prompt"] for r in eval_records]
        batch = rollout(policy_w, eval_prompts)
        batch_layout = layout(batch.query_responses, batch.attention_mask, batch.context_length, padding_free)
        with autocast():
            logprobs = policy_w(forward, batch_layout, batch.responses, args.temperature, with_values=False)[0]
            ref_logprobs = ref_w(reference_logprobs, batch_layout, batch.responses, args.temperature)
        scores, parts = get_scores(reward_layout(batch.query_responses, batch.attention_mask, batch.context_length,
                                                 batch.has_eos, batch_layout), batch.responses, batch.response_mask,
                                 eval_records)
        out = {"eval/scores": scores.mean(), "eval/kl": ((logprobs - ref_logprobs) * batch.response_mask).sum(1).mean(),
               "eval/response_length": batch.response_mask.sum(1).float().mean(),
               "eval/eos_rate": batch.has_eos.float().mean()}
        if len(parts) > 1:  # a hybrid reward or an ensemble: each part
            out.update({f"eval/{k}": v.mean() for k, v in parts.items()})
        decoded = tokenizer.batch_decode(batch.responses, skip_special_tokens=True)
        out["eval/distinct_responses"] = len(set(decoded)) / len(decoded)  # falls when the policy collapses to a template
        out["eval/stutter_rate"] = sum(map(stutters, decoded)) / len(decoded)  # a word pair repeated: degenerate text
        if eval_reward_fn:
            judge = record_caller(load_function(eval_reward_fn))
            gold, unscored = scored([judge(r["prompt"], t, r.get("fields", {})) for r, t in zip(eval_records, decoded)],
                                    "cpu")
            out["eval/gold_score"], out["eval/gold_parse_failures"] = gold.mean(), unscored.float().mean()
            if final:  # the SFT policy answers the same prompts; the gold judge picks (ties count half)
                sft_texts = tokenizer.batch_decode(rollout(ref_w, eval_prompts).responses, skip_special_tokens=True)
                sft_gold = scored([judge(r["prompt"], t, r.get("fields", {})) for r, t in zip(eval_records, sft_texts)],
                                  "cpu")[0]
                out["eval/sft_gold_score"] = sft_gold.mean()
                out["eval/gold_win_rate_vs_sft"] = ((gold > sft_gold).float() + 0.5 * (gold == sft_gold).float()).mean()
                metrics.log(iteration, sft_samples="\n".join(f"  {t!r:.300} -> {d!r}" for t, d in zip(texts, sft_texts)))
            if args.eval_pass_k:  # a verifier's accuracy: greedy at every evaluation, pass@k at the first and last
                def generate(indices, temperature):
                    chunks = [indices[k: k + len(eval_prompts)] for k in range(0, len(indices), len(eval_prompts))]
                    return sum((tokenizer.batch_decode(rollout(policy_w, [eval_prompts[i] for i in c], temperature)
                                                       .responses, skip_special_tokens=True) for c in chunks), [])
                out |= pass_rates(generate, judge, eval_records, args.eval_pass_k if iteration == 0 or final else 1)
        table = "\n".join(f"  {s:+.2f} | {t!r:.300} -> {d!r}" for s, t, d in zip(scores.tolist(), texts, decoded))
        out = {k: all_reduce(torch.as_tensor(v, dtype=torch.float, device=device), "mean") for k, v in out.items()}
        metrics.log(iteration, out, samples=table)
        tqdm.write(f"eval @ {iteration}: " + "  ".join(f"{k[5:]} {v:.3f}" for k, v in out.items()) + "\n" +
                   "\n".join(table.split("\n")[: args.num_sample_rows]))
        policy_w.train()
        return out

    progress = tqdm(range(start_iteration, args.num_iterations), initial=start_iteration, total=args.num_iterations,
                    desc="ppo", disable=rank != 0 or None)  # None: on in a terminal, off in a log file
    signals = StopSignals()  # SIGTERM, Ctrl-C: a checkpoint at the end of the iteration, then exit
    for iteration in progress:
        if iteration % args.eval_steps == 0:
            evaluate(iteration)
        t0 = time.time()
        # 4. rollout: sample responses from the current policy (pure sampling at --temperature)
        idx = prompt_batch(iteration)
        policy_w.eval()
        batch = rollout(policy_w, [train_prompts[i] for i in idx])
        query_responses, attention_mask, responses, has_eos = (batch.query_responses, batch.attention_mask,
                                                               batch.responses, batch.has_eos)
        response_mask = batch.response_mask.float()  # (B, T), 1 on valid tokens
        t_generate = time.time() - t0

        # 5. log-probs of the sampled tokens under policy and reference, values, and scores, in micro-batches
        #    of the training size so that the first PPO minibatch reproduces these numbers exactly
        with torch.no_grad():
            chunks, part_chunks = [], []
            for k in range(0, rollout_batch_size, micro_batch_size):
                chunk = slice(k, k + micro_batch_size)
                batch_layout = layout(query_responses[chunk], attention_mask[chunk], batch.context_length, padding_free)
                with autocast():
                    mb_logprobs, mb_entropy, mb_values = policy_w(forward, batch_layout, responses[chunk], args.temperature)
                    mb_ref_logprobs = ref_w(reference_logprobs, batch_layout, responses[chunk], args.temperature)
                mb_scores, mb_parts = get_scores(reward_layout(query_responses[chunk], attention_mask[chunk],
                                                               batch.context_length, has_eos[chunk], batch_layout),
                                                 responses[chunk], batch.response_mask[chunk],
                                                 [train_records[i] for i in idx[chunk]])
                chunks.append((mb_logprobs, mb_entropy, mb_values, mb_ref_logprobs, mb_scores))
                part_chunks.append(mb_parts)
            logprobs, entropy, values, ref_logprobs, scores = (torch.cat(c) for c in zip(*chunks))  # (B, T) .. (B,)
            score_parts = {name: torch.cat([p[name] for p in part_chunks]) for name in part_chunks[0]}  # each (B,)
            raw_scores = scores.clone()
            if iteration == 0:  # reward_model.py normalised its scores to mean 0 on the SFT policy's samples
                print(f"first rollout: mean score {all_reduce(raw_scores.mean(), 'mean').item():.3f}, std "
                      f"{raw_scores.std().item() if len(raw_scores) > 1 else 0:.3f} (about 0 when the reward model was "
                      "normalised on this SFT model's samples drawn as these are, give or take sampling noise: std x "
                      "sqrt(1 / this batch + 1 / reward_model.py's --num-normalize-samples))")
                unfinished = all_reduce((~has_eos).sum()).item()
                if unfinished > 0.1 * rollout_batch_size * world_size:
                    print(f"warning: {unfinished} of {rollout_batch_size * world_size} responses reached --response-length "
                          f"{args.response_length} without their end token (val/num_eos_tokens counts those that "
                          "ended): raise it for this data")
            scores = scores - args.missing_eos_penalty * (~has_eos).float()
            if args.reward_clip > 0:
                scores = scores.clamp(-args.reward_clip, args.reward_clip)

            # 6. per-token rewards: -kl_coef * KL at every token, plus the score at the last valid token (the EOS)
            rewards, non_score_reward, kl_k1, kl_k3 = kl_shaped_rewards(scores, logprobs, ref_logprobs, response_mask,
                                                                        kl_coef, args.kl_estimator)  # each (B, T)
            if args.whiten_rewards:
                rewards = masked_whiten(rewards, response_mask, shift_mean=False)

            # 7. advantages with GAE over valid tokens, returns = A + V before whitening A
            values = values * response_mask
            advantages, returns = compute_gae(rewards, values, response_mask, args.gamma, args.lam)
            advantages = masked_whiten(advantages, response_mask)
        t_rollout = time.time() - t0 - t_generate

        # 8. PPO update: num_ppo_epochs passes over shuffled minibatches; one optimizer step per minibatch. Under
        #    torchrun each process updates on its own episodes and DDP/FSDP2 average the gradients
        policy_w.train()
        stats = {k: [] for k in ["approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "ratio", "entropy", "grad_norm"]}
        for epoch in range(args.num_ppo_epochs):
            order = torch.randperm(rollout_batch_size, device=device) if epoch > 0 else torch.arange(
                rollout_batch_size, device=device)  # epoch 0 in rollout order: the first step must give ratio 1
            for start in range(0, rollout_batch_size, mini_batch_size):
                # the losses are token means over the whole minibatch (every micro-batch, every process): a
                # micro-batch's mean is weighted by its share of the tokens, and DDP's average over processes undone
                minibatch_tokens = all_reduce(response_mask[order[start: start + mini_batch_size]].sum()).clamp(min=1)
                for micro in range(start, start + mini_batch_size, micro_batch_size):
                    sync_gradients(policy_w, micro + micro_batch_size == start + mini_batch_size)
                    mb = order[micro: micro + micro_batch_size]
                    mb_mask = response_mask[mb]
                    batch_layout = layout(query_responses[mb], attention_mask[mb], batch.context_length, padding_free)
                    with autocast():
                        new_logprobs, new_entropy, new_values = policy_w(
                            forward, batch_layout, responses[mb], args.temperature,
                            entropy_grad=args.ent_coef != 0)  # no entropy backward unless the bonus is on
                    pg_loss, ratio, clipfrac = policy_loss(new_logprobs, logprobs[mb], advantages[mb], mb_mask,
                                                           args.cliprange, args.dual_clip)
                    vf_loss, vf_clipfrac = value_loss(new_values, values[mb], returns[mb], mb_mask,
                                                      args.cliprange_value)
                    entropy_bonus = masked_mean(new_entropy, mb_mask)
                    loss = pg_loss + args.vf_coef * vf_loss - args.ent_coef * entropy_bonus
                    (loss * (mb_mask.sum().clamp(min=1) / minibatch_tokens * world_size)).backward()
                    with torch.no_grad():
                        logratio = new_logprobs - logprobs[mb]
                        if epoch == 0 and micro == 0:  # nothing has been updated yet: must be exactly 0
                            first_ratio_dev = (ratio - 1).abs().max()
                        stats["approxkl"].append(0.5 * masked_mean(logratio ** 2, mb_mask))
                        stats["clipfrac"].append(clipfrac)
                        stats["pg_loss"].append(pg_loss.detach())
                        stats["vf_loss"].append(vf_loss.detach())
                        stats["vf_clipfrac"].append(vf_clipfrac)
                        stats["ratio"].append(ratio[mb_mask.bool()])
                        stats["entropy"].append(entropy_bonus.detach())
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # the norm before clipping
                stats["grad_norm"].append(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                stop_if_not_finite(iteration + 1, args.output_dir, grad_norm=stats["grad_norm"][-1].item())
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        t_update = time.time() - t0 - t_generate - t_rollout

        # 9. adaptive KL coefficient: proportional control towards target_kl (Ziegler et al. 2019, sec. 2.2), on the
        #    KL of the whole batch, so every process keeps the same kl_coef
        mean_kl = all_reduce(kl_k1.sum(1).mean(), "mean").item()
        if args.adaptive_kl:
            error = max(-0.2, min(0.2, mean_kl / args.target_kl - 1))
            kl_coef *= 1 + error * rollout_batch_size / args.kl_horizon

        # 10. log: each figure is the mean over processes (the first ratio's deviation, the largest)
        ratios = torch.cat(stats["ratio"])
        first_ratio_dev = all_reduce(first_ratio_dev, "max")
        row = {
            "objective/kl": mean_kl, "objective/kl_k3": kl_k3.sum(1).mean(),
            "objective/entropy": (entropy * response_mask).sum(1).mean(),
            "objective/scores": raw_scores.mean(), "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": (scores + non_score_reward.sum(1)).mean(),
            "policy/approxkl_avg": torch.stack(stats["approxkl"]).mean(),
            "policy/clipfrac_avg": torch.stack(stats["clipfrac"]).mean(),
            "policy/entropy_avg": torch.stack(stats["entropy"]).mean(),
            "loss/policy_avg": torch.stack(stats["pg_loss"]).mean(),
            "loss/value_avg": torch.stack(stats["vf_loss"]).mean(),
            "loss/grad_norm_avg": torch.stack(stats["grad_norm"]).mean(),
            "val/clipfrac_avg": torch.stack(stats["vf_clipfrac"]).mean(), "val/ratio": ratios.mean(),
            "val/first_ratio_max_dev": first_ratio_dev,
            "val/ratio_var": ratios.var() if ratios.numel() > 1 else 0.0,  # one valid token: no variance to measure
            "val/num_eos_tokens": has_eos.sum(),
            "val/response_length": response_mask.sum(1).mean(), "charts/lr": scheduler.get_last_lr()[0],
            "charts/kl_coef": kl_coef, "charts/episodes": (iteration + 1) * rollout_batch_size * world_size,
            "time/generate": t_generate, "time/rollout_forward": t_rollout, "time/update": t_update,
        }
        if len(score_parts) > 1:  # a hybrid reward or an ensemble: each part, and the members' disagreement
            row.update({f"objective/{k}": v.mean() for k, v in score_parts.items()})
        row = dict(zip(row, all_reduce(torch.tensor([float(v) for v in row.values()], device=device), "mean").tolist()))
        metrics.log(iteration + 1, row)
        if not all(torch.isfinite(torch.as_tensor(v, dtype=torch.float)) for v in row.values()):
            raise SystemExit(f"non-finite metric at iteration {iteration + 1}: {row}")
        progress.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{mean_kl:.2f}",
                             len=f"{row['val/response_length']:.1f}", clip=f"{row['policy/clipfrac_avg']:.2f}")
        if progress.disable:  # no progress bar (a log file): a line per iteration
            print(f"iteration {iteration + 1}/{args.num_iterations}: score {row['objective/scores']:.3f}  kl {mean_kl:.2f}"
                  f"  length {row['val/response_length']:.1f}  clipfrac {row['policy/clipfrac_avg']:.2f}")
        stop = signals.requested(device) and iteration + 1 < args.num_iterations
        if ((iteration + 1) % args.save_steps == 0 and iteration + 1 < args.num_iterations) or stop:
            state = {"scheduler": scheduler.state_dict(), "iteration": iteration + 1, "kl_coef": kl_coef,
                     "run_name": run_name, "log_bytes": metrics.position()}
            save_model(ckpt_dir, None, config, ("", policy), value_saved_as, training=(state, policy_w, optimizer))
        if stop:
            signals.stop(ckpt_dir, iteration + 1)
    signals.restore()
    progress.close()

    # 11. save first, so that nothing after it can cost the trained policy: it loads with AutoModelForCausalLM, the
    #     value model beside it (value_model/, or value_head.safetensors); then the final evaluation
    save_model(args.output_dir, tokenizer, config, ("", policy), value_saved_as)
    print(f"saved to {args.output_dir}")
    evaluate(args.num_iterations, final=True)
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
