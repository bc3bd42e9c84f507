"""Stage 1 of RLHF: supervised fine-tuning (SFT) of a causal language model on demonstrations.

    python sft.py                                                       # embedded reviews task, tiny model, CPU
    python sft.py --model-name-or-path models/smollm2 --dataset chat.jsonl --learning-rate 1e-5 --max-steps 100
    torchrun --nproc-per-node 8 sft.py --model-name-or-path ... --strategy fsdp --bf16    # one model on 8 GPUs

Minimises the negative log-likelihood of the completion tokens given the prompt (Ouyang et al. 2022, sec. 3.5;
Stiennon et al. 2020, sec. 3.3). Where this departs from the common recipe:
1. A tokenizer whose pad token is missing or equals EOS gets a new, distinct pad token, so EOS stays in the loss.
2. The loss is summed over tokens and divided by the completion tokens of the whole accumulated batch, so gradient
   accumulation gives the same gradient as one big batch (a per-micro-batch mean weighs short examples more).
3. Prompt and completion are tokenized separately and concatenated; EOS is appended to every completion.
4. Padding-free batches: a micro-batch's examples are packed into rows with no padding between them, positions
   restarting with each example so attention stays inside it. Same loss as padding, about 30% less compute here.
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

# the embedded "reviews" task: its files and tiny model are made by reviews_task.py on first use of these defaults
TASK_DATA, TINY_MODEL = "data/reviews", "models/tiny-llama"


@dataclass
class Args:
    # experiment
    exp_name: str = "sft"
    """the name of this experiment, used in the run name"""
    seed: int = 1
    """seed of the experiment: same seed, same CPU run"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "rlhf"
    """the Weights & Biases project"""
    output_dir: str = "models/sft"
    """where the trained model is saved (Hugging Face format)"""
    resume: bool = True
    """continue from `{output_dir}/checkpoint` if an interrupted run left one"""
    save_steps: int = 200
    """write a resumable checkpoint every this many optimizer steps"""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:N', or 'auto' (cuda if available); under torchrun each process takes cuda:LOCAL_RANK"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: 'ddp' keeps a full copy of the model per process; 'fsdp' (FSDP2) shards parameters, gradients
    and optimizer state across them, for models that do not fit one device"""
    bf16: bool = False
    """bfloat16 mixed precision: fp32 weights and optimizer state, bf16 compute (autocast; FSDP2's
    MixedPrecisionPolicy under --strategy fsdp), gradients reduced in fp32"""
    gradient_checkpointing: bool = False
    """recompute activations in backward instead of storing them (non-reentrant): less memory, ~30% more compute"""

    # model & data
    model_name_or_path: str = TINY_MODEL
    """a local Hugging Face folder or a Hub name; the default tiny model is made on first use"""
    trust_remote_code: bool = False
    """allow a Hub model to run its own code (only for models you trust)"""
    dataset: str = f"{TASK_DATA}/sft_train.jsonl"
    """prompt/completion pairs or conversational `messages`: a JSONL, JSON, Parquet or CSV file, a `save_to_disk`
    folder or a Hub dataset id (docs/details.md#data-sources)"""
    eval_dataset: str = "auto"
    """held-out data in the same format; 'auto': the embedded task's held-out file with its training file, with yours
    --eval-split's split of --dataset or none (the final sampling check then uses training prompts); 'none' to skip"""
    dataset_config: str | None = None
    """the configuration (subset) of a Hub dataset given as --dataset or --eval-dataset"""
    dataset_split: str = "train"
    """the split of --dataset to train on, when it has splits (a Hub dataset, a saved DatasetDict)"""
    eval_split: str = ""
    """held out: the split of --dataset to evaluate on (e.g. 'test'); with --eval-dataset, the split read from it
    (default 'train', a file's only split)"""
    max_prompt_length: int = 64
    """in tokens; longer prompts are cut from the left (or skipped with --skip-long-prompts)"""
    skip_long_prompts: bool = False
    """drop prompts longer than max_prompt_length instead of truncating them"""
    max_completion_length: int = 48
    """in tokens, EOS included; longer completions are cut from the right"""
    train_on_prompt: bool = False
    """compute the loss on the whole sequence, not only on the completion"""

    # optimization
    lora_r: int = 0
    """LoRA: train rank-r adapters on the decoder's linear layers instead of every weight (`pip install peft`); 0: off"""
    lora_alpha: float = 32.0
    """LoRA: the adapters' product is scaled by lora_alpha / lora_r"""
    lora_target_modules: str = "all-linear"
    """LoRA: the layers to adapt, by name ('q_proj,v_proj'), or 'all-linear' (every linear layer of the decoder)"""
    learning_rate: float | None = None
    """peak AdamW learning rate; default 2e-3 for the embedded tiny model (it learns from scratch), 1e-5 otherwise; 10x
    either with LoRA"""
    weight_decay: float = 0.0
    """AdamW weight decay (of weight matrices: not of biases and norm weights, as transformers' Trainer)"""
    num_epochs: int = 1
    """passes over the data, used when max_steps is -1"""
    max_steps: int = -1
    """optimizer steps; -1 means num_epochs over the data"""
    per_device_train_batch_size: int = 32
    """examples per micro-batch, per process"""
    padding_free: bool = True
    """pack each micro-batch's examples into rows without padding (checked at start; falls back to padding for a
    model that lets packed examples attend to each other)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    warmup_ratio: float = 0.05
    """fraction of the steps spent warming the learning rate up linearly from 0"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay after warm-up: 'cosine', 'linear' or 'constant'"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""

    # evaluation
    eval_steps: int = 100
    """held-out loss and sample generations every this many steps"""
    num_samples: int = 4
    """held-out prompts whose sampled completions are printed and logged at each evaluation"""
    num_eval_generations: int = 128
    """held-out prompts sampled at the end (temperature 1) to measure the end-token rate and, with a judge, gold
    scores"""
    eval_reward_fn: str = "auto"
    """'file.py:function' or 'module:function' scoring (prompt, response) at the end; 'auto': the embedded task's
    gold judge (reviews_task.py:gold_score) on its own data, none on yours; '' to skip"""


def encode(records, tokenizer, args):
    """Records -> (list of (prompt_ids, completion_ids), prompts cut, prompts skipped, completions cut). A prompt is
    also skipped when even cut it cannot fit (a system turn longer than max_prompt_length); a cut completion loses its
    end token."""
    examples, cut, skipped, completions_cut = [], 0, 0, 0
    for r in records:
        prompt_ids, long_prompt = encode_prompt(tokenizer, r["prompt"], args.max_prompt_length)
        if prompt_ids is None or (long_prompt and args.skip_long_prompts):
            skipped += 1
            continue
        cut += long_prompt
        completion_ids, long_completion = encode_response(tokenizer, r["completion"], args.max_completion_length)
        completions_cut += long_completion
        examples.append((prompt_ids, completion_ids))
    return examples, cut, skipped, completions_cut


def collate(examples, pad_id: int, train_on_prompt: bool, padding_free: bool) -> dict:
    """(prompt_ids, completion_ids) pairs -> a batch: input_ids, labels, and an attention_mask (right padding, one
    example per row) or position_ids (padding-free: examples packed into rows by `pack`).

    labels = input ids on the completion (and its EOS), -100 elsewhere (ignored by the loss): on the prompt, on
    padding, and on each example's first token, which in a packed row would be "predicted" from its neighbour.
    """
    seqs = [p + c for p, c in examples]
    if padding_free:
        input_ids, position_ids, starts = pack(seqs, pad_id)
        batch = {"input_ids": input_ids, "position_ids": position_ids}
    else:
        input_ids, attention_mask = pad(seqs, pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        starts = torch.stack([torch.arange(len(seqs)), torch.zeros(len(seqs), dtype=torch.long)], dim=1)
    labels = torch.full_like(input_ids, -100)
    for (row, col), (p, c) in zip(starts.tolist(), examples):
        first = col + (1 if train_on_prompt else max(1, len(p)))  # first labelled token
        labels[row, first: col + len(p) + len(c)] = input_ids[row, first: col + len(p) + len(c)]
    return batch | {"labels": labels}


def token_nll_sum(model, batch: dict):
    """Summed negative log-likelihood of the labelled tokens: logits at t predict the token at t + 1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), use_cache=False).logits  # (rows, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


@torch.no_grad()
def sample_texts(model, tokenizer, prompts, max_prompt_length: int, max_new_tokens: int, device, temperature: float = 1.0):
    """Sample completions for prompt strings/conversations, cut as in training (left-padded; pure sampling,
    `common.sample`).
    Returns (texts, ended): ended[i] says whether completion i stopped with the end token within the budget."""
    end_id = end_token_id(tokenizer)
    ids = [encode_prompt(tokenizer, p, max_prompt_length)[0] for p in prompts]
    input_ids, attention_mask = pad(ids, tokenizer.pad_token_id, side="left")
    out = sample(model, input_ids.to(device), attention_mask.to(device), max_new_tokens, temperature, end_id,
                 tokenizer.pad_token_id)
    texts, ended = [], []
    for r in out[:, input_ids.shape[1]:].tolist():
        n = r.index(end_id) if end_id in r else len(r)
        texts.append(tokenizer.decode(r[:n], skip_special_tokens=True))
        ended.append(n < len(r))
    return texts, ended


def main(args: Args) -> None:
    rank, world_size, device = init_distributed(args.device)  # rank 0 of 1 without torchrun
    keep_freed_memory(device)  # CPU only
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("error: --track logs to Weights & Biases, which is not installed: pip install wandb")
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"  # logs in runs/{run_name}
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # --bf16: the weights and AdamW's state stay fp32 (bf16 cannot hold the small updates of lr ~1e-5), the forward
    # and backward run in bf16 under autocast (FSDP2 instead gathers bf16 copies of the fp32 shards)
    fsdp = world_size > 1 and args.strategy == "fsdp"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16 and not fsdp)  # noqa: E731
    embedded = args.dataset == f"{TASK_DATA}/sft_train.jsonl"  # the embedded task's own data
    if rank == 0 and ((embedded and not os.path.exists(args.dataset)) or (args.model_name_or_path == TINY_MODEL and
                                                                         not os.path.isdir(TINY_MODEL))):
        load_function("reviews_task.py:ensure_tiny_model")()  # writes the task's files too; deterministic
    claim_output_dir(args.output_dir, args.resume)  # a lock; an interrupted save mended; a save can be written
    if world_size > 1:
        dist.barrier()  # the files are written
    # 'auto': the embedded task's held-out file and judge with its own data, none with the user's
    eval_dataset = args.eval_dataset if args.eval_dataset != "auto" else (
        f"{TASK_DATA}/sft_eval.jsonl" if embedded else args.dataset if args.eval_split else "none")
    eval_reward_fn = args.eval_reward_fn if args.eval_reward_fn != "auto" else (
        "reviews_task.py:gold_score" if embedded else "")

    # 1. model and tokenizer (from an interrupted run's checkpoint if there is one)
    ckpt_dir = os.path.join(args.output_dir, "checkpoint")
    resuming = args.resume and os.path.exists(os.path.join(ckpt_dir, "training_state.pt"))
    load_from = ckpt_dir if resuming and not args.lora_r else args.model_name_or_path  # LoRA: base, then adapter
    tokenizer = AutoTokenizer.from_pretrained(load_from, trust_remote_code=args.trust_remote_code)
    # LoRA with --bf16: the frozen base held in bf16, as the RL stages hold a frozen reference
    base_dtype = torch.bfloat16 if args.bf16 and args.lora_r and not fsdp else torch.float32
    model = AutoModelForCausalLM.from_pretrained(load_from, trust_remote_code=args.trust_remote_code,
                                                 dtype=base_dtype).to(device)
    setup_tokenizer(tokenizer, model)
    check_room(args.output_dir, model)
    if args.lora_r:
        add_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules, args.model_name_or_path,
                 resume_dir=ckpt_dir if resuming else "")
    learning_rate = args.learning_rate
    if learning_rate is None:
        tiny = getattr(model.config, "embedded_tiny_model", False)
        learning_rate = (2e-3 if tiny else 1e-5) * (10 if args.lora_r else 1)  # LoRA needs about 10x
        why = "the embedded tiny model, learning from scratch" if tiny else "a pretrained model"
        print(f"learning rate {learning_rate:g} ({why}{', LoRA: 10x' if args.lora_r else ''}; --learning-rate to change)")
    padding_free = args.padding_free and packing_works(model)
    if args.padding_free and not padding_free:
        print("warning: this model lets packed examples attend to each other; padding instead (--no-padding-free)")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model_w = distribute([model], args.strategy, args.bf16)  # every training pass runs as model_w(fn, ...) = fn(model, ...)

    # 2. data: tokenize once; prompt and completion separately, the end token appended
    try:
        train_records = read_data(args.dataset, "sft", None, args.dataset_config, args.dataset_split)
        eval_records = read_data(eval_dataset, "sft", None, args.dataset_config, args.eval_split or "train", True) if (
            eval_dataset != "none") else []
    except DataError as e:  # a clear message naming file, line and field, not a traceback
        raise SystemExit(f"error: {e}")
    train, cut, skipped, completions_cut = encode(train_records, tokenizer, args)
    evals = encode(eval_records, tokenizer, args)[0]
    for count, what, flag in [(cut, "prompts were cut from the left", "--max-prompt-length"),
                              (completions_cut, "completions were cut, losing their end token", "--max-completion-length")]:
        if count > 0.1 * len(train_records):
            print(f"warning: {count} of {len(train_records)} {what}: raise {flag} for this data")
    print(f"{len(train)} training examples ({cut} prompts cut from the left, {skipped} skipped, {completions_cut} "
          "completions cut), "
          + (f"{len(evals)} held out" if eval_records else "no held-out set (--eval-dataset FILE to add one)"))
    if not train:
        raise SystemExit(f"{args.dataset}: no example left to train on")
    if len(train) < world_size:
        raise SystemExit(f"{args.dataset}: {len(train)} examples cannot be shared by {world_size} processes")
    micro_batch_size = min(args.per_device_train_batch_size, len(train) // world_size)  # examples per process
    if micro_batch_size < args.per_device_train_batch_size:
        print(f"only {len(train)} examples: --per-device-train-batch-size {args.per_device_train_batch_size} -> "
              f"{micro_batch_size}")
    batch_size = micro_batch_size * args.gradient_accumulation_steps * world_size  # examples per optimizer step
    print(f"global batch: {micro_batch_size} examples x {args.gradient_accumulation_steps} micro-batches "
          f"x {world_size} process(es) = {batch_size} per optimizer step")
    batches_per_epoch = len(train) // (micro_batch_size * world_size)  # global micro-batches
    num_steps = args.max_steps if args.max_steps > 0 else max(
        1, args.num_epochs * batches_per_epoch // args.gradient_accumulation_steps)
    warmup_steps = int(args.warmup_ratio * num_steps)

    def micro_batch(i: int):
        """This process's share of the run's i-th global micro-batch: epoch e is a permutation seeded by (seed, e), the
        same in every process, so the processes split each batch between them and a resumed run replays it."""
        epoch, j = divmod(i, batches_per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 10007 + epoch))
        first = (j * world_size + rank) * micro_batch_size
        chosen = order[first: first + micro_batch_size]
        batch = collate([train[k] for k in chosen], tokenizer.pad_token_id, args.train_on_prompt, padding_free)
        return {name: t.to(device) for name, t in batch.items()}

    # 3. optimizer and schedule: linear warm-up, then cosine or linear decay to 0 (or constant)
    optimizer = torch.optim.AdamW(decay_groups(model_w, args.weight_decay), lr=learning_rate,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel over all parameters

    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
        return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress,
                "constant": 1.0}[args.lr_scheduler]

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    start_step = 0
    if resuming:
        state = load_state(ckpt_dir, model_w, optimizer)  # also restores the optimizer and the random generators
        scheduler.load_state_dict(state["scheduler"])
        start_step, run_name = state["step"], state["run_name"]
        print(f"resuming {ckpt_dir} at step {start_step}")
    elif world_size > 1:
        torch.manual_seed(args.seed + rank)  # every process samples its own (models are built: they had to match)
    # the flags as this run resolved them: args.json beside the model, the logs' config
    config = vars(args) | {"run_name": run_name, "eval_dataset": eval_dataset, "eval_reward_fn": eval_reward_fn,
                           "learning_rate": learning_rate, "padding_free": padding_free,
                           "per_device_train_batch_size": micro_batch_size, "batch_size": batch_size}
    metrics = Metrics(f"runs/{run_name}", config, args.track, args.wandb_project, state if resuming else None)
    # prompts to sample from: held-out ones, or training ones when there is no held-out set
    sample_prompts = [r["prompt"] for r in (eval_records or train_records)[: max(args.num_samples, args.num_eval_generations)]
                      if encode_prompt(tokenizer, r["prompt"], args.max_prompt_length)[0] is not None]

    @torch.no_grad()
    def evaluate(step: int) -> None:
        """Held-out loss and a few samples; every process runs it (FSDP2 needs all of them in each forward)."""
        model_w.eval()
        if evals:
            nll, n = 0.0, 0
            for k in range(0, len(evals), micro_batch_size):
                batch = collate(evals[k: k + micro_batch_size], tokenizer.pad_token_id,
                                args.train_on_prompt, padding_free)
                with autocast():
                    nll += model_w(token_nll_sum, {name: t.to(device) for name, t in batch.items()}).item()
                n += (batch["labels"][:, 1:] != -100).sum().item()
            metrics.log(step, {"eval/sft/loss": nll / n})
            tqdm.write(f"step {step}: eval loss {nll / n:.4f}")
        prompts = sample_prompts[: args.num_samples]
        with autocast(), gathered(model_w) as generator:
            texts, _ = generator(sample_texts, tokenizer, prompts, args.max_prompt_length, args.max_completion_length,
                                 device) if prompts else ([], [])
        shown = [tokenizer.decode(encode_prompt(tokenizer, p, args.max_prompt_length)[0]) for p in prompts]  # as seen
        table = "\n".join(f"{p!r} -> {t!r}" for p, t in zip(shown, texts))
        metrics.log(step, samples=table)
        tqdm.write(f"step {step} samples:\n{table}")
        model_w.train()

    # 4. training loop
    if start_step == 0:
        evaluate(0)
    model_w.train()
    progress = tqdm(range(start_step, num_steps), initial=start_step, total=num_steps, desc="sft",
                    disable=rank != 0 or None)  # None: on in a terminal, off in a log file
    step_end = time.perf_counter()
    signals = StopSignals()  # SIGTERM, Ctrl-C: a checkpoint at the end of the step, then exit
    for step in progress:
        micro = [micro_batch(step * args.gradient_accumulation_steps + m) for m in range(args.gradient_accumulation_steps)]
        # completion tokens in the whole batch, all processes
        num_tokens = all_reduce(sum((batch["labels"][:, 1:] != -100).sum() for batch in micro))
        loss = torch.zeros((), device=device)
        for m, batch in enumerate(micro):
            sync_gradients(model_w, m == len(micro) - 1)
            with autocast():
                mb_loss = model_w(token_nll_sum, batch) / num_tokens
            # DDP and FSDP2 average gradients over the processes; times world_size, they sum them, which with the
            # global token count above gives the gradient of one batch of every process's examples
            (mb_loss * world_size).backward()
            loss += mb_loss.detach()
        loss = all_reduce(loss).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model_w.parameters(), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        stop_if_not_finite(step + 1, args.output_dir, loss=loss, grad_norm=grad_norm.item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds, step_end = time.perf_counter() - step_end, time.perf_counter()  # includes any evaluation
        progress.set_postfix(loss=f"{loss:.3f}")
        if progress.disable and (step + 1) % args.eval_steps == 0:  # no progress bar (a log file): the loss here
            print(f"step {step + 1}/{num_steps}: train loss {loss:.4f}")
        metrics.log(step + 1, {"train/sft/loss": loss, "train/sft/grad_norm": grad_norm.item(), "time/step": step_seconds,
                               "charts/lr": scheduler.get_last_lr()[0], "train/sft/tokens": num_tokens.item()})
        if (step + 1) % args.eval_steps == 0 or step + 1 == num_steps:
            evaluate(step + 1)
        stop = signals.requested(device) and step + 1 < num_steps
        if ((step + 1) % args.save_steps == 0 and step + 1 < num_steps) or stop:
            state = {"scheduler": scheduler.state_dict(), "step": step + 1, "run_name": run_name,
                     "log_bytes": metrics.position()}
            save_model(ckpt_dir, tokenizer, config, ("", model),
                       training=(state, model_w, optimizer))
        if stop:
            signals.stop(ckpt_dir, step + 1)
    signals.restore()

    # 5. save first (atomically; replacing the output folder also removes the resumable checkpoint inside it), so
    #    nothing that follows can cost the trained model
    save_model(args.output_dir, tokenizer, config, ("", model))
    print(f"saved to {args.output_dir}")

    # 6. final check: sample prompts at temperature 1; does each completion end (end token) within the budget?
    #    Every process samples the same prompts with its own random draws; the figures are their means.
    model_w.eval()
    prompts = sample_prompts[: args.num_eval_generations]
    texts, ended = [], []
    for k in range(0, len(prompts), 64):
        with autocast(), gathered(model_w) as generator:
            t, e = generator(sample_texts, tokenizer, prompts[k: k + 64], args.max_prompt_length,
                             args.max_completion_length, device)
        texts, ended = texts + t, ended + e
    final = {"eval/sft/eos_rate": sum(ended) / len(ended)} if prompts else {}  # --num-eval-generations 0 skips it
    if eval_reward_fn and prompts:
        judge = load_function(eval_reward_fn)
        gold = torch.tensor([judge(p, t) for p, t in zip(prompts, texts)])
        final |= {"eval/sft/gold_mean": gold.mean(), "eval/sft/gold_positive_frac": (gold > 0.3).float().mean(),
                  "eval/sft/gold_negative_frac": (gold < -0.3).float().mean()}
    final = {k: all_reduce(torch.as_tensor(v, dtype=torch.float, device=device), "mean")
             for k, v in final.items()}
    metrics.log(num_steps, final)
    print(("" if eval_records else "on training prompts: ") + "  ".join(f"{k} {v:.3f}" for k, v in final.items()))
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
