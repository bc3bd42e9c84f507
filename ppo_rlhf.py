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
   with other sequences (`plumbing.pack`); log-probs and values come back in the usual (B, T) layout.
"""

import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C while torch loads: one line, no traceback

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from common import end_token_id, last_token_index, setup_tokenizer
from plumbing import (TASK_DATA, Clock, Metrics, StopSignals, WithoutAdapters, add_lora, all_reduce, batch_indices,
                      check_room, cli, clip_gradients, decay_groups, default_learning_rate, disable_dropout, distribute,
                      evaluate_policy, exact_div, generate, layout, load_prompts, load_reward_fns, load_reward_models,
                      load_state, packing_works, parts_to_log, prepare_output, quiet_missing_head, require_stage,
                      resume_point, reward_model_paths, save_model, score_responses, setup, stop_if_not_finite,
                      sync_gradients, user_errors_in_one_line)


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
    reward_fn_timeout: float = 60.0
    """in seconds: a reward function (or the judge) still running on one response after this scores it None (counted,
    with a warning), so a hang cannot stall the run; 0: no limit"""
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


def load_value_model(args, policy, reward_model_path: str | None, trained: dict, device, resume_dir: str):
    """The value network: 'separate', a sequence classifier initialised from the reward model (from the SFT model
    when there is none that can seed it: `reward_model_path` None); 'shared', a ValueHead on the policy. `resume_dir`:
    the checkpoint of an interrupted run to continue from."""
    if args.value_model == "shared":
        value_net = ValueHead(policy.config.get_text_config().hidden_size).to(device)
        if resume_dir:
            value_net.load_state_dict(load_file(os.path.join(resume_dir, "value_head.safetensors")))
        return value_net
    value_base = reward_model_path or args.sft_model_path
    value_from = os.path.join(resume_dir, "value_model") if resume_dir and not args.lora_r else value_base
    with quiet_missing_head(value_from == args.sft_model_path):  # a new head is expected: no report of it
        value_net = AutoModelForSequenceClassification.from_pretrained(value_from, num_labels=1, **trained).to(device)
    value_net.train()
    if args.lora_r:  # its score head trained whole, beside the backbone's adapters
        add_lora(value_net, args.lora_r, args.lora_alpha, args.lora_target_modules, value_base, head="score",
                 resume_dir=os.path.join(resume_dir, "value_model") if resume_dir else "")
    return value_net


class Models(NamedTuple):
    """What `load_models` returns."""
    policy: torch.nn.Module
    value_net: torch.nn.Module  # a sequence classifier, or a ValueHead on the policy
    policy_w: torch.nn.Module  # policy_w(fn, x, ...) = fn(policy, value_net, x, ...), under torchrun DDP or FSDP2
    ref_w: object  # ref_w(fn, x, ...) = fn(reference, x, ...)
    reward_ws: list  # (reward model wrapper, its tokenizer, whether it is the policy's tokenizer) per reward model
    padding_free: bool


def load_models(args, tokenizer, trained: dict, frozen: dict, device, reward_paths: tuple, resume_dir: str) -> Models:
    """The four models (`resume_dir`: an interrupted run's checkpoint to continue from), dropout off in all of them
    (PPO needs identical log-probs in rollout and update: N+ details, #2), the frozen ones in eval mode, each wrapped
    for torchrun. Every pass runs as a wrapper's forward: policy_w(fn, x, ...) computes fn(policy, value_net, x, ...),
    ref_w(fn, x) fn(ref_policy, x). DDP syncs gradients and FSDP2 gathers parameters only around the forward of the
    module they wrap, and a pass calls parts of a model (`forward` puts the LM head at response positions only), so the
    pass is handed to the wrapper (`Parallel`, in plumbing.py). Without torchrun the wrappers only call fn; under it
    the frozen models are sharded too with --strategy fsdp, and replicated with ddp."""
    policy_from = args.init_policy_path or args.sft_model_path
    policy = AutoModelForCausalLM.from_pretrained(resume_dir if resume_dir and not args.lora_r else policy_from,
                                                  **trained).to(device)
    # LoRA on a policy that starts from the SFT model: the reference is the policy with its adapters off, no second copy
    shared_reference = args.lora_r > 0 and os.path.abspath(policy_from) == os.path.abspath(args.sft_model_path)
    ref_policy = None if shared_reference else AutoModelForCausalLM.from_pretrained(args.sft_model_path,
                                                                                   **frozen).to(device)
    for model in [m for m in (policy, ref_policy) if m is not None]:
        setup_tokenizer(tokenizer, model)
    check_room(args.output_dir, policy)
    if args.lora_r:
        add_lora(policy, args.lora_r, args.lora_alpha, args.lora_target_modules, policy_from, resume_dir=resume_dir)
        if shared_reference:
            print("LoRA: the reference is the policy with its adapters off, no second copy of the weights")
    reward_members, value_from_reward_model = load_reward_models(reward_paths, tokenizer, policy, args, frozen, device)
    value_net = load_value_model(args, policy, reward_paths[0] if value_from_reward_model else None, trained, device,
                                 resume_dir)
    if not resume_dir and reward_members and not value_from_reward_model and args.value_model == "separate":
        print("value model: from the SFT model, not the reward model (another tokenizer, width or label layout)")
    reward_models = [m for m, _, _ in reward_members]
    hf_models = [m for m in (policy, ref_policy, *reward_models, value_net) if isinstance(m, torch.nn.Module) and
                 hasattr(m, "config")]  # the Hugging Face models among the four
    for model in hf_models:
        disable_dropout(model)
    for model in [m for m in (ref_policy, *reward_models) if m is not None]:
        model.eval().requires_grad_(False)
    packed = [m for m in hf_models if m is not ref_policy and all(m is not r or same for r, _, same in reward_members)]
    padding_free = args.padding_free and all(packing_works(m) for m in packed)
    if args.padding_free and not padding_free:
        print("warning: a model lets packed sequences attend to each other; padding instead (--no-padding-free)")
    if args.gradient_checkpointing:
        for model in (policy, value_net):
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy_w = distribute([policy, value_net], args.strategy, args.bf16)
    ref_w = WithoutAdapters(policy_w, policy) if shared_reference else distribute([ref_policy], args.strategy,
                                                                                   args.bf16, trainable=False)
    reward_ws = [(distribute([m], args.strategy, args.bf16, trainable=False), tok, same) for m, tok, same in reward_members]
    policy_w.train()
    return Models(policy, value_net, policy_w, ref_w, reward_ws, padding_free)


def main(args: Args) -> None:
    if args.dual_clip != 0 and args.dual_clip <= 1:
        raise SystemExit(f"--dual-clip {args.dual_clip}: c must be > 1 (the bound -c * A must lie beyond the clipped "
                         "loss), or 0 to turn dual clipping off")
    rank, world_size, device, run_name, autocast, trained, frozen = setup(args)  # torchrun, seeds, --bf16's autocast
    reward_paths = reward_model_paths(args)  # 'auto': models/reward_model, unless reward functions are given alone
    if args.init_policy_path:
        require_stage(args.init_policy_path, "", "python ppo_rlhf.py", "--init-policy-path")
    reward_fns = load_reward_fns(args)  # (name, fn, weight) per --reward-fn
    _, eval_dataset, eval_reward_fn = prepare_output(args, rank, world_size, "prompts_train.jsonl", "prompts_eval.jsonl")

    # 1. the prompts (ids, left-padded per batch for generation), read and checked before any model loads
    tokenizer = AutoTokenizer.from_pretrained(args.sft_model_path, trust_remote_code=args.trust_remote_code)
    train_records, train_prompts, eval_records, eval_prompts = load_prompts(args, tokenizer, eval_dataset,
                                                                            eval_reward_fn, reward_fns)

    # 2. four models: the policy and the value network (trained), the reference and the reward model(s) (frozen)
    ckpt_dir, resuming = resume_point(args)  # the checkpoint checked before anything loads from it
    policy, value_net, policy_w, ref_w, reward_ws, padding_free = load_models(
        args, tokenizer, trained, frozen, device, reward_paths, ckpt_dir if resuming else "")
    learning_rate = default_learning_rate(args, policy, tiny=1e-4, pretrained=3e-6)

    # how the rollout batch splits
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
    config = vars(args) | {"run_name": run_name, "reward_model_path": reward_paths,
                           "reward_fn_weights": tuple(w for _, _, w in reward_fns), "eval_dataset": eval_dataset,
                           "eval_reward_fn": eval_reward_fn, "learning_rate": learning_rate, "padding_free": padding_free,
                           "rollout_batch_size": rollout_batch_size}
    metrics = Metrics(f"runs/{run_name}", config, args.track, args.wandb_project,
                      state | {"step": start_iteration} if resuming else None)
    value_saved_as = ("value_head.safetensors" if isinstance(value_net, ValueHead) else "value_model", value_net)

    generate_batch = partial(generate, response_length=args.response_length, temperature=args.temperature,
                             end_id=end_token_id(tokenizer), pad_id=tokenizer.pad_token_id, autocast=autocast)
    score = partial(score_responses, tokenizer=tokenizer, reward_ws=reward_ws, reward_fns=reward_fns, args=args,
                    padding_free=padding_free, autocast=autocast)  # (B,) scores and their parts

    def eval_kl(batch):
        """(B,) KL of each held-out response to the SFT policy: its log-ratio summed over the response."""
        batch_layout = layout(batch.query_responses, batch.attention_mask, batch.context_length, padding_free)
        with autocast():
            logprobs = policy_w(forward, batch_layout, batch.responses, args.temperature, with_values=False)[0]
            ref_logprobs = ref_w(reference_logprobs, batch_layout, batch.responses, args.temperature)
        return ((logprobs - ref_logprobs) * batch.response_mask).sum(1)
    evaluate = partial(evaluate_policy, policy_w=policy_w, ref_w=ref_w, records=eval_records, prompts=eval_prompts,
                       generate=generate_batch, score=score, kl=eval_kl, tokenizer=tokenizer,
                       eval_reward_fn=eval_reward_fn, pass_k=args.eval_pass_k, metrics=metrics,
                       num_sample_rows=args.num_sample_rows, timeout=args.reward_fn_timeout)  # evaluate(iteration, final)

    if start_iteration == 0:
        evaluate(0)
    progress = tqdm(range(start_iteration, args.num_iterations), initial=start_iteration, total=args.num_iterations,
                    desc="ppo", disable=rank != 0 or None)  # None: on in a terminal, off in a log file
    signals = StopSignals()  # SIGTERM, Ctrl-C: a checkpoint at the end of the iteration, then exit
    clock = Clock(start_iteration, args.num_iterations)
    for iteration in progress:
        t0 = time.time()
        # 4. rollout: sample responses from the current policy (pure sampling at --temperature)
        idx = batch_indices(iteration, len(train_prompts), rollout_batch_size, args.seed, rank, world_size)
        policy_w.eval()
        batch = generate_batch(policy_w, [train_prompts[i] for i in idx])
        query_responses, attention_mask, responses, has_eos = (batch.query_responses, batch.attention_mask,
                                                               batch.responses, batch.has_eos)
        response_mask = batch.response_mask.float()  # (B, T), 1 on valid tokens
        t_generate = time.time() - t0

        # 5. log-probs of the sampled tokens under policy and reference, values, and scores, in micro-batches
        #    of the training size so that the first PPO minibatch reproduces these numbers exactly
        with torch.no_grad():
            chunks, part_chunks = [], []
            for k in range(0, rollout_batch_size, micro_batch_size):
                mb_batch = batch.rows(slice(k, k + micro_batch_size))
                batch_layout = layout(mb_batch.query_responses, mb_batch.attention_mask, batch.context_length,
                                      padding_free)
                with autocast():
                    mb_logprobs, mb_entropy, mb_values = policy_w(forward, batch_layout, mb_batch.responses,
                                                                  args.temperature)
                    mb_ref_logprobs = ref_w(reference_logprobs, batch_layout, mb_batch.responses, args.temperature)
                mb_scores, mb_parts = score(mb_batch, [train_records[i] for i in idx[k: k + micro_batch_size]])
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
                stats["grad_norm"].append(clip_gradients(params, args.max_grad_norm))  # the norm before clipping
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
        row.update({f"objective/{k}": v.mean() for k, v in parts_to_log(score_parts).items()})
        row = dict(zip(row, all_reduce(torch.tensor([float(v) for v in row.values()], device=device), "mean").tolist()))
        metrics.log(iteration + 1, row)
        if not all(torch.isfinite(torch.as_tensor(v, dtype=torch.float)) for v in row.values()):
            raise SystemExit(f"non-finite metric at iteration {iteration + 1}: {row}")
        progress.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{mean_kl:.2f}",
                             len=f"{row['val/response_length']:.1f}", clip=f"{row['policy/clipfrac_avg']:.2f}")
        if progress.disable:  # no progress bar (a log file): a line per iteration
            print(f"iteration {iteration + 1}/{args.num_iterations}: score {row['objective/scores']:.3f}  kl {mean_kl:.2f}"
                  f"  length {row['val/response_length']:.1f}  clipfrac {row['policy/clipfrac_avg']:.2f}"
                  f"  {clock(iteration + 1)}")
        if (iteration + 1) % args.eval_steps == 0 and iteration + 1 < args.num_iterations:  # the last: after the save
            evaluate(iteration + 1)  # before the checkpoint, which holds it: a stop asked for meanwhile waits no longer
        if signals.checkpoint_due(iteration + 1, args.num_iterations, args.save_steps, device):  # or asked to stop
            state = {"scheduler": scheduler.state_dict(), "iteration": iteration + 1, "kl_coef": kl_coef,
                     "run_name": run_name, "log_bytes": metrics.position()}
            save_model(ckpt_dir, None, config, ("", policy), value_saved_as, training=(state, policy_w, optimizer))
            signals.stop_if_asked(ckpt_dir, iteration + 1)
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


if __name__ == "__main__":
    with user_errors_in_one_line():
        main(cli(Args))  # the flags; on the CPU, glibc keeps freed memory (plumbing.cli)
