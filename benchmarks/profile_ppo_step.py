"""One PPO update micro-batch (forward, backward, fused AdamW) on a real model, timed and profiled per op.

    python benchmarks/profile_ppo_step.py --policy /tmp/smollm2_check/sft --value /tmp/smollm2_check/rm \
        --prompts /tmp/smollm2_check/chat_prompts.jsonl

What the update of ppo_rlhf.py does per micro-batch, in four variants, alternated step by step:
- `full head`: the LM head over every position of the packed rows, then the response positions gathered (the
  script before the head was moved; kept here only as the baseline).
- `response head`: `ppo_rlhf.forward` as it is, the head applied only where a response token is predicted.
- each with the separate value model (the default) and without it (what the value model's backbone costs).
Prints the median step time of each, split into forward+backward, gradient clipping and the AdamW step; with
--profile, the top ops of one step of each head variant; with --norms, what a cheaper gradient norm would save;
with --generation, the top ops of sampling, and sampling's time with a KV cache that does not concatenate.
"""

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import encode_prompt, sample  # noqa: E402
from common import pad  # noqa: E402
from plumbing import disable_dropout, keep_freed_memory, layout  # noqa: E402
from ppo_rlhf import forward, logprobs_and_entropy, masked_mean  # noqa: E402


@dataclass
class Args:
    policy: str
    value: str
    """a sequence classifier folder (the reward model, which initialises the value model)"""
    prompts: str
    micro_batch_size: int = 4
    response_length: int = 24
    steps: int = 5
    """timed steps per variant (after one warm-up step each)"""
    profile: bool = False
    norms: bool = False
    """also time the gradient norm of one step as clip_grad_norm_ computes it against a dot product per tensor"""
    generation: bool = False
    """also time and profile the rollout's sampling (common.sample) of --response-length tokens for the
    micro-batch's prompts, and time it with a KV cache that writes into a doubling buffer"""


def full_head_forward(policy, value_net, batch_layout, responses, temperature):
    """The pre-change forward: logits at every position, then gathered."""
    inputs, (rows, cols), _ = batch_layout
    logits = policy(**inputs, use_cache=False).logits[rows, cols]
    logprobs, entropy = logprobs_and_entropy(logits, responses, temperature, entropy_grad=False)
    values = None
    if value_net is not None:
        hidden = getattr(value_net, value_net.base_model_prefix)(**inputs, use_cache=False).last_hidden_state
        values = value_net.score(hidden[rows, cols]).squeeze(-1).float()
    return logprobs, entropy, values


if __name__ == "__main__":
    args = tyro.cli(Args)
    keep_freed_memory(torch.device("cpu"))  # as every stage does on CPU (MALLOC_MMAP_MAX_=65536 leaves glibc's defaults)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    value = AutoModelForSequenceClassification.from_pretrained(args.value, num_labels=1)
    for m in (policy, value):
        disable_dropout(m)
    prompts = [encode_prompt(tokenizer, json.loads(line)["prompt"], 256)[0] for line in open(args.prompts)]
    queries, query_mask = pad(prompts[: args.micro_batch_size], tokenizer.pad_token_id, side="left")
    responses = torch.randint(100, policy.config.vocab_size, (args.micro_batch_size, args.response_length))
    mask = torch.ones_like(responses)
    batch_layout = layout(torch.cat([queries, responses], 1), torch.cat([query_mask, mask], 1), queries.shape[1], True)
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=1e-7, fused=True)

    params = list(policy.parameters()) + list(value.parameters())

    def step(fn, with_value):  # -> seconds of forward+backward, of gradient clipping, of the AdamW step
        t0 = time.perf_counter()
        logprobs, _, values = (fn(policy, value if with_value else None, batch_layout, responses, 0.7)
                               if fn is full_head_forward else
                               fn(policy, value, batch_layout, responses, 0.7, with_values=with_value, entropy_grad=False))
        loss = -masked_mean(logprobs, mask.float()) + (masked_mean(values ** 2, mask.float()) if with_value else 0)
        loss.backward()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as ppo_rlhf.py: the norm is over every parameter with a gradient
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    variants = {"full head, policy + value": (full_head_forward, True), "response head, policy + value": (forward, True),
                "full head, policy only": (full_head_forward, False), "response head, policy only": (forward, False)}
    times = {name: [] for name in variants}
    for name, (fn, with_value) in variants.items():
        step(fn, with_value)  # warm-up
    for _ in range(args.steps):  # alternated, so drift hits every variant alike
        for name, (fn, with_value) in variants.items():
            times[name].append(step(fn, with_value))
    tokens = int(batch_layout[0]["input_ids"].numel())
    print(f"{args.policy}: {args.micro_batch_size} sequences, {tokens} packed tokens, {responses.numel()} response "
          f"tokens; median of {args.steps} steps (forward+backward, clip, fused AdamW), seconds")
    for name, ts in times.items():
        parts = [statistics.median(t[i] for t in ts) for i in range(3)]
        print(f"  {name:<32} {statistics.median(sum(t) for t in ts):.3f}   (" + ", ".join(f"{p:.3f}" for p in parts)
              + f")   steps: {', '.join(f'{sum(t):.3f}' for t in ts)}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("full head, policy + value", "response head, policy + value"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(*variants[name])
            print(f"\n{name}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.norms:  # the gradients of one policy + value step, kept
        logprobs, _, values = forward(policy, value, batch_layout, responses, 0.7, entropy_grad=False)
        (-masked_mean(logprobs, mask.float()) + masked_mean(values ** 2, mask.float())).backward()
        grads = [p.grad for p in params]
        norms = {"clip_grad_norm_ (vector_norm per tensor)": lambda: torch.nn.utils.get_total_norm(grads),
                 "dot product per tensor": lambda: torch.stack([g.view(-1).dot(g.view(-1)) for g in grads]).sum().sqrt(),
                 "in float64": lambda: torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt()}
        for name, norm in norms.items():
            seconds = []
            for _ in range(5):
                t0 = time.perf_counter()
                value_of_norm = norm().item()
                seconds.append(time.perf_counter() - t0)
            print(f"  {name:<42} {statistics.median(seconds) * 1e3:6.1f} ms   norm {value_of_norm:.6f}")
    if args.generation:  # no end token, so that every response runs the full length
        from torch.profiler import ProfilerActivity, profile
        from transformers import DynamicCache, GenerationConfig
        from transformers.cache_utils import DynamicLayer

        class DoublingLayer(DynamicLayer):
            """A KV cache layer that writes each token into a buffer which doubles when full, where DynamicLayer
            concatenates (a copy of the whole cache per token)."""

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                    self.room = None
                length, end = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
                if self.room is None or end > self.room[0].shape[-2]:
                    room = [x.new_empty(*x.shape[:-2], 2 * end, x.shape[-1]) for x in (key_states, value_states)]
                    for new, old in zip(room, (self.keys, self.values)):
                        new[..., :length, :] = old if length else 0
                    self.room = room
                for buffer, x in zip(self.room, (key_states, value_states)):
                    buffer[..., length:end, :] = x
                self.keys, self.values = (buffer[..., :end, :] for buffer in self.room)
                return self.keys, self.values

        def generate(doubling: bool):  # what common.sample asks of generate(), with one cache or the other
            cache = DynamicCache(config=policy.config)
            if doubling:
                cache.layers = [DoublingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
            torch.manual_seed(0)
            with torch.no_grad():
                return policy.generate(input_ids=queries, attention_mask=query_mask, past_key_values=cache,
                                       generation_config=GenerationConfig(
                                           do_sample=True, temperature=0.7, top_k=0, top_p=1.0, eos_token_id=-1,
                                           max_new_tokens=args.response_length, pad_token_id=tokenizer.pad_token_id,
                                           return_dict_in_generate=True, output_logits=True))

        policy.eval()
        policy.generation_config = GenerationConfig()
        concatenated, doubled = generate(False), generate(True)
        print(f"\nsampling {tuple(queries.shape)} queries, {args.response_length} tokens: the doubling cache gives the "
              f"same tokens: {torch.equal(concatenated.sequences, doubled.sequences)}, largest logit difference "
              f"{max((a - b).abs().max().item() for a, b in zip(concatenated.logits, doubled.logits))}")
        times = {False: [], True: []}
        for _ in range(args.steps):
            for doubling in times:
                t0 = time.perf_counter()
                generate(doubling)
                times[doubling].append(time.perf_counter() - t0)
        for doubling, ts in times.items():
            print(f"  {'doubling cache' if doubling else 'DynamicCache (concatenates)':<28} "
                  f"{statistics.median(ts):.3f} s   ({', '.join(f'{t:.3f}' for t in ts)})")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sample(policy, queries, query_mask, args.response_length, 0.7, -1, tokenizer.pad_token_id)
        print("common.sample:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
