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

import math
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C while torch loads: one line, no traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import encode_prompt, encode_response, end_token_id, pad, read_data, setup_tokenizer
from plumbing import (TASK_DATA, Clock, Metrics, StopSignals, WithoutAdapters, add_lora, all_reduce, batch_indices,
                      check_room, cli, clip_gradients, decay_groups, default_learning_rate, disable_dropout, distribute,
                      generate, load_function, load_state, pack, packing_works, prepare_output, require_stage,
                      resume_point, save_model, setup, stop_if_not_finite, sync_gradients, user_errors_in_one_line)


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
    """held-out preferences, for the implicit reward's accuracy, or 'none'. 'auto': for the embedded task's data its
    held-out file; for yours the --eval-split of --dataset if given, else none"""
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


def main(args: Args) -> None:
    if not 0 <= args.label_smoothing < 0.5 or (args.label_smoothing > 0 and args.loss_type != "sigmoid"):
        raise SystemExit("error: --label-smoothing must be in [0, 0.5), and is for --loss-type sigmoid only")
    rank, world_size, device, run_name, autocast, trained, frozen = setup(args)  # torchrun, seeds, --bf16's autocast
    require_stage(args.model_name_or_path, "models/sft", "python sft.py", "--model-name-or-path")
    embedded, eval_dataset, eval_reward_fn = prepare_output(args, rank, world_size, "preference_train.jsonl",
                                                            "preference_eval.jsonl")
    eval_prompts_file = f"{TASK_DATA}/prompts_eval.jsonl" if args.eval_prompts == "auto" and embedded else args.eval_prompts
    # the data and the judge first: bad lines stop the run with file, line and field (or are counted and skipped)
    # before a model loads
    bad_lines = [] if args.skip_bad_pairs else None
    train_records = read_data(args.dataset, "preference", bad_lines, args.dataset_config, args.dataset_split)
    eval_records = read_data(eval_dataset, "preference", bad_lines, args.dataset_config, args.eval_split or "train",
                             True) if eval_dataset != "none" else []
    prompt_records = read_data(eval_prompts_file, "prompt") if eval_prompts_file not in ("auto", "none") else []
    if bad_lines:
        print(f"skipped {len(bad_lines)} bad lines, the first: {bad_lines[0]}")
    judge = load_function(eval_reward_fn) if eval_reward_fn else None

    # 1. two models: the policy (trained) and the reference (frozen), both from the SFT model; with LoRA the reference
    #    is the policy with its adapters off, no second copy
    ckpt_dir, resuming = resume_point(args)  # the checkpoint checked before anything loads from it
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    policy = AutoModelForCausalLM.from_pretrained(ckpt_dir if resuming and not args.lora_r else args.model_name_or_path,
                                                  **trained).to(device)
    ref_policy = None if args.lora_r else AutoModelForCausalLM.from_pretrained(args.model_name_or_path,
                                                                                **frozen).to(device)
    for model in [m for m in (policy, ref_policy) if m is not None]:
        setup_tokenizer(tokenizer, model)
        disable_dropout(model)  # the log-ratios compare two forward passes: no noise in either
    if ref_policy is not None:
        ref_policy.eval().requires_grad_(False)
    check_room(args.output_dir, policy)
    if args.lora_r:
        add_lora(policy, args.lora_r, args.lora_alpha, args.lora_target_modules, args.model_name_or_path,
                 resume_dir=ckpt_dir if resuming else "")
    learning_rate = default_learning_rate(args, policy, tiny=1e-4, pretrained=5e-7)
    padding_free = args.padding_free and packing_works(policy)
    if args.padding_free and not padding_free:
        print("warning: this model lets packed sequences attend to each other; padding instead (--no-padding-free)")
    if args.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy_w = distribute([policy], args.strategy, args.bf16)  # every pass runs as policy_w(fn, ...) = fn(policy, ...)
    ref_w = WithoutAdapters(policy_w, policy) if args.lora_r else distribute([ref_policy], args.strategy, args.bf16,
                                                                             trainable=False)

    # 2. data: the preference pairs of stage 2 (rankings kept together as comparison groups), held-out pairs and prompts
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
        """This process's share of the i-th global micro-batch of comparison groups, collated and on the device, and
        the indices of its pairs (for precomputed reference log-probs)."""
        pair_ids = [k for g in batch_indices(i, len(groups), micro_batch_size, args.seed, rank, world_size)
                    for k in groups[g]]
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
    sample_batch = partial(generate, response_length=args.response_length, temperature=args.temperature,  # a Rollout
                           end_id=end_token_id(tokenizer), pad_id=tokenizer.pad_token_id, autocast=autocast)

    @torch.no_grad()
    def evaluate(step: int, final: bool = False) -> None:
        """Held-out pairs: the implicit reward's accuracy. Held-out prompts, sampled as PPO evaluates: gold score, KL
        to the reference at the sampling temperature, length; at the end the gold win rate against the SFT policy.
        Every process runs it (its own draws); the figures are the means over processes."""
        started = time.time()
        tqdm.write(f"eval @ {step}: {len(evals)} held-out pairs, {len(eval_prompts)} prompts to sample...")
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
            batch = sample_batch(policy_w, prompt_ids)
            texts = tokenizer.batch_decode(batch.responses, skip_special_tokens=True)
            inputs = (batch.query_responses, batch.attention_mask, batch.context_length, args.temperature)
            with autocast():
                logprobs, ref_logprobs = policy_w(response_logprobs, *inputs), ref_w(response_logprobs, *inputs)
            out |= {"eval/kl": ((logprobs - ref_logprobs) * batch.response_mask).sum(1).mean(),
                    "eval/response_length": batch.response_mask.sum(1).float().mean(),
                    "eval/eos_rate": batch.has_eos.float().mean(), "eval/distinct_responses": len(set(texts)) / len(texts)}
            gold = torch.tensor([judge(p, t) for p, t in zip(prompts, texts)]) if judge else None
            if judge:
                out["eval/gold_score"] = gold.mean()
            if judge and final:  # the SFT policy answers the same prompts; the gold judge picks (ties count half)
                sft_texts = tokenizer.batch_decode(sample_batch(ref_w, prompt_ids).responses, skip_special_tokens=True)
                sft_gold = torch.tensor([judge(p, t) for p, t in zip(prompts, sft_texts)])
                out["eval/sft_gold_score"] = sft_gold.mean()
                out["eval/gold_win_rate_vs_sft"] = ((gold > sft_gold).float() + 0.5 * (gold == sft_gold).float()).mean()
            table = "\n".join(f"  {p!r:.300} -> {t!r}" for p, t in zip(prompts, texts))
        out = {k: all_reduce(torch.as_tensor(v, dtype=torch.float, device=device), "mean") for k, v in out.items()}
        metrics.log(step, out, samples=table)
        tqdm.write(f"eval @ {step} ({time.time() - started:.0f} s): "
                   + "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in out.items()) + "\n"
                   + "\n".join(table.split("\n")[: args.num_sample_rows]))
        policy_w.train()

    # 5. training loop
    if start_step == 0:
        evaluate(0)
    policy_w.train()
    progress = tqdm(range(start_step, num_steps), initial=start_step, total=num_steps, desc="dpo",
                    disable=rank != 0 or None)  # None: on in a terminal, off in a log file
    step_end, clock = time.perf_counter(), Clock(start_step, num_steps)
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
        grad_norm = clip_gradients(policy_w.parameters(), args.max_grad_norm)  # the norm before clipping
        stop_if_not_finite(step + 1, args.output_dir, loss=stats[0].item(), grad_norm=grad_norm.item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds, step_end = time.perf_counter() - step_end, time.perf_counter()  # includes any evaluation
        progress.set_postfix(loss=f"{stats[0]:.3f}", acc=f"{stats[3]:.2f}")
        if progress.disable and (step + 1) % args.eval_steps == 0:  # no progress bar (a log file): the loss here
            print(f"step {step + 1}/{num_steps}: train loss {stats[0]:.4f}, accuracy {stats[3]:.3f}  {clock(step + 1)}")
        metrics.log(step + 1, {"train/dpo/loss": stats[0], "rewards/chosen": stats[1], "rewards/rejected": stats[2],
                               "rewards/margins": stats[1] - stats[2], "rewards/accuracies": stats[3],
                               "logps/chosen": stats[4], "logps/rejected": stats[5], "train/dpo/grad_norm": grad_norm,
                               "charts/lr": scheduler.get_last_lr()[0], "time/step": step_seconds})
        if (step + 1) % args.eval_steps == 0 and step + 1 < num_steps:
            evaluate(step + 1)
        if signals.checkpoint_due(step + 1, num_steps, args.save_steps, device):  # periodic, or asked to stop
            state = {"scheduler": scheduler.state_dict(), "step": step + 1, "run_name": run_name,
                     "log_bytes": metrics.position()}
            save_model(ckpt_dir, tokenizer, config, ("", policy), training=(state, policy_w, optimizer))
            signals.stop_if_asked(ckpt_dir, step + 1)
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


if __name__ == "__main__":
    with user_errors_in_one_line():
        main(cli(Args))  # the flags; on the CPU, glibc keeps freed memory (plumbing.cli)
