"""Stage 2 of RLHF: a Bradley-Terry reward model trained on pairwise human preferences.

    python reward_model.py                                  # after `python sft.py`; embedded reviews task, CPU
    python reward_model.py --model-name-or-path models/smollm2-sft --dataset prefs.jsonl --learning-rate 1e-5

The SFT model with a scalar head, trained with -log sigmoid(r_chosen - r_rejected) (Christiano et al. 2017;
Stiennon et al. 2020, sec. 3.4; Ouyang et al. 2022, sec. 3.5). Where this departs from the common recipe:
1. The score is read at the last real token (the response's EOS), located from the attention mask, never from
   `config.pad_token_id` (which fails when pad == eos or with left padding).
2. The head is drawn from N(0, 1/sqrt(d+1)) as in OpenAI's lm-human-preferences; Hugging Face's head has no bias,
   so the normalising offset is stored as `config.reward_offset` and subtracted by `common.reward_scores`.
3. After training the scores are normalised: mean 0 over the SFT policy's own samples, so a given --kl-coef in
   stage 3 means the same thing across reward models (Ziegler et al. 2019, sec. 2.2).
4. Each distinct response of a micro-batch is forwarded once (a ranking of K responses gives K(K-1)/2 pairs from K
   sequences), and the sequences are packed into rows without padding (`plumbing.pack`).
"""

import math
import random
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
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from common import (encode_prompt, encode_response, end_token_id, pad, read_data, reward_scores, sample, score_suffix,
                    setup_tokenizer)
from plumbing import (TASK_DATA, Clock, Metrics, StopSignals, add_lora, all_reduce, batch_indices, check_room, cli,
                      clip_gradients, decay_groups, default_learning_rate, disable_dropout, distribute, gathered,
                      load_function, load_state, pack, packing_works, prepare_output, quiet_missing_head, require_stage,
                      resume_point, save_model, setup, stop_if_not_finite, sync_gradients, user_errors_in_one_line)


@dataclass
class Args:
    # experiment
    exp_name: str = "reward_model"
    """the name of this experiment, used in the run name"""
    seed: int = 1
    """seed of the experiment: same seed, same CPU run"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project: str = "rlhf"
    """the Weights & Biases project"""
    output_dir: str = "models/reward_model"
    """where the reward model is saved (loads with AutoModelForSequenceClassification)"""
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
    model_name_or_path: str = "models/sft"
    """the SFT model the reward model starts from (a local folder or a Hub name); it also samples the normalisation
    set"""
    continue_from: str = ""
    """a reward model (from this script) to keep training, head and all, instead of a fresh head on the SFT model:
    iterative RLHF's later rounds; '' = start fresh"""
    trust_remote_code: bool = False
    """allow a Hub model to run its own code (only for models you trust)"""
    dataset: tuple[str, ...] = (f"{TASK_DATA}/preference_train.jsonl",)
    """prompt/chosen/rejected, or chosen/rejected conversations: JSONL, JSON, Parquet or CSV files, `save_to_disk`
    folders or Hub dataset ids (docs/details.md#data-sources); several are read as one (all rounds' labels, say)"""
    eval_dataset: str = "auto"
    """held-out preferences in the same format, or 'none'. 'auto': for the embedded task's data its held-out file; for
    yours the --eval-split of the first --dataset if given, else none"""
    dataset_config: str | None = None
    """the configuration (subset) of a Hub dataset given as --dataset or --eval-dataset"""
    dataset_split: str = "train"
    """the split of --dataset to train on, when it has splits (a Hub dataset, a saved DatasetDict)"""
    eval_split: str = ""
    """held out: the split of --dataset to evaluate on (e.g. 'test'); with --eval-dataset, the split read from it
    (default 'train', a file's only split)"""
    skip_bad_pairs: bool = False
    """count and skip bad lines (missing field, chosen == rejected, empty text) instead of stopping with an error"""
    max_prompt_length: int = 64
    """in tokens; longer prompts are cut from the left (or skipped with --skip-long-prompts)"""
    skip_long_prompts: bool = False
    """drop pairs whose prompt is longer than max_prompt_length instead of truncating it"""
    max_completion_length: int = 48
    """in tokens, EOS included; longer responses are cut from the right"""

    # optimization
    lora_r: int = 0
    """LoRA: train rank-r adapters on the decoder's linear layers instead of every weight (`pip install peft`); 0: off"""
    lora_alpha: float = 32.0
    """LoRA: the adapters' product is scaled by lora_alpha / lora_r"""
    lora_target_modules: str = "all-linear"
    """LoRA: the layers to adapt, by name ('q_proj,v_proj'), or 'all-linear' (every linear layer of the decoder)"""
    learning_rate: float | None = None
    """peak AdamW learning rate; default 5e-4 for the embedded tiny model, 1e-5 otherwise; 10x either with LoRA"""
    weight_decay: float = 0.0
    """AdamW weight decay (of weight matrices: not of biases and norm weights, as transformers' Trainer)"""
    num_epochs: int = 1
    """passes over the preference pairs (1, as in the literature: more overfits)"""
    max_steps: int = -1
    """optimizer steps; -1 means num_epochs over the data"""
    per_device_train_batch_size: int = 8
    """comparison groups per micro-batch, per process: a group is one pair, or all pairs of one ranking; every
    distinct response in the micro-batch goes through one forward pass"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    padding_free: bool = True
    """pack each micro-batch's sequences into rows without padding (checked at start; falls back to padding for a
    model that lets packed sequences attend to each other)"""
    warmup_ratio: float = 0.05
    """fraction of the steps spent warming the learning rate up linearly from 0"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    max_group_pairs: int = 36
    """cap on the pairs of one comparison group (36 = a ranking of 9, InstructGPT's largest K); 1 = no grouping"""
    margin: float = 0.0
    """Bradley-Terry margin m in -log sigmoid(r_chosen - r_rejected - m) (Touvron et al. 2023, sec. 3.2.2); 0 = off"""

    # evaluation and normalisation
    eval_steps: int = 200
    """held-out accuracy every this many steps"""
    normalize_on: Literal["sft_samples", "dataset", "none"] = "sft_samples"
    """'sft_samples' (the SFT policy's samples on the training prompts), 'dataset' (the training responses) or 'none'"""
    num_normalize_samples: int = 256
    """responses scored to compute the normalising offset: with 'sft_samples' one sample per distinct training prompt,
    so fewer when the data has fewer distinct prompts"""
    normalize_temperature: float = 0.7
    """sampling temperature of the SFT samples used for normalisation: stage 3's --temperature (same default)"""
    normalize_response_length: int = 24
    """most tokens of those samples: stage 3's --response-length (same default)"""
    normalize_max_prompt_length: int = 64
    """prompt length of those samples: stage 3's --max-prompt-length (same default)"""
    eval_reward_fn: str = "auto"
    """gold judge (prompt, response) -> float, to compare against on held-out pairs; 'auto': the embedded task's
    judge (reviews_task.py:gold_score) on its own data, none on yours; '' to skip"""
    gold_tau: float = 0.3
    """Bradley-Terry temperature of the annotators, for the noise ceiling (with a judge; the embedded task's is 0.3);
    0 to skip"""


def encode_pairs(records, tokenizer, args):
    """Records -> (list of (prompt_ids, chosen_ids, rejected_ids), prompts cut, prompts skipped, responses cut). A text
    that recurs (a prompt, or a response ranked against several others) is tokenised once."""
    pairs, cut, skipped, responses_cut, cache, suffix = [], 0, 0, 0, {}, score_suffix(tokenizer)
    def encode(fn, text, limit):
        key = (fn, repr(text))  # repr: conversational prompts are lists of messages
        if key not in cache:
            cache[key] = fn(tokenizer, text, limit)
        return cache[key]
    for r in records:
        prompt_ids, long_prompt = encode(encode_prompt, r["prompt"], args.max_prompt_length)
        if prompt_ids is None or (long_prompt and args.skip_long_prompts):  # None: cannot fit even cut
            skipped += 1
            continue
        cut += long_prompt
        chosen, long_chosen = encode(encode_response, r["chosen"], args.max_completion_length)
        rejected, long_rejected = encode(encode_response, r["rejected"], args.max_completion_length)
        # a response that ended is read where a standard load reads it: after the template's text that follows the end
        chosen, rejected = ((ids + suffix) if not cut else ids for ids, cut in ((chosen, long_chosen),
                                                                                 (rejected, long_rejected)))
        responses_cut += long_chosen + long_rejected
        pairs.append((prompt_ids, chosen, rejected))
    return pairs, cut, skipped, responses_cut


def group_pairs(pairs, max_pairs: int) -> list[list[int]]:
    """Comparison groups: runs of consecutive pairs with the same prompt (a labeller's ranking of K responses to one
    prompt, written out as its K(K-1)/2 pairs), at most max_pairs each. Independent pairs are groups of one.

    InstructGPT (Ouyang et al. 2022, sec. 3.5) keeps a ranking's pairs together in one batch: each response then goes
    through the model once for all of its K-1 comparisons, and one epoch sees each response once (shuffled as
    separate pairs, each response would recur in K-1 batches, and the reward model overfits)."""
    groups = []
    for i, (prompt, _, _) in enumerate(pairs):
        if groups and pairs[groups[-1][0]][0] == prompt and len(groups[-1]) < max_pairs:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def collate(pairs, pad_id: int, padding_free: bool = False):
    """Pairs -> (batch, chosen, rejected). `batch` holds the distinct prompt+response sequences among the pairs, the
    inputs of `common.reward_scores`: right-padded ids and mask, or (padding-free) packed ids, position ids and each
    sequence's last token. chosen[i] and rejected[i] index pair i's two sequences: a response shared by several
    pairs is scored once."""
    index, seqs = {}, []
    def seq_index(seq):
        if tuple(seq) not in index:
            index[tuple(seq)] = len(seqs)
            seqs.append(seq)
        return index[tuple(seq)]
    chosen = torch.tensor([seq_index(p + c) for p, c, _ in pairs])
    rejected = torch.tensor([seq_index(p + r) for p, _, r in pairs])
    if padding_free:
        input_ids, position_ids, starts = pack(seqs, pad_id)
        last = starts.clone()
        last[:, 1] += torch.tensor([len(s) - 1 for s in seqs])  # (N, 2): row and column of each last token
        batch = {"input_ids": input_ids, "position_ids": position_ids, "last": last}
    else:
        input_ids, attention_mask = pad(seqs, pad_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    return batch, chosen, rejected


def init_score_head(model) -> None:
    """lm-human-preferences' init: weights N(0, 1/sqrt(d + 1)), zero bias, and no normalising offset yet."""
    d = model.config.get_text_config().hidden_size
    torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(d + 1))
    if getattr(model.score, "bias", None) is not None:
        torch.nn.init.zeros_(model.score.bias)
    model.config.reward_offset = 0.0


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation: the Pearson correlation of the ranks."""
    rx, ry = x.argsort().argsort().float(), y.argsort().argsort().float()
    return torch.corrcoef(torch.stack([rx, ry]))[0, 1].item()


def main(args: Args) -> None:
    rank, world_size, device, run_name, autocast, trained, frozen = setup(args)  # torchrun, seeds, --bf16's autocast
    require_stage(args.model_name_or_path, "models/sft", "python sft.py", "--model-name-or-path")
    _, eval_dataset, eval_reward_fn = prepare_output(args, rank, world_size, "preference_train.jsonl",
                                                     "preference_eval.jsonl")
    # the data and the judge first: bad lines stop the run with file, line and field (or are counted and skipped)
    # before a model loads
    bad_lines = [] if args.skip_bad_pairs else None
    train_records = [r for path in args.dataset
                     for r in read_data(path, "preference", bad_lines, args.dataset_config, args.dataset_split)]
    eval_records = read_data(eval_dataset, "preference", bad_lines, args.dataset_config, args.eval_split or "train",
                             True) if eval_dataset != "none" else []
    if bad_lines:
        print(f"skipped {len(bad_lines)} bad lines, the first: {bad_lines[0]}")
    judge = load_function(eval_reward_fn) if eval_reward_fn else None

    # 1. the SFT model with a fresh scalar head (or a reward model to continue, or an interrupted run's checkpoint)
    ckpt_dir, resuming = resume_point(args)  # the checkpoint checked before anything loads from it
    if args.continue_from and not resuming:
        require_stage(args.continue_from, "", "python reward_model.py", "--continue-from")
    base = args.continue_from or args.model_name_or_path
    load_from = ckpt_dir if resuming and not args.lora_r else base  # LoRA: the base, then the adapter
    tokenizer = AutoTokenizer.from_pretrained(load_from, trust_remote_code=args.trust_remote_code)
    new_head = load_from == args.model_name_or_path
    with quiet_missing_head(new_head):  # transformers reports the head missing: expected
        model = AutoModelForSequenceClassification.from_pretrained(load_from, num_labels=1, **trained).to(device)
    if new_head and not resuming:
        print(f"reward model: {load_from} with a new scalar head (`score`), randomly initialised")
    setup_tokenizer(tokenizer, model)
    check_room(args.output_dir, model)
    disable_dropout(model)
    learning_rate = default_learning_rate(args, model, tiny=5e-4, pretrained=1e-5)
    padding_free = args.padding_free and packing_works(model)
    if args.padding_free and not padding_free:
        print("warning: this model lets packed sequences attend to each other; padding instead (--no-padding-free)")
    if not resuming and not args.continue_from:
        init_score_head(model)  # the same draws in every process: all seeded alike
    if args.lora_r:  # the score head trained whole, beside the backbone's adapters
        add_lora(model, args.lora_r, args.lora_alpha, args.lora_target_modules, base, head="score",
                 resume_dir=ckpt_dir if resuming else "")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model_w = distribute([model], args.strategy, args.bf16)  # every pass runs as model_w(fn, ...) = fn(model, ...)

    # 2. data: pairs tokenized once, rankings kept together as comparison groups
    train, cut, skipped, responses_cut = encode_pairs(train_records, tokenizer, args)
    for count, total, what, flag in [
            (cut, len(train_records), "prompts were cut from the left", "--max-prompt-length"),
            (responses_cut, 2 * len(train_records), "responses were cut, losing their end token", "--max-completion-length")]:
        if count > 0.1 * total:
            print(f"warning: {count} of {total} {what}: raise {flag} for this data")
    evals = encode_pairs(eval_records, tokenizer, args)[0]
    groups = group_pairs(train, args.max_group_pairs)
    print(f"{len(train)} training pairs in {len(groups)} comparison groups ({cut} prompts cut from the left, "
          f"{skipped} skipped), " + (f"{len(evals)} held out" if evals else "no held-out set (--eval-dataset FILE)"))
    if not groups:
        raise SystemExit(f"{', '.join(args.dataset)}: no pair left to train on")
    if len(groups) < world_size:
        raise SystemExit(f"{', '.join(args.dataset)}: {len(groups)} comparison groups cannot be shared by {world_size} "
                         "processes")
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
        """This process's share of the i-th global micro-batch of comparison groups, collated and on the device."""
        idx = batch_indices(i, len(groups), micro_batch_size, args.seed, rank, world_size)
        batch, chosen, rejected = collate([train[k] for g in idx for k in groups[g]], tokenizer.pad_token_id,
                                          padding_free)
        return {k: t.to(device) for k, t in batch.items()}, chosen.to(device), rejected.to(device)

    # 3. optimizer: AdamW, linear warm-up then linear decay to 0
    optimizer = torch.optim.AdamW(decay_groups(model_w, args.weight_decay), lr=learning_rate,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel over all parameters
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / (warmup_steps + 1) if s < warmup_steps
                                                  else max(0.0, 1 - (s - warmup_steps) / max(1, num_steps - warmup_steps)))
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

    @torch.no_grad()
    def score_pairs(pairs, batch: int = 64):
        """Held-out pairs -> (chosen_rewards, rejected_rewards), each (N,). Every process scores all of them (FSDP2
        needs all processes in each forward), so each has the whole evaluation."""
        model_w.eval()
        chosen, rejected = [], []
        for k in range(0, len(pairs), batch):
            inputs, chosen_rows, rejected_rows = collate(pairs[k: k + batch], tokenizer.pad_token_id, padding_free)
            with autocast():
                scores = model_w(reward_scores, **{name: t.to(device) for name, t in inputs.items()}).cpu()
            chosen.append(scores[chosen_rows])
            rejected.append(scores[rejected_rows])
        model_w.train()
        return torch.cat(chosen), torch.cat(rejected)

    def evaluate(step: int):
        started = time.time()
        chosen_rewards, rejected_rewards = score_pairs(evals)
        out = {"eval/rm/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
               "eval/rm/margin": (chosen_rewards - rejected_rewards).mean(),
               "eval/rm/chosen_rewards": chosen_rewards.mean(), "eval/rm/rejected_rewards": rejected_rewards.mean()}
        metrics.log(step, out)
        tqdm.write(f"step {step} ({time.time() - started:.0f} s): " + "  ".join(f"{k.split('/')[-1]} {v:.4f}"
                                                                            for k, v in out.items()))
        return chosen_rewards, rejected_rewards

    # 4. training loop
    if start_step == 0 and evals:
        evaluate(0)
    model_w.train()
    progress = tqdm(range(start_step, num_steps), initial=start_step, total=num_steps, desc="reward model",
                    disable=rank != 0 or None)  # None: on in a terminal, off in a log file
    step_end, clock = time.perf_counter(), Clock(start_step, num_steps)
    signals = StopSignals()  # SIGTERM, Ctrl-C: a checkpoint at the end of the step, then exit
    for step in progress:
        micro = [micro_batch(step * args.gradient_accumulation_steps + m) for m in range(args.gradient_accumulation_steps)]
        # pairs in the whole accumulated batch of every process
        num_pairs = all_reduce(torch.tensor(sum(len(chosen_rows) for _, chosen_rows, _ in micro), device=device))
        stats = torch.zeros(3, device=device)  # loss, accuracy, margin; kept on device, no sync per micro-batch
        for m, (batch, chosen_rows, rejected_rows) in enumerate(micro):
            sync_gradients(model_w, m == len(micro) - 1)
            with autocast():
                scores = model_w(reward_scores, **batch)  # (N,): every distinct response, one pass
            chosen_rewards, rejected_rewards = scores[chosen_rows], scores[rejected_rows]  # (P,) each, P pairs
            # Bradley-Terry: P(chosen preferred) = sigmoid(r_chosen - r_rejected); maximise its log-likelihood,
            # summed over pairs and divided by the pairs of the whole batch, so accumulation equals one big batch
            loss = -F.logsigmoid(chosen_rewards - rejected_rewards - args.margin).sum() / num_pairs
            (loss * world_size).backward()  # DDP and FSDP2 average gradients over processes: this makes it their sum
            stats += torch.stack([loss.detach(), (chosen_rewards > rejected_rewards).float().sum() / num_pairs,
                                  (chosen_rewards - rejected_rewards).sum().detach() / num_pairs])
        stats = all_reduce(stats)
        grad_norm = clip_gradients(model_w.parameters(), args.max_grad_norm)  # the norm before clipping
        stop_if_not_finite(step + 1, args.output_dir, loss=stats[0].item(), grad_norm=grad_norm.item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds, step_end = time.perf_counter() - step_end, time.perf_counter()  # includes any evaluation
        progress.set_postfix(loss=f"{stats[0]:.3f}", acc=f"{stats[1]:.2f}")
        if progress.disable and (step + 1) % args.eval_steps == 0:  # no progress bar (a log file): the loss here
            print(f"step {step + 1}/{num_steps}: train loss {stats[0]:.4f}, accuracy {stats[1]:.3f}  {clock(step + 1)}")
        metrics.log(step + 1, {"train/rm/loss": stats[0], "train/rm/accuracy": stats[1], "train/rm/margin": stats[2],
                               "train/rm/grad_norm": grad_norm.item(), "charts/lr": scheduler.get_last_lr()[0],
                               "time/step": step_seconds})
        if (step + 1) % args.eval_steps == 0 and step + 1 < num_steps and evals:
            evaluate(step + 1)
        if signals.checkpoint_due(step + 1, num_steps, args.save_steps, device):  # periodic, or asked to stop
            state = {"scheduler": scheduler.state_dict(), "step": step + 1, "run_name": run_name,
                     "log_bytes": metrics.position()}
            save_model(ckpt_dir, tokenizer, config, ("", model), training=(state, model_w, optimizer))
            signals.stop_if_asked(ckpt_dir, step + 1)
    signals.restore()
    progress.close()

    # 5. normalise: shift scores so the mean over the SFT policy's own samples (or the dataset's responses) is 0.
    #    The samples are drawn as stage 3 draws its rollouts (`common.sample`, same temperature, length and prompt
    #    length by default), so PPO's first rollouts score about 0. Under torchrun each process draws and scores its
    #    share, and the offset is the mean over all of them.
    model_w.eval()
    rng = random.Random(args.seed)
    end_id = end_token_id(tokenizer)
    if args.normalize_on == "sft_samples":
        policy = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **frozen).to(device).eval()
        setup_tokenizer(tokenizer, policy)
        policy = distribute([policy], args.strategy, args.bf16, trainable=False)
        prompts = {repr(r["prompt"]): r["prompt"] for r in train_records}  # distinct prompts, in file order
        prompts = [encode_prompt(tokenizer, p, args.normalize_max_prompt_length)[0] for p in prompts.values()]
        prompts = [p for p in prompts if p is not None]
        rng.shuffle(prompts)
        prompts = prompts[: args.num_normalize_samples]
        prompts = prompts[rank: len(prompts) // world_size * world_size: world_size]  # this process's share, all equal
        sequences = []
        for k in range(0, len(prompts), 64):
            queries, query_mask = pad(prompts[k: k + 64], tokenizer.pad_token_id, side="left")
            with gathered(policy) as generator:
                out = generator(sample, queries.to(device), query_mask.to(device), args.normalize_response_length,
                                args.normalize_temperature, end_id, tokenizer.pad_token_id)
            for p, r in zip(prompts[k: k + 64], out[:, queries.shape[1]:].tolist()):
                n = r.index(end_id) + 1 if end_id in r else len(r)
                # a response ends at (and includes) its first end token; one that ended is read after `score_suffix`
                sequences.append(list(p) + r[:n] + (score_suffix(tokenizer) if end_id in r else []))
        del policy
    elif args.normalize_on == "dataset":
        sequences = [list(p) + (c if rng.random() < 0.5 else r) for p, c, r in train]
        rng.shuffle(sequences)
        sequences = sequences[: args.num_normalize_samples]
        sequences = sequences[rank: len(sequences) // world_size * world_size: world_size]
    else:
        sequences = []
    if sequences:
        with torch.no_grad(), autocast():
            raw = torch.cat([model_w(reward_scores, *[t.to(device) for t in pad(sequences[k: k + 64], tokenizer.pad_token_id)])
                             for k in range(0, len(sequences), 64)])
        count = all_reduce(torch.tensor(len(raw), device=device))
        mean = all_reduce(raw.sum()) / count  # over every process's samples
        std = (all_reduce(((raw - mean) ** 2).sum()) / (count - 1).clamp(min=1)).sqrt()
        model.config.reward_offset = model.config.reward_offset + mean.item()
        print(f"normalised on {count.item()} {args.normalize_on}: offset {model.config.reward_offset:.4f} "
              f"(score std {std.item():.4f})")

    # 6. save before any analysis (atomically; replacing the output folder also removes the checkpoint inside it):
    #    nothing that follows may cost the trained model
    save_model(args.output_dir, tokenizer, config, ("", model))
    print(f"saved to {args.output_dir}")

    # 7. final held-out report: accuracy, by response length, calibration, and (with a judge) agreement with gold
    if evals:
        chosen_rewards, rejected_rewards = evaluate(num_steps)
        correct = (chosen_rewards > rejected_rewards).float()
        lengths = torch.tensor([max(len(c), len(r)) for _, c, r in evals])
        print("accuracy by response length (tokens, the longer of the pair):")
        for lo, hi in [(0, 8), (9, 16), (17, 24), (25, 10**6)]:
            sel = (lengths >= lo) & (lengths <= hi)
            if sel.any():
                print(f"  {lo:>3}-{hi if hi < 10**6 else '':<4} n={int(sel.sum()):>5}  accuracy {correct[sel].mean():.3f}")
                metrics.log(num_steps, {f"eval/rm/accuracy_len_{lo}": correct[sel].mean()})
        # calibration: orient each pair at random so both outcomes occur, then bin P(A preferred) = sigmoid(r_A - r_B)
        flip = torch.rand(len(evals), generator=torch.Generator().manual_seed(args.seed)) < 0.5
        prob = torch.sigmoid(torch.where(flip, rejected_rewards - chosen_rewards, chosen_rewards - rejected_rewards))
        outcome = (~flip).float()  # 1 when A is the chosen response
        print("calibration (predicted P(A preferred) vs observed frequency):")
        ece = 0.0
        for b in range(10):
            sel = (prob >= b / 10) & (prob < (b + 1) / 10 if b < 9 else prob <= 1)
            if sel.any():
                ece += sel.float().mean() * (prob[sel].mean() - outcome[sel].mean()).abs()
                print(f"  [{b / 10:.1f}, {(b + 1) / 10:.1f})  n={int(sel.sum()):>5}  predicted {prob[sel].mean():.3f}  "
                      f"observed {outcome[sel].mean():.3f}")
        final = {"eval/rm/ece": ece}
        if judge:
            gold_chosen = torch.tensor([judge(r["prompt"], r["chosen"]) for r in eval_records])
            gold_rejected = torch.tensor([judge(r["prompt"], r["rejected"]) for r in eval_records])
            final["eval/rm/gold_agreement"] = (gold_chosen > gold_rejected).float().mean()  # gold agrees with labels
            final["eval/rm/spearman_with_gold"] = spearman(torch.cat([chosen_rewards, rejected_rewards]),
                                                           torch.cat([gold_chosen, gold_rejected]))
            if args.gold_tau > 0:  # a judge that knows gold exactly is right with probability max(p, 1 - p) per pair
                p = torch.sigmoid((gold_chosen - gold_rejected) / args.gold_tau)
                final["eval/rm/noise_ceiling"] = torch.maximum(p, 1 - p).mean()
        metrics.log(num_steps, final)
        print("  ".join(f"{k} {v:.4f}" for k, v in final.items()))
    metrics.close()
    print(f"logs in runs/{run_name}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    with user_errors_in_one_line():
        main(cli(Args))  # the flags; on the CPU, glibc keeps freed memory (plumbing.cli)
