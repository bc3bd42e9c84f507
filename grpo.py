"""Critic-free RL with a group baseline: GRPO, Dr. GRPO, RLOO and REINFORCE++ in one loop, no value network.

    python grpo.py                                   # after sft.py and reward_model.py; embedded task, CPU
    python grpo.py --advantage rloo                  # RLOO as its paper has it (k1 KL in the reward)
    python grpo.py --scale-rewards none --loss-aggregation constant          # Dr. GRPO
    python grpo.py --dataset problems.jsonl --reward-fn my_task.py:verify    # a checkable reward: fn(prompt, response, answer)
    torchrun --nproc-per-node 8 grpo.py --sft-model-path ... --strategy fsdp --bf16

For every prompt, G responses are sampled and scored; a response's advantage is its score measured against the other
responses to the same prompt (the group is the baseline, so no value network is trained), and the policy takes a
clipped policy-gradient step with that advantage at each of the response's tokens. Shao et al. 2024 (DeepSeekMath:
GRPO); Liu et al. 2025 (Dr. GRPO: no std scaling, a constant loss divisor); Yu et al. 2025 (DAPO: clip-higher, the
token-level loss, overlong masking); Ahmadian et al. 2024 (RLOO); Hu 2025 (REINFORCE++). Each choice is a flag:
  --advantage grpo          (r - mean of the group) / std, where std is the group's (--scale-rewards group, GRPO),
                            the whole batch's (batch) or 1 (none: Dr. GRPO)
  --advantage rloo          r - mean of the other G - 1 responses (leave-one-out: unbiased)
  --advantage reinforce_pp  r - mean of the group, divided by the std of those over the whole batch (REINFORCE++-baseline)
  --loss-aggregation        token: the mean over every response token of the batch (DAPO; the default),
                            sequence: the mean of per-response token means (the GRPO paper),
                            constant: the sum divided by responses x --response-length (Dr. GRPO)
  --kl-in reward|loss       the KL penalty subtracted from the score before the baseline (RLOO, REINFORCE++; k1: it
                            follows the gradient of KL(pi || ref)) or added as a loss term at every token (GRPO; k3:
                            it follows that of KL(ref || pi)); docs/grpo.md shows both
  --importance-sampling-level sequence   GSPO (Zheng et al. 2025): one ratio per response, clipped as a whole
  --policy-loss cispo       CISPO (MiniMax-M1 2025): REINFORCE weighted by the capped ratio, no token's gradient lost
  --delta, --top-entropy-quantile, --kl-bias-correction, --tis-cap: two-sided clipping, the gradient on the most
                            uncertain tokens only, the importance-weighted KL, truncated importance sampling against
                            the sampler's own log-probs
Where this departs from the papers:
1. The KL penalty's default depends on the reward: 0.05 (k1, in the reward) against a learned reward model, which the
   policy can otherwise exploit; 0 against reward functions alone (a verifier), as TRL and verl default, and then no
   reference pass runs in training. The SFT model is still loaded for evaluation (--no-eval-kl: not at all).
2. Every normaliser (token count, response count, the batch's std) is taken over the whole optimizer batch: across
   micro-batches and processes, so gradient accumulation and torchrun change no number.
3. A group whose rewards are all equal has advantage exactly 0 (no std of 0 divided, no rounding residue).
4. Sampling is the stages' own (softmax at --temperature, nothing from the model's generation config); a response ends
   at the chat template's end token.
5. The entropy mask is taken once per rollout over every process's loss tokens (TRL's, per micro-batch).
"""

import math
import signal
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal, NamedTuple

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C while torch loads: one line, no traceback

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import Rollout, end_token_id, rollout_with_tools, setup_tokenizer
from plumbing import (TASK_DATA, Clock, Metrics, StopSignals, WithoutAdapters, add_lora, all_gather_1d, all_reduce,
                      batch_indices, check_room, cli, clip_gradients, decay_groups, default_learning_rate,
                      disable_dropout, distribute, evaluate_policy, exact_div, generate, layout, load_prompts, load_tools,
                      load_reward_fns, load_reward_models, load_state, packing_works, parts_to_log, prepare_output,
                      resume_point, reward_model_paths, save_model, score_responses, setup, sharing_works, tool_metrics,
                      stop_if_not_finite, sync_gradients, user_errors_in_one_line)


@dataclass
class Args:
    # experiment
    exp_name: str = "grpo"
    """the name of this experiment, used in the run name"""
    seed: int = 1
    """seed of the experiment: same seed, same CPU run"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "rlhf"
    """the Weights & Biases project"""
    output_dir: str = "models/grpo"
    """where the policy is saved"""
    resume: bool = True
    """continue from `{output_dir}/checkpoint` if an interrupted run left one"""
    save_steps: int = 20
    """write a resumable checkpoint every this many iterations"""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:N', or 'auto' (cuda if available); under torchrun each process takes cuda:LOCAL_RANK"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: 'ddp' keeps a full copy of each model per process; 'fsdp' (FSDP2) shards them (and the policy's
    gradients and optimizer state) across the processes"""
    bf16: bool = False
    """bfloat16 mixed precision: the policy in fp32 with its AdamW state, bf16 compute (autocast; FSDP2's
    MixedPrecisionPolicy under --strategy fsdp), gradients reduced in fp32; the frozen models held in bf16"""
    gradient_checkpointing: bool = False
    """recompute the policy's activations in backward (non-reentrant): less memory, more compute"""

    # models & data
    sft_model_path: str = "models/sft"
    """the SFT model: the policy's start, and the KL reference"""
    reward_model_path: tuple[str, ...] = ("auto",)
    """the frozen reward model(s), read exactly as ppo_rlhf.py reads them (any sequence classifier; several form an
    ensemble, --ensemble-k); 'auto': models/reward_model, or none when --reward-fn is given alone; 'none': no reward
    model"""
    ensemble_k: float = 0.0
    """with several reward models the score is mean - ensemble_k * std over the members, per response"""
    reward_fn: tuple[str, ...] = ()
    """'file.py:function' terms added to the reward model's score (the whole score without one), each times its
    --reward-fn-weights entry; called as fn(prompt, response, **fields) with the prompt record's other fields (an
    `answer`) that the function names, or fn(prompt, response)"""
    reward_fn_weights: tuple[float, ...] = ()
    """one weight per --reward-fn term (default 1 each)"""
    reward_fn_timeout: float = 60.0
    """in seconds: a reward function (or the judge) still running on one response after this scores it None (counted,
    with a warning), so a hang cannot stall the run; 0: no limit"""
    tools: tuple[str, ...] = ()
    """'file.py:function' tools the policy may call mid-response (Hermes format: <tool_call>{"name": ..., "arguments":
    {...}}</tool_call>, then its end token); plain functions with type hints and a docstring whose schema reaches the
    prompt through the chat template. They run in this process: no sandbox (docs/tools.md)"""
    max_tool_calls: int = 1
    """tool calls per response; a later call is not run and the response ends there"""
    max_tool_output_tokens: int = 64
    """a tool's result is cut to this many tokens (counted: tools/cut)"""
    tool_timeout: float = 10.0
    """in seconds: a call still running after this becomes the error the model reads (counted: tools/timeouts)"""
    reward_label_index: int | None = None
    """for a reward model with several outputs (a sentiment classifier's labels), the one that is the reward"""
    reward_transform: Literal["none", "logsigmoid"] = "none"
    """applied to the reward model's output: 'logsigmoid' turns a classifier's logit into log P(label)"""
    eval_reward_fn: str = "auto"
    """a judge fn(prompt, response, **fields) -> float used only for evaluation; 'auto': the embedded task's gold judge
    (reviews_task.py:gold_score) on its own prompts, none on yours; '' to skip"""
    trust_remote_code: bool = False
    """allow a Hub model to run its own code (only for models you trust)"""
    dataset: str = f"{TASK_DATA}/prompts_train.jsonl"
    """prompts (prompt-only, or any format with a prompt; other fields reach reward functions):
    a JSONL, JSON, Parquet or CSV file, a `save_to_disk` folder or a Hub dataset id (docs/details.md#data-sources)"""
    eval_dataset: str = "auto"
    """held-out prompts for evaluation, or 'none'. 'auto': for the embedded task's prompts its held-out ones; for yours
    the --eval-split of --dataset if given, else none (evaluation then samples training prompts)"""
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
    num_iterations: int = 70
    """rollout + update iterations"""
    rollout_batch_size: int = 16
    """prompts per iteration, per process (reduced to fit a smaller prompt file); each is answered num_generations
    times"""
    num_generations: int = 8
    """G: responses sampled per prompt, the group whose scores are each other's baseline (at least 2)"""
    response_length: int = 24
    """most tokens generated per response"""
    temperature: float = 0.7
    """sampling temperature; log-probs for the loss are taken from logits divided by it as well"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of a response that reaches response_length without its end token"""
    mask_truncated: bool = False
    """leave responses that reach response_length without their end token out of the loss (DAPO's overlong
    filtering); they still count in their group's baseline"""

    # algorithm
    advantage: Literal["grpo", "rloo", "reinforce_pp"] = "grpo"
    """the baseline: 'grpo' the group mean (scaled by --scale-rewards); 'rloo' the mean of the other G - 1;
    'reinforce_pp' the group mean, then divided by the batch's std"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """with --advantage grpo: divide by the group's std (GRPO), the whole batch's (more robust to easy and hard
    prompts), or nothing (Dr. GRPO)"""
    loss_aggregation: Literal["token", "sequence", "constant"] = "token"
    """'token': sum over all response tokens / their number; 'sequence': mean over responses of each one's token mean;
    'constant': sum / (responses x response_length); each over the whole optimizer batch"""
    cliprange: float = 0.2
    """epsilon: the ratio is clipped below at 1 - cliprange"""
    cliprange_high: float | None = None
    """the ratio's upper clip, 1 + cliprange_high (DAPO's clip-higher, e.g. 0.28); default: cliprange"""
    policy_loss: Literal["clip", "cispo"] = "clip"
    """'clip': PPO's clipped surrogate (GRPO, DAPO); 'cispo': REINFORCE weighted by the ratio capped at
    1 + cliprange_high, without its gradient (MiniMax-M1's CISPO: a capped token keeps its gradient)"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """'token': a ratio per token; 'sequence': GSPO's, one per response, the geometric mean of its token ratios,
    clipped as a whole (Zheng et al. 2025; steadier for mixture-of-experts models)"""
    delta: float | None = None
    """two-sided clipping: the unclipped ratio capped at delta (> 1 + cliprange_high), so a negative advantage's loss
    is bounded (INTELLECT-2; TRL's delta); None: off"""
    top_entropy_quantile: float = 1.0
    """q: the policy gradient only on the loss tokens whose entropy at rollout is in the top q of the batch (Wang et al.
    2025, "Beyond the 80/20 rule": q = 0.2); 1: every token"""
    kl_bias_correction: bool = False
    """with --kl-in loss: the KL estimate weighted by the ratio pi / pi_old, unbiased when the update is off-policy
    (DeepSeek-V3.2; TRL's use_bias_correction_kl)"""
    tis_cap: float = 0.0
    """C > 0: truncated importance sampling against the sampler, each token's policy loss weighted by
    min(pi_old / pi_sampler, C), pi_sampler the log-probs generation drew with (Yao et al. 2025); 0: off"""
    num_updates_per_batch: int = 1
    """mu: passes over each rollout batch; 1, with --num-mini-batches 1, is on-policy: the ratio is 1 and no
    old-log-prob pass runs"""
    num_mini_batches: int = 4
    """minibatches per pass, one optimizer step each (after the first, the policy has moved: the old log-probs then
    come from a pass at rollout)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch"""
    kl_coef: float | None = None
    """beta: weight of the KL penalty to the SFT model; default 0.05 with a reward model (a learned reward can be
    gamed, and the penalty holds the policy near the SFT model, as PPO's does), 0 with reward functions alone (a
    verifier cannot be flattered; no reference pass then runs in training)"""
    kl_in: Literal["loss", "reward"] = "reward"
    """'reward': kl_coef * the response's summed KL estimate subtracted from its score before the baseline (RLOO,
    REINFORCE++; with k1 its expected gradient is that of KL(pi || ref), tested); 'loss': kl_coef * the KL estimate
    added at every token of the loss (GRPO's paper; with k3 it follows the gradient of KL(ref || pi) instead)"""
    kl_estimator: Literal["auto", "k1", "k3"] = "auto"
    """per token, from tokens sampled by the policy: 'k1' log pi - log pi_ref; 'k3' (r - 1) - log r, r = pi_ref / pi
    (>= 0); 'auto': k1 in the reward, k3 in the loss (k1 in the loss has zero expected gradient); both are logged"""
    eval_kl: bool = True
    """load the SFT model for evaluation even with kl_coef 0: held-out KL and the win rate against it"""
    lora_r: int = 0
    """LoRA: train rank-r adapters on the decoder's linear layers instead of every weight (`pip install peft`); 0: off"""
    lora_alpha: float = 32.0
    """LoRA: the adapters' product is scaled by lora_alpha / lora_r"""
    lora_target_modules: str = "all-linear"
    """LoRA: the layers to adapt, by name ('q_proj,v_proj'), or 'all-linear' (every linear layer of the decoder)"""
    learning_rate: float | None = None
    """AdamW learning rate, decayed linearly to 0; default 1e-4 for the embedded tiny model, 1e-6 otherwise; 10x either
    with LoRA"""
    weight_decay: float = 0.0
    """AdamW weight decay (not of biases and norm weights)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    padding_free: bool = True
    """pack query+response sequences without padding in every forward pass (checked at start; falls back to
    padding for a model that lets packed sequences attend to each other)"""
    share_prompt: bool = True
    """compute each group's prompt once, not G times: one prefill copied to the G responses in sampling, and in every
    forward (policy, reference, reward model) the prompt followed by its responses, each attending to it alone. The
    same numbers to float rounding; forwards share only with padding-free packing and a model that honours the mask
    (SDPA attention; checked at start)"""

    # evaluation
    eval_steps: int = 20
    """evaluate on held-out prompts every this many iterations (and at the end)"""
    num_eval_prompts: int = 128
    """held-out prompts per evaluation, one response each (0: no evaluation)"""
    eval_pass_k: int = 0
    """with a verifier as --eval-reward-fn (1 = right): held-out greedy accuracy (eval/pass@1_greedy) at every
    evaluation and, at the first and the last, pass@1 and pass@k from k sampled responses per prompt; 0: off"""
    num_sample_rows: int = 4
    """sample responses printed and logged per evaluation"""


def group_advantages(scores: torch.Tensor, num_generations: int, advantage: str, scale_rewards: str) -> torch.Tensor:
    """(B,) scores of B = P x G responses, each prompt's G in a consecutive run -> (B,) advantages, one per response
    (every token of the response gets it). A group whose scores are all equal gets exactly 0. The batch statistics
    ('batch' scaling, REINFORCE++) are those of every process's batch, as on one device."""
    grouped = scores.view(-1, num_generations)  # (P, G)
    if advantage == "rloo":  # the mean of the other G - 1: r_i - (sum - r_i) / (G - 1)
        advantages = grouped - (grouped.sum(1, keepdim=True) - grouped) / (num_generations - 1)
    else:
        advantages = grouped - grouped.mean(1, keepdim=True)
    if advantage == "grpo" and scale_rewards == "group":
        advantages = advantages / (grouped.std(1, keepdim=True) + 1e-4)  # the sample std, as the GRPO paper's
    elif (advantage == "grpo" and scale_rewards == "batch") or advantage == "reinforce_pp":
        values = scores if advantage == "grpo" else advantages.flatten()  # REINFORCE++: the centred scores'
        # two passes over every process's values, the mean first: E[x^2] - mean^2 in float32 cancels catastrophically
        # when the scores sit far from 0 against their spread (0.7 + 1e-3 n)
        total = all_reduce(torch.stack([values.sum(), torch.tensor(values.numel(), device=values.device,
                                                                   dtype=values.dtype)]))
        mean = total[0] / total[1]
        std = (all_reduce(((values - mean) ** 2).sum()) / (total[1] - 1).clamp(min=1)).sqrt()  # with n - 1
        advantages = advantages / (std + 1e-4)  # centred scores have mean 0 per group: only divided
    equal = grouped.max(1, keepdim=True).values == grouped.min(1, keepdim=True).values  # (P, 1)
    return torch.where(equal, 0.0, advantages).flatten()


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (Schulman 2020, "Approximating KL divergence"):
    k1 = log pi - log pi_ref (unbiased; negative on some tokens), k3 = (r - 1) - log r with r = pi_ref / pi (unbiased as
    a value, never negative). As a loss term their gradients differ: docs/grpo.md."""
    logr = ref_logprobs - logprobs
    return -logr if estimator == "k1" else torch.exp(logr) - 1 - logr


def importance_ratio(new_logprobs, old_logprobs, loss_mask, level: str) -> torch.Tensor:
    """(B, T) log-probs of the current and the rollout's policy -> (B, T) ratio pi / pi_old: per token ('token'), or
    per response ('sequence', GSPO): exp of the mean log-ratio over its loss tokens, the same at each of them."""
    log_ratio = new_logprobs - old_logprobs
    if level == "sequence":
        log_ratio = ((log_ratio * loss_mask).sum(1, keepdim=True) / loss_mask.sum(1, keepdim=True).clamp(min=1)
                     ).expand_as(log_ratio)
    return torch.exp(log_ratio)


def clipped_surrogate(ratio, advantages, cliprange: float, cliprange_high: float, delta: float | None = None):
    """PPO's clipped objective per token as a loss, with the upper clip apart (DAPO): -min(ratio * A, clip(ratio,
    1 - cliprange, 1 + cliprange_high) * A), A the (B,) response advantage at each of its tokens; with `delta`, the
    unclipped ratio capped at delta (two-sided clipping: a negative advantage's loss is bounded by -delta * A).

    Returns (per_token_loss, clipped_low, clipped_high), each (B, T); clipped_* mark tokens whose gradient the clip
    removes (ratio below 1 - cliprange with A < 0; above 1 + cliprange_high with A > 0, or above delta with A < 0).
    """
    adv = advantages[:, None]
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(capped * adv, torch.clamp(ratio, 1 - cliprange, 1 + cliprange_high) * adv)
    clipped_high = ((ratio > 1 + cliprange_high) & (adv > 0)) | ((ratio > (delta or float("inf"))) & (adv < 0))
    return per_token_loss, (ratio < 1 - cliprange) & (adv < 0), clipped_high


def cispo_loss(ratio, new_logprobs, advantages, cliprange_high: float):
    """CISPO (MiniMax-M1, 2025) per token: -sg(min(ratio, 1 + cliprange_high)) * A * log pi. The capped ratio only
    weighs the REINFORCE term, so unlike the clip no token loses its gradient; at ratio 1 it is the clip's gradient.
    Returns (per_token_loss, capped), each (B, T)."""
    weight = torch.clamp(ratio, max=1 + cliprange_high).detach()
    return -weight * advantages[:, None] * new_logprobs, ratio > 1 + cliprange_high


def truncated_importance_weights(old_logprobs, sampler_logprobs, cap: float) -> torch.Tensor:
    """(B, T) -> min(pi_old / pi_sampler, cap) per token (Yao et al. 2025): the trainer's log-probs of the tokens over
    the ones the sampler drew them with, which differ when the two compute differently (bf16, a KV cache, vLLM); the
    cap keeps a rare token's weight from blowing up the gradient's variance."""
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap)


def top_entropy_mask(entropy, loss_mask, quantile: float) -> torch.Tensor:
    """(B, T) entropies at rollout -> (B, T) float mask of the loss tokens whose entropy is in the top `quantile` of
    every process's loss tokens: the "forking" tokens where the policy is unsure (Wang et al. 2025)."""
    values = all_gather_1d(entropy[loss_mask.bool()].float())  # every process's loss tokens
    if values.numel() == 0:
        return torch.zeros_like(loss_mask)
    return ((entropy >= torch.quantile(values, 1 - quantile)) & loss_mask.bool()).float()


def loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """A micro-batch's share of the loss's numerator: the masked sum over tokens ('token', 'constant'), or the sum of
    per-response token means ('sequence'). Divided by `loss_normaliser` of the whole optimizer batch."""
    if aggregation == "sequence":
        return ((per_token_loss * loss_mask).sum(1) / loss_mask.sum(1).clamp(min=1)).sum()
    return (per_token_loss * loss_mask).sum()


def loss_normaliser(loss_mask: torch.Tensor, aggregation: str, response_length: int) -> torch.Tensor:
    """The divisor of an optimizer batch's loss, from its (B, T) loss mask, summed over processes: the tokens in the
    loss ('token'), the responses in the loss ('sequence'), or responses x response_length whatever their lengths
    ('constant': Dr. GRPO's constant, not the longest response of the batch)."""
    if aggregation == "token":
        count = loss_mask.sum()
    elif aggregation == "sequence":
        count = loss_mask.any(1).sum()
    else:
        count = torch.tensor(loss_mask.shape[0] * response_length, device=loss_mask.device)
    return all_reduce(count.float()).clamp(min=1)


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


def forward(policy, batch_layout, responses: torch.Tensor, temperature: float):
    """One pass over a `layout` of query+responses -> (B, T) logprobs and entropy (no gradient) of the `responses`."""
    inputs, (rows, cols), _ = batch_layout
    # The LM head only where a response token is predicted: its (R, L, H) input is gathered to (B, T, H) first. A hook,
    # not a call of the head, so what a model does to logits after it (Gemma 2's soft-capping) still happens.
    hook = policy.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0][rows, cols],))
    try:
        out = policy(**inputs, use_cache=False)
    finally:
        hook.remove()
    return logprobs_and_entropy(out.logits, responses, temperature, entropy_grad=False)  # out.logits (B, T, V)


class Episodes(NamedTuple):
    """A rollout batch as the update reads it."""
    rollout: Rollout
    loss_mask: torch.Tensor  # (B, T) float: the response tokens in the loss (--mask-truncated drops cut responses)
    advantages: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor | None  # (B, T) from the rollout's policy; None when on-policy (the ratio is then 1)
    ref_logprobs: torch.Tensor | None  # (B, T) the SFT model's; None without a KL term in the loss
    pg_weights: torch.Tensor | None = None  # (B, T) on each token's policy loss (entropy mask, TIS); None: 1


def backward_minibatch(policy_w, episodes: Episodes, mb: torch.Tensor, micro_batch_size: int, args: Args,
                       padding_free: bool, autocast, share_prompt: bool = False) -> dict:
    """Steps 8a-8c for one optimizer step: the loss of minibatch `mb` (indices into the batch), micro-batch by
    micro-batch, each backward adding its share of the gradient. A function rather than inline in the loop because the
    test of every aggregation under micro-batching and torchrun calls it. Returns per-micro-batch statistics."""
    batch = episodes.rollout
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    # 8a. the divisor of the whole minibatch (every micro-batch, every process): accumulation changes no number
    normaliser = loss_normaliser(episodes.loss_mask[mb], args.loss_aggregation, args.response_length)
    cliprange_high = args.cliprange if args.cliprange_high is None else args.cliprange_high
    stats = {k: [] for k in ("pg_loss", "kl_loss", "clip_low", "clip_high", "entropy", "ratio")}
    for start in range(0, len(mb), micro_batch_size):
        idx = mb[start: start + micro_batch_size]
        sync_gradients(policy_w, start + micro_batch_size >= len(mb))  # reduce across processes in the last backward
        loss_mask = episodes.loss_mask[idx]
        batch_layout = layout(batch.query_responses[idx], batch.attention_mask[idx], batch.context_length, padding_free,
                              share_prompt)  # the micro-batch's repeated prompts once each (`shared_prompt_layout`)
        with autocast():
            new_logprobs, entropy = policy_w(forward, batch_layout, batch.responses[idx], args.temperature)
        # 8b. the policy loss per token; on-policy the old log-probs are the new ones, detached: ratio 1
        old_logprobs = new_logprobs.detach() if episodes.old_logprobs is None else episodes.old_logprobs[idx]
        ratio = importance_ratio(new_logprobs, old_logprobs, loss_mask, args.importance_sampling_level)  # (b, T)
        if args.policy_loss == "cispo":
            per_token_loss, clip_high = cispo_loss(ratio, new_logprobs, episodes.advantages[idx], cliprange_high)
            clip_low = torch.zeros_like(clip_high)
        else:
            per_token_loss, clip_low, clip_high = clipped_surrogate(ratio, episodes.advantages[idx], args.cliprange,
                                                                    cliprange_high, args.delta)
        if episodes.pg_weights is not None:  # the entropy mask, truncated importance weights against the sampler
            per_token_loss = per_token_loss * episodes.pg_weights[idx]
        kl_loss = torch.zeros((), device=new_logprobs.device)
        if episodes.ref_logprobs is not None:  # --kl-in loss: kl_coef * the KL estimate at every token
            kl = kl_penalty(new_logprobs, episodes.ref_logprobs[idx], args.kl_estimator)
            if args.kl_bias_correction:  # the tokens were sampled from pi_old: importance-weighted, it estimates KL(pi)
                kl = kl * ratio
            per_token_loss = per_token_loss + args.kl_coef * kl
            kl_loss = loss_sum(kl, loss_mask, args.loss_aggregation).detach() / normaliser
        # 8c. this micro-batch's share: DDP and FSDP2 average gradients over processes, so world_size undoes the 1/N
        loss = loss_sum(per_token_loss, loss_mask, args.loss_aggregation) / normaliser
        (loss * world_size).backward()
        stats["pg_loss"].append(loss.detach() - args.kl_coef * kl_loss)
        stats["kl_loss"].append(kl_loss)
        stats["clip_low"].append((clip_low * loss_mask).sum())
        stats["clip_high"].append((clip_high * loss_mask).sum())
        stats["entropy"].append((entropy * loss_mask).sum())
        stats["ratio"].append(ratio.detach()[loss_mask.bool()])
    return stats


class Models(NamedTuple):
    """What `load_models` returns."""
    policy: torch.nn.Module
    policy_w: torch.nn.Module  # policy_w(fn, x, ...) = fn(policy, x, ...), under torchrun DDP or FSDP2
    ref_w: object  # ref_w(fn, x, ...) = fn(reference, x, ...); None when nothing needs the reference
    reward_ws: list  # (reward model wrapper, its tokenizer, whether it is the policy's tokenizer) per reward model
    padding_free: bool
    share_prompt: bool  # the forwards compute a repeated prompt once


def load_models(args, tokenizer, trained: dict, frozen: dict, device, reward_paths: tuple, resume_dir: str) -> Models:
    """The policy (`resume_dir`: an interrupted run's checkpoint to continue from), the reward models, and the SFT model
    as the reference when a KL term or the evaluation needs it (with LoRA, the policy with its adapters off); dropout
    off in all of them (the same log-probs in rollout and update), the frozen ones in eval mode, each wrapped for
    torchrun: every pass runs as a wrapper's forward, policy_w(fn, x, ...) computing fn(policy, x, ...) (`Parallel`, in
    plumbing.py: DDP syncs gradients and FSDP2 gathers parameters only around the wrapper's forward)."""
    policy = AutoModelForCausalLM.from_pretrained(resume_dir if resume_dir and not args.lora_r else args.sft_model_path,
                                                  **trained).to(device)
    setup_tokenizer(tokenizer, policy)
    with_reference = args.kl_coef > 0 or (args.eval_kl and args.num_eval_prompts > 0)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.sft_model_path, **frozen).to(device) if (
        with_reference and not args.lora_r) else None  # LoRA: the policy with its adapters off
    if ref_policy is not None:
        setup_tokenizer(tokenizer, ref_policy)  # its embeddings grown by a pad token as the policy's were
    if args.kl_coef > 0:
        print(f"KL penalty: {args.kl_coef:g} x {args.kl_estimator} in the {args.kl_in} (--kl-coef 0: none)")
    else:
        print("kl_coef 0: no KL penalty and no reference pass in training; " + (
            "the SFT model is loaded for evaluation only (KL and win rate against it; --no-eval-kl: not loaded)"
            if with_reference else "the SFT model is not loaded"))
    check_room(args.output_dir, policy)
    if args.lora_r:
        add_lora(policy, args.lora_r, args.lora_alpha, args.lora_target_modules, args.sft_model_path,
                 resume_dir=resume_dir)
        if with_reference:
            print("LoRA: the reference is the policy with its adapters off, no second copy of the weights")
    reward_members, _ = load_reward_models(reward_paths, tokenizer, policy, args, frozen, device)
    reward_models = [m for m, _, _ in reward_members]
    for model in (policy, ref_policy, *reward_models):
        if model is not None and hasattr(model, "config"):
            disable_dropout(model)
    for model in (ref_policy, *reward_models):
        if model is not None:
            model.eval().requires_grad_(False)
    packed = [policy] + [m for m, _, same in reward_members if same]
    padding_free = args.padding_free and all(packing_works(m) for m in packed)
    if args.padding_free and not padding_free:
        print("warning: a model lets packed sequences attend to each other; padding instead (--no-padding-free)")
    longest = args.max_prompt_length + args.response_length + 8  # + 8: room for a reward model's score suffix
    share_prompt = args.share_prompt and padding_free and all(sharing_works(m, longest) for m in packed)
    if args.share_prompt and not share_prompt:
        print("prompt sharing: in sampling only; the forwards compute each response's prompt with it (" + (
            "a model ignores the shared-prompt attention mask or has a sliding window: see plumbing.sharing_works"
            if padding_free else "it needs padding-free packing") + ")")
    if args.gradient_checkpointing and hasattr(policy, "activation_checkpointing_enable"):
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy_w = distribute([policy], args.strategy, args.bf16)
    ref_w = None if not with_reference else WithoutAdapters(policy_w, policy) if args.lora_r else distribute(
        [ref_policy], args.strategy, args.bf16, trainable=False)
    reward_ws = [(distribute([m], args.strategy, args.bf16, trainable=False), tok, same) for m, tok, same in reward_members]
    policy_w.train()
    return Models(policy, policy_w, ref_w, reward_ws, padding_free, share_prompt)


def main(args: Args) -> None:
    if args.num_generations < 2:
        raise SystemExit(f"--num-generations {args.num_generations}: a group needs at least 2 responses to be its own "
                         "baseline")
    cliprange_high = args.cliprange if args.cliprange_high is None else args.cliprange_high
    for bad, why in [(args.delta is not None and args.delta <= 1 + cliprange_high, "--delta must exceed 1 + "
                      "cliprange_high (it caps the unclipped ratio beyond the clip)"),
                     (args.delta is not None and args.policy_loss == "cispo", "--delta is for --policy-loss clip"),
                     (not 0 < args.top_entropy_quantile <= 1, "--top-entropy-quantile must be in (0, 1]"),
                     (args.tis_cap < 0, "--tis-cap must be > 0, or 0 for off")]:
        if bad:
            raise SystemExit(f"error: {why}")
    rank, world_size, device, run_name, autocast, trained, frozen = setup(args)  # torchrun, seeds, --bf16's autocast
    reward_paths = reward_model_paths(args)  # 'auto': models/reward_model, unless reward functions are given alone
    # kl_coef 'auto': a penalty against a learned reward model, none for reward functions alone
    args = replace(args, kl_coef=(0.05 if reward_paths else 0.0) if args.kl_coef is None else
                               args.kl_coef, kl_estimator={"reward": "k1", "loss": "k3"}[args.kl_in]
                               if args.kl_estimator == "auto" else args.kl_estimator)
    if args.kl_bias_correction and not (args.kl_coef > 0 and args.kl_in == "loss"):
        raise SystemExit("error: --kl-bias-correction weights the KL term of the loss: give --kl-in loss and a kl_coef")
    reward_fns = load_reward_fns(args)  # (name, fn, weight) per --reward-fn
    _, eval_dataset, eval_reward_fn = prepare_output(args, rank, world_size, "prompts_train.jsonl", "prompts_eval.jsonl")

    # 1. the prompts (ids, left-padded per batch for generation), read and checked before any model loads
    tokenizer = AutoTokenizer.from_pretrained(args.sft_model_path, trust_remote_code=args.trust_remote_code)
    if args.tools and tokenizer.chat_template is None:
        raise SystemExit("error: --tools needs a model with a chat template: it renders the tool's turn")
    tools = load_tools(args.tools, tokenizer)  # {name: function}, their schemas in the prompts where the template shows them
    train_records, train_prompts, eval_records, eval_prompts = load_prompts(args, tokenizer, eval_dataset,
                                                                            eval_reward_fn, reward_fns,
                                                                            list(tools.values()) or None)

    # 2. models: the policy, the reward model(s) and/or reward functions, and the SFT model as the reference when a KL
    #    term or the evaluation needs it
    ckpt_dir, resuming = resume_point(args)  # the checkpoint checked before anything loads from it
    kl_in_loss = args.kl_coef > 0 and args.kl_in == "loss"
    kl_in_reward = args.kl_coef > 0 and args.kl_in == "reward"
    policy, policy_w, ref_w, reward_ws, padding_free, share_prompt = load_models(
        args, tokenizer, trained, frozen, device, reward_paths, ckpt_dir if resuming else "")
    learning_rate = default_learning_rate(args, policy, tiny=1e-4, pretrained=1e-6)

    # how the batch of responses splits
    G = args.num_generations
    unit = args.num_mini_batches * args.gradient_accumulation_steps  # the batch's responses split into micro-batches
    rollout_batch_size = args.rollout_batch_size  # prompts per process per iteration
    if len(train_prompts) < rollout_batch_size * world_size:
        rollout_batch_size = len(train_prompts) // world_size
        print(f"only {len(train_prompts)} prompts: --rollout-batch-size {args.rollout_batch_size} -> {rollout_batch_size}")
        if rollout_batch_size == 0:
            raise SystemExit(f"{args.dataset}: {len(train_prompts)} prompts for {world_size} processes")
    batch_size = rollout_batch_size * G  # responses per process per iteration
    mini_batch_size = exact_div(batch_size, args.num_mini_batches, "rollout_batch_size * num_generations / "
                                "num_mini_batches")
    micro_batch_size = exact_div(mini_batch_size, args.gradient_accumulation_steps,  # responses per forward/backward
                                 "responses per minibatch / gradient_accumulation_steps")
    print(f"global batch: {rollout_batch_size} prompts x {G} responses x {world_size} process(es) = "
          f"{batch_size * world_size} responses per iteration, {args.num_mini_batches * args.num_updates_per_batch} "
          f"optimizer step(s) on them (micro-batches of {micro_batch_size}, {unit} per pass)")

    # 3. AdamW (no decay of biases and norm weights), learning rate decayed linearly to 0
    optimizer = torch.optim.AdamW(decay_groups(policy_w, args.weight_decay), lr=learning_rate, eps=1e-5,
                                  fused=device.type in ("cpu", "cuda"))
    params = list(policy_w.parameters())
    num_updates = args.num_iterations * args.num_updates_per_batch * args.num_mini_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / num_updates)
    start_iteration = 0
    if resuming:
        state = load_state(ckpt_dir, policy_w, optimizer)  # also restores the optimizer and the random generators
        scheduler.load_state_dict(state["scheduler"])
        start_iteration, run_name = state["iteration"], state["run_name"]
        print(f"resuming {ckpt_dir} at iteration {start_iteration}")
    elif world_size > 1:
        torch.manual_seed(args.seed + rank)  # every process samples its own (models are built: they had to match)
    # the flags as this run resolved them: args.json beside the model, the logs' config
    config = vars(args) | {"run_name": run_name, "reward_model_path": reward_paths,
                           "reward_fn_weights": tuple(w for _, _, w in reward_fns), "eval_dataset": eval_dataset,
                           "eval_reward_fn": eval_reward_fn, "learning_rate": learning_rate, "padding_free": padding_free,
                           "rollout_batch_size": rollout_batch_size, "shared_prompt_forwards": share_prompt}
    metrics = Metrics(f"runs/{run_name}", config, args.track, args.wandb_project,
                      state | {"step": start_iteration} if resuming else None)
    # the rollout policy's log-probs (and entropies) from a pass of their own; else the update is on-policy: ratio 1
    old_pass = (args.num_updates_per_batch > 1 or args.num_mini_batches > 1 or kl_in_reward
                or args.top_entropy_quantile < 1 or args.tis_cap > 0)
    # with tools, a turn that calls one goes on after the tool's result (`common.rollout_with_tools`)
    tool_rollout = tools and partial(rollout_with_tools, tokenizer=tokenizer, tools=tools,
                                     max_tool_calls=args.max_tool_calls, timeout=args.tool_timeout,
                                     max_tool_output_tokens=args.max_tool_output_tokens)
    generate_batch = partial(generate, response_length=args.response_length, temperature=args.temperature,
                             end_id=end_token_id(tokenizer), pad_id=tokenizer.pad_token_id, autocast=autocast,
                             share_prompt=args.share_prompt, tools=tool_rollout)  # share: `common.prefill_once`
    score = partial(score_responses, tokenizer=tokenizer, reward_ws=reward_ws, reward_fns=reward_fns, args=args,
                    padding_free=padding_free, autocast=autocast, share_prompt=share_prompt)  # (B,) scores, parts

    def logprobs_of(model_w, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) log-probs and entropies of a rollout's responses under a model, in micro-batches of the training size
        (so that the first minibatch of the update reproduces the policy's exactly)."""
        chunks = []
        for k in range(0, len(batch.responses), micro_batch_size):
            chunk = slice(k, k + micro_batch_size)
            batch_layout = layout(batch.query_responses[chunk], batch.attention_mask[chunk], batch.context_length,
                                  padding_free, share_prompt)
            with autocast():
                chunks.append(model_w(forward, batch_layout, batch.responses[chunk], args.temperature))
        return tuple(torch.cat(c) for c in zip(*chunks))

    def eval_kl(batch):  # (B,) KL of each held-out response to the SFT model, summed over the response
        return None if ref_w is None else ((logprobs_of(policy_w, batch)[0] - logprobs_of(ref_w, batch)[0])
                                           * batch.actions()).sum(1)
    evaluate = partial(evaluate_policy, policy_w=policy_w, ref_w=ref_w, records=eval_records, prompts=eval_prompts,
                       generate=generate_batch, score=score, kl=eval_kl, tokenizer=tokenizer,
                       eval_reward_fn=eval_reward_fn, pass_k=args.eval_pass_k, metrics=metrics,
                       num_sample_rows=args.num_sample_rows, timeout=args.reward_fn_timeout)  # evaluate(iteration, final)

    if start_iteration == 0:
        evaluate(0)
    progress = tqdm(range(start_iteration, args.num_iterations), initial=start_iteration, total=args.num_iterations,
                    desc="grpo", disable=rank != 0 or None)  # None: on in a terminal, off in a log file
    signals = StopSignals()  # SIGTERM, Ctrl-C: a checkpoint at the end of the iteration, then exit
    clock = Clock(start_iteration, args.num_iterations)
    for iteration in progress:
        t0 = time.time()
        # 4. rollout: G responses to each prompt from the current policy, each prompt's G in a consecutive run
        idx = [i for i in batch_indices(iteration, len(train_prompts), rollout_batch_size, args.seed, rank, world_size)
               for _ in range(G)]
        records, prompts = [train_records[i] for i in idx], [train_prompts[i] for i in idx]
        policy_w.eval()
        batch = generate_batch(policy_w, prompts, with_logprobs=old_pass)  # the sampler's log-probs, to compare
        # (B, T), 1 on the tokens the policy sampled: with tools, a tool's turn is context, never in a loss, KL or count
        response_mask = batch.actions().float()
        t_generate = time.time() - t0

        # 5. scores; log-probs of the sampled tokens under the rollout's policy (when the update needs them) and the
        #    SFT model (when a KL term does)
        with torch.no_grad():
            scores, score_parts = score(batch, records)  # (B,)
            raw_scores = scores.clone()
            scores = scores - args.missing_eos_penalty * (~batch.has_eos).float()
            t_score = time.time() - t0 - t_generate
            old_logprobs, old_entropy = logprobs_of(policy_w, batch) if old_pass else (None, None)  # (B, T) each
            ref_logprobs = logprobs_of(ref_w, batch)[0] if args.kl_coef > 0 else None  # (B, T)
            kl_k1 = kl_k3 = None
            if ref_logprobs is not None:  # each (B,) summed over the response
                logprobs = old_logprobs if old_logprobs is not None else logprobs_of(policy_w, batch)[0]
                kl_k1 = (kl_penalty(logprobs, ref_logprobs, "k1") * response_mask).sum(1)
                kl_k3 = (kl_penalty(logprobs, ref_logprobs, "k3") * response_mask).sum(1)
            if kl_in_reward:  # 6a. the KL in the reward: the response's summed estimate, before the baseline
                scores = scores - args.kl_coef * (kl_k1 if args.kl_estimator == "k1" else kl_k3)

            # 6. advantages: each response's score against its group's
            advantages = group_advantages(scores, G, args.advantage, args.scale_rewards)  # (B,)
            loss_mask = response_mask * (batch.has_eos | (not args.mask_truncated)).float()[:, None]  # (B, T)

            # 6b. weights on each token's policy loss: only the high-entropy tokens; the sampler's bias truncated
            pg_weights = torch.ones_like(loss_mask)
            if args.top_entropy_quantile < 1:
                pg_weights = pg_weights * top_entropy_mask(old_entropy, loss_mask, args.top_entropy_quantile)
            if args.tis_cap > 0:  # min(pi_old / pi_sampler, C): what generation computed is off from the trainer's
                pg_weights = pg_weights * truncated_importance_weights(old_logprobs, batch.sampler_logprobs, args.tis_cap)
        episodes = Episodes(batch, loss_mask, advantages, old_logprobs, ref_logprobs if kl_in_loss else None,
                            pg_weights if args.top_entropy_quantile < 1 or args.tis_cap > 0 else None)
        t_logprobs = time.time() - t0 - t_generate - t_score  # the old-log-prob and reference passes

        # 7. update: num_updates_per_batch passes over minibatches, one optimizer step each (`backward_minibatch`);
        #    under torchrun each process updates on its own groups and DDP/FSDP2 combine the gradients
        policy_w.train()
        stats, grad_norms = [], []
        for epoch in range(args.num_updates_per_batch):
            order = torch.randperm(batch_size, device=device) if epoch > 0 else torch.arange(batch_size, device=device)
            for start in range(0, batch_size, mini_batch_size):
                stats.append(backward_minibatch(policy_w, episodes, order[start: start + mini_batch_size],
                                                micro_batch_size, args, padding_free, autocast, share_prompt))
                grad_norms.append(clip_gradients(params, args.max_grad_norm))  # the norm before clipping
                stop_if_not_finite(iteration + 1, args.output_dir, grad_norm=grad_norms[-1].item())
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        t_update = time.time() - t0 - t_generate - t_score - t_logprobs

        # 8. log: token shares over every process's loss tokens; other figures the mean over processes
        def total(key):
            return all_reduce(torch.stack([torch.stack(s[key]).sum() for s in stats]).sum())
        loss_tokens = all_reduce(loss_mask.sum()).clamp(min=1) * args.num_updates_per_batch
        equal = scores.view(-1, G).max(1).values == scores.view(-1, G).min(1).values  # (P,)
        ratios = torch.cat([torch.cat(s["ratio"]) for s in stats])
        row = {
            "objective/scores": raw_scores.mean(), "objective/scores_std": raw_scores.std(),
            "objective/zero_std_groups": equal.float().mean(),
            "objective/advantages_mean": advantages.mean(), "objective/advantages_std": advantages.std(),
            "policy/clip_low": total("clip_low") / loss_tokens, "policy/clip_high": total("clip_high") / loss_tokens,
            "policy/entropy": total("entropy") / loss_tokens,
            "loss/policy": torch.stack([torch.stack(s["pg_loss"]).sum() for s in stats]).mean(),
            "loss/grad_norm": torch.stack(grad_norms).mean(),
            "val/response_length": response_mask.sum(1).mean(), "val/truncated": (~batch.has_eos).float().mean(),
            "val/ratio": ratios.mean() if ratios.numel() else 1.0,
            "charts/lr": scheduler.get_last_lr()[0], "charts/episodes": (iteration + 1) * batch_size * world_size,
            "time/generate": t_generate, "time/score": t_score, "time/logprobs": t_logprobs, "time/update": t_update,
        }
        if tools:  # calls, their failures by kind, tokens inserted, the score with and without a call
            row.update(tool_metrics(batch, raw_scores))
        if old_pass:  # the first minibatch's forward repeats the rollout's: any deviation is a bug (the largest logged)
            first_ratios = torch.cat(stats[0]["ratio"])
            row["val/first_ratio_max_dev"] = all_reduce((first_ratios - 1).abs().max() if first_ratios.numel() else
                                                        torch.zeros((), device=device), "max")
        if old_pass and batch.sampler_logprobs is not None:
            # the sampler's log-probs against the trainer's, same weights and tokens: 0 but for how each computed them
            gap = (old_logprobs - batch.sampler_logprobs).abs() * response_mask  # (bf16, a KV cache against packing)
            row["val/sampler_logprob_gap"] = all_reduce(gap.sum()) / all_reduce(response_mask.sum()).clamp(min=1)
            row["val/sampler_logprob_gap_max"] = all_reduce(gap.max(), "max")
        if args.tis_cap > 0:  # the share of loss tokens whose importance weight the cap truncated
            capped = (torch.exp(old_logprobs - batch.sampler_logprobs) > args.tis_cap).float() * loss_mask
            row["policy/tis_capped"] = all_reduce(capped.sum()) / all_reduce(loss_mask.sum()).clamp(min=1)
        if kl_k1 is not None:
            row.update({"objective/kl": kl_k1.mean(), "objective/kl_k3": kl_k3.mean()})
        if kl_in_loss:
            row["loss/kl"] = torch.stack([torch.stack(s["kl_loss"]).sum() for s in stats]).mean()
        row.update({f"objective/{k}": v.mean() for k, v in parts_to_log(score_parts).items()})
        row = dict(zip(row, all_reduce(torch.tensor([float(v) for v in row.values()], device=device), "mean").tolist()))
        metrics.log(iteration + 1, row)
        if not all(math.isfinite(v) for v in row.values()):
            raise SystemExit(f"non-finite metric at iteration {iteration + 1}: {row}")
        progress.set_postfix(score=f"{row['objective/scores']:.3f}", len=f"{row['val/response_length']:.1f}",
                             zero_std=f"{row['objective/zero_std_groups']:.2f}")
        if progress.disable:  # no progress bar (a log file): a line per iteration
            print(f"iteration {iteration + 1}/{args.num_iterations}: score {row['objective/scores']:.3f}  length "
                  f"{row['val/response_length']:.1f}  zero-std groups {row['objective/zero_std_groups']:.2f}"
                  + (f"  kl {row['objective/kl']:.2f}" if kl_k1 is not None else "") + f"  {clock(iteration + 1)}")
        if (iteration + 1) % args.eval_steps == 0 and iteration + 1 < args.num_iterations:  # the last: after the save
            evaluate(iteration + 1)  # before the checkpoint, which holds it: a stop asked for meanwhile waits no longer
        if signals.checkpoint_due(iteration + 1, args.num_iterations, args.save_steps, device):  # or asked to stop
            state = {"scheduler": scheduler.state_dict(), "iteration": iteration + 1, "run_name": run_name,
                     "log_bytes": metrics.position()}
            save_model(ckpt_dir, None, config, ("", policy), training=(state, policy_w, optimizer))
            signals.stop_if_asked(ckpt_dir, iteration + 1)
    signals.restore()
    progress.close()

    # 9. save first, so that nothing after it can cost the trained policy (it loads with AutoModelForCausalLM); then
    #    the final evaluation
    save_model(args.output_dir, tokenizer, config, ("", policy))
    print(f"saved to {args.output_dir}")
    evaluate(args.num_iterations, final=True)
    metrics.close()
    print(f"logs in runs/{run_name}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    with user_errors_in_one_line():
        main(cli(Args))  # the flags; on the CPU, glibc keeps freed memory (plumbing.cli)
