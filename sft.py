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

import math
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal

signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted"))  # Ctrl-C while torch loads: one line, no traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import encode_prompt, encode_response, end_token_id, pad, read_data, sample, setup_tokenizer
from plumbing import (TASK_DATA, TINY_MODEL, Clock, Metrics, StopSignals, add_lora, all_reduce, batch_indices,
                      check_room, cli, clip_gradients, decay_groups, default_learning_rate, distribute, gathered,
                      load_function, load_state, pack, packing_works, prepare_output, require_stage, resume_point,
                      save_model, setup, stop_if_not_finite, sync_gradients, user_errors_in_one_line)


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
    """held-out data in the same format, or 'none'. 'auto': for the embedded task's data its held-out file; for yours
    the --eval-split of --dataset if given, else none (the final sampling check then samples training prompts)"""
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
    rank, world_size, device, run_name, autocast, trained, _ = setup(args)  # torchrun, seeds, --bf16's autocast
    _, eval_dataset, eval_reward_fn = prepare_output(args, rank, world_size, "sft_train.jsonl", "sft_eval.jsonl")
    # the data and the judge first: a bad record or a missing function stops the run before a model loads
    train_records = read_data(args.dataset, "sft", None, args.dataset_config, args.dataset_split)
    eval_records = read_data(eval_dataset, "sft", None, args.dataset_config, args.eval_split or "train", True) if (
        eval_dataset != "none") else []
    judge = load_function(eval_reward_fn) if eval_reward_fn else None

    # 1. model and tokenizer (from an interrupted run's checkpoint if there is one)
    ckpt_dir, resuming = resume_point(args)  # the checkpoint checked before anything loads from it
    if not resuming:
        require_stage(args.model_name_or_path, TINY_MODEL, "python sft.py", "--model-name-or-path")
    load_from = ckpt_dir if resuming and not args.lora_r else args.model_name_or_path  # LoRA: base, then adapter
    tokenizer = AutoTokenizer.from_pretrained(load_from, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(load_from, **trained).to(device)
    setup_tokenizer(tokenizer, model)
    check_room(args.output_dir, model)
    if args.lora_r:
        add_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules, args.model_name_or_path,
                 resume_dir=ckpt_dir if resuming else "")
    learning_rate = default_learning_rate(args, model, tiny=2e-3, pretrained=1e-5)
    padding_free = args.padding_free and packing_works(model)
    if args.padding_free and not padding_free:
        print("warning: this model lets packed examples attend to each other; padding instead (--no-padding-free)")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model_w = distribute([model], args.strategy, args.bf16)  # every training pass runs as model_w(fn, ...) = fn(model, ...)

    # 2. data: tokenize once; prompt and completion separately, the end token appended
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
        """This process's share of the run's i-th global micro-batch, collated and on the device."""
        chosen = batch_indices(i, len(train), micro_batch_size, args.seed, rank, world_size)
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
        started = time.time()
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
            tqdm.write(f"step {step}: eval loss {nll / n:.4f} ({time.time() - started:.0f} s)")
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
    step_end, clock = time.perf_counter(), Clock(start_step, num_steps)
    uniform_loss, collapsed = math.log(model.get_output_embeddings().weight.shape[0]), 0  # nats/token of a uniform model
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
        grad_norm = clip_gradients(model_w.parameters(), args.max_grad_norm)  # the norm before clipping
        stop_if_not_finite(step + 1, args.output_dir, loss=loss, grad_norm=grad_norm.item())
        # a finite collapse: the model uniform over its vocabulary, no gradient left to climb out with
        collapsed = (collapsed + 1) if loss > 0.99 * uniform_loss and grad_norm.item() < 1e-6 else 0
        if collapsed == 3:
            raise SystemExit(f"error: step {step + 1}: the loss is log(vocabulary), the model uniform over its tokens, "
                             "and the gradient 0 for 3 steps: training collapsed (a lower --learning-rate?); nothing "
                             f"saved: {args.output_dir} and its last checkpoint are as they were")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds, step_end = time.perf_counter() - step_end, time.perf_counter()  # includes any evaluation
        progress.set_postfix(loss=f"{loss:.3f}")
        if progress.disable and (step + 1) % args.eval_steps == 0:  # no progress bar (a log file): the loss here
            print(f"step {step + 1}/{num_steps}: train loss {loss:.4f}  {clock(step + 1)}")
        metrics.log(step + 1, {"train/sft/loss": loss, "train/sft/grad_norm": grad_norm.item(), "time/step": step_seconds,
                               "charts/lr": scheduler.get_last_lr()[0], "train/sft/tokens": num_tokens.item()})
        if (step + 1) % args.eval_steps == 0 or step + 1 == num_steps:
            evaluate(step + 1)
        if signals.checkpoint_due(step + 1, num_steps, args.save_steps, device):  # periodic, or asked to stop
            state = {"scheduler": scheduler.state_dict(), "step": step + 1, "run_name": run_name,
                     "log_bytes": metrics.position()}
            save_model(ckpt_dir, tokenizer, config, ("", model), training=(state, model_w, optimizer))
            signals.stop_if_asked(ckpt_dir, step + 1)
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
    if judge and prompts:
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


if __name__ == "__main__":
    with user_errors_in_one_line():
        main(cli(Args))  # the flags; on the CPU, glibc keeps freed memory (plumbing.cli)
