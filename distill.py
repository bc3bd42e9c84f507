"""On-policy distillation: the student samples its own responses and a teacher grades every token of them.

    python distill.py --teacher-model-path models/grpo           # the SFT model learns what GRPO's policy knows
    python distill.py --teacher-model-path T --loss jsd --beta 0.5           # GKD's generalised JSD, whole vocabulary
    python distill.py --teacher-model-path T --lmbda 0.5 --demonstrations sft.jsonl     # half the batches fixed data
    torchrun --nproc-per-node 8 distill.py --model-name-or-path ... --teacher-model-path ... --strategy fsdp --bf16

RL scores a response with one number; a teacher scores each of its tokens. With the student's own samples (on-policy,
so the student learns from the states it actually reaches) the per-token signal is the reverse KL, log pi_student -
log pi_teacher of each sampled token: it is used as a negative advantage in a policy-gradient step, with no discount
and no baseline (Gu et al. 2024, MiniLLM; Agarwal et al. 2024, GKD; Thinking Machines 2025, "On-Policy
Distillation"; Qwen3's report). `--loss jsd` instead takes GKD's generalised Jensen-Shannon divergence between the two
full next-token distributions at each response position (beta 0: forward KL, beta 1: reverse KL). Where this departs
from the papers:
1. The sampled reverse KL is the advantage of a clipped policy gradient (PPO's surrogate): exactly REINFORCE on
   the first minibatch, and safe when later minibatches are off-policy (--num-mini-batches > 1).
2. Every normaliser is the token count of the whole optimizer batch (micro-batches and processes), as grpo.py's.
3. --lmbda is GKD's: the share of batches the student samples; the others are --demonstrations (prompt and
   completion), on which either loss is taken over the whole vocabulary (the sampled estimate needs the student's
   own samples).
4. The teacher must share the student's vocabulary (checked at start); both distributions are taken at the sampling
   temperature, over the token ids they have in common.
"""

import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C while torch loads: one line, no traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import (Rollout, encode_prompt, encode_response, end_token_id, pad, read_data, setup_tokenizer,
                    truncate_after_eos)
from plumbing import (TASK_DATA, Clock, Metrics, StopSignals, add_lora, all_reduce, batch_indices, check_room, cli,
                      clip_gradients, decay_groups, default_learning_rate, disable_dropout, distribute, evaluate_policy,
                      exact_div, generate, layout, load_prompts, load_state, packing_works, prepare_output, require_stage,
                      resume_point, save_model, setup, stop_if_not_finite, sync_gradients, user_errors_in_one_line)


@dataclass
class Args:
    # experiment
    exp_name: str = "distill"
    """the name of this experiment, used in the run name"""
    seed: int = 1
    """seed of the experiment: same seed, same CPU run"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "rlhf"
    """the Weights & Biases project"""
    output_dir: str = "models/distill"
    """where the student is saved (loads with AutoModelForCausalLM)"""
    resume: bool = True
    """continue from `{output_dir}/checkpoint` if an interrupted run left one"""
    save_steps: int = 20
    """write a resumable checkpoint every this many iterations"""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:N', or 'auto' (cuda if available); under torchrun each process takes cuda:LOCAL_RANK"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: 'ddp' keeps a full copy of both models per process; 'fsdp' (FSDP2) shards them (and the student's
    gradients and optimizer state) across the processes"""
    bf16: bool = False
    """bfloat16 mixed precision: the student in fp32 with its AdamW state, bf16 compute; the frozen teacher in bf16"""
    gradient_checkpointing: bool = False
    """recompute the student's activations in backward (non-reentrant): less memory, more compute"""

    # models & data
    model_name_or_path: str = "models/sft"
    """the student, and where it starts"""
    teacher_model_path: str = ""
    """the teacher: a model of the student's tokenizer (a larger one, or one RL made better; required)"""
    trust_remote_code: bool = False
    """allow a Hub model to run its own code (only for models you trust)"""
    dataset: str = f"{TASK_DATA}/prompts_train.jsonl"
    """prompts the student answers (prompt-only, or any format with a prompt; other fields reach the judge): a JSONL,
    JSON, Parquet or CSV file, a `save_to_disk` folder or a Hub dataset id"""
    eval_dataset: str = "auto"
    """held-out prompts, or 'none'. 'auto': for the embedded task's prompts its held-out ones; for yours the
    --eval-split of --dataset if given, else none (evaluation then samples training prompts)"""
    dataset_config: str | None = None
    """the configuration (subset) of a Hub dataset given as --dataset or --eval-dataset"""
    dataset_split: str = "train"
    """the split of --dataset to train on, when it has splits"""
    eval_split: str = ""
    """held out: the split of --dataset to evaluate on (e.g. 'test')"""
    demonstrations: str = ""
    """with --lmbda < 1: prompt/completion demonstrations for the batches the student does not sample"""
    max_prompt_length: int = 64
    """in tokens; longer prompts lose their oldest text (the chat template's frame is kept)"""

    # rollout
    num_iterations: int = 40
    """sample + update iterations"""
    rollout_batch_size: int = 32
    """prompts per iteration, per process (reduced to fit a smaller prompt file), one response each"""
    response_length: int = 24
    """most tokens per response (and per demonstration completion)"""
    temperature: float = 0.7
    """sampling temperature; both models' distributions are taken at it"""

    # algorithm
    loss: Literal["reverse_kl", "jsd"] = "reverse_kl"
    """'reverse_kl': log pi_student - log pi_teacher of each sampled token, the negative advantage of a policy-gradient
    step; 'jsd': GKD's generalised JSD between the two next-token distributions at each response position"""
    beta: float = 0.5
    """with --loss jsd: 0 is KL(teacher || student) (forward), 1 is KL(student || teacher) (reverse), between them
    the JSD to the mixture beta * teacher + (1 - beta) * student"""
    lmbda: float = 1.0
    """GKD's student-data fraction: the share of batches the student samples; the rest are --demonstrations"""
    cliprange: float = 0.2
    """with reverse_kl: the ratio pi / pi_old of later minibatches is clipped to [1 - cliprange, 1 + cliprange]"""
    num_mini_batches: int = 1
    """minibatches per iteration, one optimizer step each (1: on-policy, the ratio exactly 1)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch"""
    lora_r: int = 0
    """LoRA: train rank-r adapters on the student's linear layers instead of every weight (`pip install peft`); 0: off"""
    lora_alpha: float = 32.0
    """LoRA: the adapters' product is scaled by lora_alpha / lora_r"""
    lora_target_modules: str = "all-linear"
    """LoRA: the layers to adapt, by name ('q_proj,v_proj'), or 'all-linear'"""
    learning_rate: float | None = None
    """AdamW learning rate, decayed linearly to 0; default 1e-4 for the embedded tiny model, 1e-6 otherwise; 10x either
    with LoRA"""
    weight_decay: float = 0.0
    """AdamW weight decay (not of biases and norm weights)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    padding_free: bool = True
    """pack sequences without padding in every forward pass (checked at start)"""

    # evaluation
    eval_steps: int = 10
    """evaluate on held-out prompts every this many iterations (and at the end)"""
    num_eval_prompts: int = 128
    """held-out prompts per evaluation, one response each (0: no evaluation)"""
    eval_reward_fn: str = "auto"
    """a judge fn(prompt, response, **fields) -> float (a verifier: 1 = right); 'auto': the embedded task's gold judge
    on its own prompts, none on yours; '' to skip"""
    eval_pass_k: int = 0
    """with a verifier as --eval-reward-fn: held-out greedy accuracy at every evaluation, pass@k at the first and last"""
    reward_fn_timeout: float = 60.0
    """in seconds: the judge still running on one response after this scores it None; 0: no limit"""
    num_sample_rows: int = 4
    """sample responses printed and logged per evaluation"""


def generalized_jsd(student_logits, teacher_logits, beta: float) -> torch.Tensor:
    """(B, T, V) logits of two next-token distributions (already divided by the temperature) -> (B, T) GKD's
    generalised Jensen-Shannon divergence (Agarwal et al. 2024, eq. 2): beta KL(teacher || M) + (1 - beta)
    KL(student || M), M = beta teacher + (1 - beta) student; beta 0 is KL(teacher || student), beta 1 KL(student ||
    teacher), the limits of the mixture's divergences divided by beta and 1 - beta (as TRL's GKDTrainer)."""
    s, t = F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1)
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1)  # noqa: E731  KL(p || q) from log-probs
    if beta == 0:
        return kl(t, s)
    if beta == 1:
        return kl(s, t)
    m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def reverse_kl_loss(new_logprobs, old_logprobs, teacher_logprobs, cliprange: float):
    """The sampled reverse KL as a policy gradient, per token: advantage A = -(log pi_old - log pi_teacher) of each
    sampled token (the student at sampling against the teacher), in PPO's clipped surrogate -min(r A, clip(r) A),
    r = pi / pi_old. On-policy r = 1 and its gradient is -A grad log pi: in expectation over the student's samples, the
    gradient of KL(pi_student || pi_teacher) at each position. Returns ((B, T) loss, (B, T) advantages)."""
    advantages = -(old_logprobs - teacher_logprobs)
    ratio = torch.exp(new_logprobs - old_logprobs)
    return -torch.min(ratio * advantages, ratio.clamp(1 - cliprange, 1 + cliprange) * advantages), advantages


def response_logits(model, batch_layout, vocab: int) -> torch.Tensor:
    """(B, T, V) logits at the positions that predict the response tokens, over the first `vocab` ids (the ones the two
    models share): the LM head runs only there (its input gathered first, by a hook, as grpo.py's `forward` does)."""
    inputs, (rows, cols), _ = batch_layout
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0][rows, cols],))
    try:
        return model(**inputs, use_cache=False).logits[..., :vocab]
    finally:
        hook.remove()


class Episodes(NamedTuple):
    """A batch as the update reads it."""
    rollout: Rollout
    loss_mask: torch.Tensor  # (B, T) float: the response tokens (or demonstration tokens) in the loss
    old_logprobs: torch.Tensor  # (B, T) the student's at sampling
    teacher_logprobs: torch.Tensor  # (B, T) the teacher's, of the same tokens
    sampled: bool  # the student's own samples (else demonstrations: the loss over the whole vocabulary)


def backward_minibatch(student_w, teacher_w, episodes: Episodes, mb: torch.Tensor, micro_batch_size: int, args: Args,
                       vocab: int, padding_free: bool, autocast) -> dict:
    """One optimizer step's loss on minibatch `mb`, micro-batch by micro-batch, each backward adding its share of the
    gradient of the token mean over the whole minibatch (every micro-batch, every process). A function for the test of
    its gradient under micro-batching and torchrun."""
    batch = episodes.rollout
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    normaliser = all_reduce(episodes.loss_mask[mb].sum()).clamp(min=1)
    stats = {"loss": [], "kl": [], "clipped": []}
    for start in range(0, len(mb), micro_batch_size):
        idx = mb[start: start + micro_batch_size]
        sync_gradients(student_w, start + micro_batch_size >= len(mb))  # reduce across processes in the last backward
        loss_mask = episodes.loss_mask[idx]
        batch_layout = layout(batch.query_responses[idx], batch.attention_mask[idx], batch.context_length, padding_free)
        with autocast():
            logits = student_w(response_logits, batch_layout, vocab).float() / args.temperature  # (b, T, V)
        new_logprobs = torch.gather(logits.log_softmax(-1), 2, batch.responses[idx, :, None]).squeeze(-1)
        if args.loss == "reverse_kl" and episodes.sampled:
            per_token, advantages = reverse_kl_loss(new_logprobs, episodes.old_logprobs[idx],
                                                    episodes.teacher_logprobs[idx], args.cliprange)
            ratio = torch.exp(new_logprobs.detach() - episodes.old_logprobs[idx])
            stats["clipped"].append((((ratio - 1).abs() > args.cliprange).float() * loss_mask).sum())
            stats["kl"].append((-advantages * loss_mask).sum())
        else:  # the whole vocabulary: GKD's JSD, or (demonstrations with reverse_kl) the exact reverse KL
            with torch.no_grad(), autocast():
                teacher_logits = teacher_w(response_logits, batch_layout, vocab).float() / args.temperature
            per_token = generalized_jsd(logits, teacher_logits, args.beta if args.loss == "jsd" else 1.0)
            stats["kl"].append((generalized_jsd(logits.detach(), teacher_logits, 1.0) * loss_mask).sum())
        loss = (per_token * loss_mask).sum() / normaliser
        (loss * world_size).backward()  # DDP and FSDP2 average gradients over processes: world_size undoes the 1/N
        stats["loss"].append(loss.detach())
    return stats


def load_models(args, tokenizer, trained: dict, frozen: dict, device, resume_dir: str):
    """The student (`resume_dir`: an interrupted run's checkpoint to continue from) and the frozen teacher, dropout off
    in both, wrapped for torchrun. The teacher must have the student's vocabulary: same ids for the same tokens (one
    may hold extra special tokens after the shared ones, a pad token added by a stage); the losses read the ids both
    have. -> (student, student_w, teacher_w, shared vocabulary size, padding_free)."""
    teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher_model_path, trust_remote_code=args.trust_remote_code)
    ours, theirs = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    extra = [t for t, i in (ours.items() if len(ours) > len(theirs) else theirs.items()) if i >= min(len(ours), len(theirs))]
    if any(theirs.get(t) != i for t, i in ours.items() if i < len(theirs)) or any(
            t not in (tokenizer.all_special_tokens + teacher_tokenizer.all_special_tokens) for t in extra):
        raise SystemExit(f"error: the teacher {args.teacher_model_path} has another vocabulary than the student "
                         f"{args.model_name_or_path}: distillation compares their probabilities token by token, so it "
                         "needs one tokenizer")
    student = AutoModelForCausalLM.from_pretrained(resume_dir if resume_dir and not args.lora_r else
                                                   args.model_name_or_path, **trained).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher_model_path, **frozen).to(device)
    for model in (student, teacher):
        setup_tokenizer(tokenizer, model)  # the same pad rule for both (padding is never attended)
        disable_dropout(model)  # the same log-probs at sampling and in the update
    teacher.eval().requires_grad_(False)
    check_room(args.output_dir, student)
    if args.lora_r:
        add_lora(student, args.lora_r, args.lora_alpha, args.lora_target_modules, args.model_name_or_path,
                 resume_dir=resume_dir)
    padding_free = args.padding_free and packing_works(student) and packing_works(teacher)
    if args.gradient_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    vocab = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0],
                len(tokenizer))
    student_w = distribute([student], args.strategy, args.bf16)  # student_w(fn, x, ...) = fn(student, x, ...)
    teacher_w = distribute([teacher], args.strategy, args.bf16, trainable=False)
    student_w.train()
    return student, student_w, teacher_w, vocab, padding_free


def main(args: Args) -> None:
    if not args.teacher_model_path:
        raise SystemExit("error: give the teacher: --teacher-model-path (a model of the student's tokenizer)")
    if not 0 <= args.lmbda <= 1 or (args.lmbda < 1 and not args.demonstrations):
        raise SystemExit("error: --lmbda is the share of batches the student samples, in [0, 1]; below 1 the others "
                         "come from --demonstrations FILE")
    rank, world_size, device, run_name, autocast, trained, frozen = setup(args)  # torchrun, seeds, --bf16's autocast
    require_stage(args.model_name_or_path, "models/sft", "python sft.py", "--model-name-or-path")
    require_stage(args.teacher_model_path, "", "python grpo.py", "--teacher-model-path")
    _, eval_dataset, eval_reward_fn = prepare_output(args, rank, world_size, "prompts_train.jsonl", "prompts_eval.jsonl")

    # 1. prompts (and demonstrations), read and checked before any model loads
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    train_records, train_prompts, eval_records, eval_prompts = load_prompts(args, tokenizer, eval_dataset,
                                                                            eval_reward_fn, [])
    demonstrations = [(ids, encode_response(tokenizer, r["completion"], args.response_length)[0])
                      for r in (read_data(args.demonstrations, "sft") if args.demonstrations else [])
                      for ids in [encode_prompt(tokenizer, r["prompt"], args.max_prompt_length)[0]] if ids is not None]

    # 2. the student and the teacher
    ckpt_dir, resuming = resume_point(args)  # the checkpoint checked before anything loads from it
    student, student_w, teacher_w, vocab, padding_free = load_models(args, tokenizer, trained, frozen, device,
                                                                     ckpt_dir if resuming else "")
    learning_rate = default_learning_rate(args, student, tiny=1e-4, pretrained=1e-6)
    batch_size = min(args.rollout_batch_size, len(train_prompts) // world_size)  # responses per process
    if batch_size < args.rollout_batch_size:
        print(f"only {len(train_prompts)} prompts: --rollout-batch-size {args.rollout_batch_size} -> {batch_size}")
    mini_batch_size = exact_div(batch_size, args.num_mini_batches, "rollout_batch_size / num_mini_batches")
    micro_batch_size = exact_div(mini_batch_size, args.gradient_accumulation_steps,
                                 "mini_batch_size / gradient_accumulation_steps")
    print(f"global batch: {batch_size} x {world_size} process(es) responses per iteration, {args.num_mini_batches} "
          f"optimizer step(s) on them; the teacher grades {vocab} token ids")

    # 3. AdamW, learning rate decayed linearly to 0
    optimizer = torch.optim.AdamW(decay_groups(student_w, args.weight_decay), lr=learning_rate, eps=1e-5,
                                  fused=device.type in ("cpu", "cuda"))
    params = list(student_w.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (args.num_iterations *
                                                                                   args.num_mini_batches))
    start_iteration = 0
    if resuming:
        state = load_state(ckpt_dir, student_w, optimizer)  # also restores the optimizer and the random generators
        scheduler.load_state_dict(state["scheduler"])
        start_iteration, run_name = state["iteration"], state["run_name"]
        print(f"resuming {ckpt_dir} at iteration {start_iteration}")
    elif world_size > 1:
        torch.manual_seed(args.seed + rank)  # every process samples its own (models are built: they had to match)
    config = vars(args) | {"run_name": run_name, "eval_dataset": eval_dataset, "eval_reward_fn": eval_reward_fn,
                           "learning_rate": learning_rate, "padding_free": padding_free, "rollout_batch_size": batch_size}
    metrics = Metrics(f"runs/{run_name}", config, args.track, args.wandb_project,
                      state | {"step": start_iteration} if resuming else None)
    end_id, pad_id = end_token_id(tokenizer), tokenizer.pad_token_id
    generate_batch = partial(generate, response_length=args.response_length, temperature=args.temperature,
                             end_id=end_id, pad_id=pad_id, autocast=autocast)

    @torch.no_grad()
    def logprobs_of(model_w, batch: Rollout) -> torch.Tensor:
        """(B, T) log-probs of a batch's response tokens under a model at the temperature, in micro-batches of the
        training size (so the first minibatch of the update reproduces the student's exactly)."""
        chunks = []
        for k in range(0, len(batch.responses), micro_batch_size):
            rows = batch.rows(slice(k, k + micro_batch_size))
            batch_layout = layout(rows.query_responses, rows.attention_mask, rows.context_length, padding_free)
            with autocast():
                logits = model_w(response_logits, batch_layout, vocab).float() / args.temperature
            chunks.append(torch.gather(logits.log_softmax(-1), 2, rows.responses[..., None]).squeeze(-1))
        return torch.cat(chunks)

    def teacher_kl(batch, records):  # (B,) minus the reverse KL to the teacher, summed over each response: the score
        kl = ((logprobs_of(student_w, batch) - logprobs_of(teacher_w, batch)) * batch.response_mask).sum(1)
        return -kl, {}
    evaluate = partial(evaluate_policy, policy_w=student_w, ref_w=None, records=eval_records, prompts=eval_prompts,
                       generate=generate_batch, score=teacher_kl, kl=lambda batch: None, tokenizer=tokenizer,
                       eval_reward_fn=eval_reward_fn, pass_k=args.eval_pass_k, metrics=metrics,
                       num_sample_rows=args.num_sample_rows, timeout=args.reward_fn_timeout)

    if start_iteration == 0:
        evaluate(0)
    progress = tqdm(range(start_iteration, args.num_iterations), initial=start_iteration, total=args.num_iterations,
                    desc="distill", disable=rank != 0 or None)  # None: on in a terminal, off in a log file
    signals = StopSignals()  # SIGTERM, Ctrl-C: a checkpoint at the end of the iteration, then exit
    clock = Clock(start_iteration, args.num_iterations)
    for iteration in progress:
        t0 = time.time()
        # 4. a batch: the student's own responses to prompts (a share lmbda of the iterations, drawn per iteration
        #    alike in every process) or demonstrations, its prompts and completions as they are
        sampled = random.Random(args.seed * 7919 + iteration).random() < args.lmbda
        student_w.eval()
        if sampled:
            idx = batch_indices(iteration, len(train_prompts), batch_size, args.seed, rank, world_size)
            batch = generate_batch(student_w, [train_prompts[i] for i in idx])
        else:
            idx = batch_indices(iteration, len(demonstrations), batch_size, args.seed, rank, world_size)
            queries, query_mask = pad([demonstrations[i][0] for i in idx], pad_id, side="left")
            completions, completion_mask = pad([demonstrations[i][1] for i in idx], pad_id)
            responses, response_mask, has_eos = truncate_after_eos(completions, end_id, pad_id)
            batch = Rollout(torch.cat([queries, responses], 1).to(device),
                            torch.cat([query_mask, response_mask.long()], 1).to(device), queries.shape[1],
                            responses.to(device), response_mask.to(device), has_eos.to(device))
        loss_mask = batch.response_mask.float()  # (B, T)
        t_generate = time.time() - t0

        # 5. the student's and the teacher's log-probs of the same tokens
        old_logprobs, teacher_logprobs = logprobs_of(student_w, batch), logprobs_of(teacher_w, batch)  # (B, T) each
        episodes = Episodes(batch, loss_mask, old_logprobs, teacher_logprobs, sampled)
        t_grade = time.time() - t0 - t_generate

        # 6. update: minibatches, one optimizer step each (`backward_minibatch`)
        student_w.train()
        stats, grad_norms = [], []
        for start in range(0, batch_size, mini_batch_size):
            stats.append(backward_minibatch(student_w, teacher_w, episodes, torch.arange(start, start + mini_batch_size,
                                                                                        device=device),
                                            micro_batch_size, args, vocab, padding_free, autocast))
            grad_norms.append(clip_gradients(params, args.max_grad_norm))  # the norm before clipping
            stop_if_not_finite(iteration + 1, args.output_dir, grad_norm=grad_norms[-1].item())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        t_update = time.time() - t0 - t_generate - t_grade

        # 7. log: the reverse KL per token at sampling (all processes' tokens), the loss, and what the batch was
        tokens = all_reduce(loss_mask.sum()).clamp(min=1)
        kl_tokens = all_reduce(((old_logprobs - teacher_logprobs) * loss_mask).sum()) / tokens
        row = {"objective/reverse_kl": kl_tokens, "objective/sampled": float(sampled),
               "loss/distill": torch.stack([torch.stack(s["loss"]).sum() for s in stats]).mean(),
               "loss/grad_norm": torch.stack(grad_norms).mean(), "val/response_length": loss_mask.sum(1).mean(),
               "val/truncated": (~batch.has_eos).float().mean(), "charts/lr": scheduler.get_last_lr()[0],
               "charts/episodes": (iteration + 1) * batch_size * world_size, "time/generate": t_generate,
               "time/grade": t_grade, "time/update": t_update}
        if sampled and args.loss == "reverse_kl":  # the share of tokens whose ratio the clip reached (0 on-policy)
            row["policy/clipfrac"] = all_reduce(torch.stack([torch.stack(s["clipped"]).sum() for s in stats]).sum()) / tokens
        row = dict(zip(row, all_reduce(torch.tensor([float(v) for v in row.values()], device=device), "mean").tolist()))
        metrics.log(iteration + 1, row)
        progress.set_postfix(kl=f"{row['objective/reverse_kl']:.3f}")
        if progress.disable:  # no progress bar (a log file): a line per iteration
            print(f"iteration {iteration + 1}/{args.num_iterations}: reverse KL {row['objective/reverse_kl']:.4f} per "
                  f"token ({'sampled' if sampled else 'demonstrations'})  length {row['val/response_length']:.1f}  "
                  f"{clock(iteration + 1)}")
        if (iteration + 1) % args.eval_steps == 0 and iteration + 1 < args.num_iterations:  # the last: after the save
            evaluate(iteration + 1)
        if signals.checkpoint_due(iteration + 1, args.num_iterations, args.save_steps, device):  # or asked to stop
            state = {"scheduler": scheduler.state_dict(), "iteration": iteration + 1, "run_name": run_name,
                     "log_bytes": metrics.position()}
            save_model(ckpt_dir, None, config, ("", student), training=(state, student_w, optimizer))
            signals.stop_if_asked(ckpt_dir, iteration + 1)
    signals.restore()
    progress.close()

    # 8. save first, then the final evaluation
    save_model(args.output_dir, tokenizer, config, ("", student))
    print(f"saved to {args.output_dir}")
    evaluate(args.num_iterations, final=True)
    metrics.close()
    print(f"logs in runs/{run_name}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    with user_errors_in_one_line():
        main(cli(Args))  # the flags; on the CPU, glibc keeps freed memory (plumbing.cli)
