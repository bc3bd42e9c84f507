"""What would reusing generation's own scores cost in exactness? A check on a real model, not a test.

    python benchmarks/check_generation_logprobs.py --model /tmp/smollm2_check/sft \
        --prompts /tmp/smollm2_check/chat_prompts.jsonl

ppo_rlhf.py samples the responses, then recomputes the policy's log-probs of them with one more forward (the fourth
of its rollout forwards, besides reference, value and reward), in micro-batches laid out as the update lays them out,
so that the first PPO minibatch sees a ratio of exactly 1. TRL instead keeps the logits `generate()` produced while
decoding. This samples the same way, keeps generate()'s logits, and compares the log-probs of the sampled tokens
three ways: from those logits, from `ppo_rlhf.forward` on the update's packed layout, and again from that forward
(which is what the first minibatch recomputes). It prints the largest differences and what they make of the ratio,
and the time of the forward the reuse would save.
"""

import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import encode_prompt, end_token_id, read_jsonl, setup_tokenizer  # noqa: E402
from common import pad, truncate_after_eos  # noqa: E402
from plumbing import disable_dropout, layout  # noqa: E402
from ppo_rlhf import forward  # noqa: E402


@dataclass
class Args:
    model: str
    """a causal LM folder"""
    prompts: str
    """a JSONL prompt file"""
    num_prompts: int = 8
    """prompts sampled (one micro-batch of the update by default: --micro-batch-size is 4 in the SmolLM2 benchmark)"""
    micro_batch_size: int = 4
    response_length: int = 24
    temperature: float = 0.7
    seed: int = 0


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    disable_dropout(model)
    setup_tokenizer(tokenizer, model)
    end_id, pad_id = end_token_id(tokenizer), tokenizer.pad_token_id
    prompts = [encode_prompt(tokenizer, r["prompt"], 256)[0] for r in read_jsonl(args.prompts, "prompt")]
    queries, query_mask = pad(prompts[: args.num_prompts], pad_id, side="left")
    model.generation_config = GenerationConfig()
    with torch.no_grad():
        out = model.generate(input_ids=queries, attention_mask=query_mask, generation_config=GenerationConfig(
            do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.response_length,
            eos_token_id=end_id, pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True))
    context = queries.shape[1]
    responses, mask, _ = truncate_after_eos(out.sequences[:, context:], end_id, pad_id)
    gen_logits = torch.stack(out.logits, 1)[:, : responses.shape[1]].float() / args.temperature
    from_generate = torch.log_softmax(gen_logits, -1).gather(2, responses.unsqueeze(-1)).squeeze(-1)
    qr = torch.cat([queries, responses], 1)
    attention = torch.cat([query_mask, mask.long()], 1)
    recomputed, again, seconds = [], [], []
    with torch.no_grad():
        for k in range(0, len(qr), args.micro_batch_size):
            chunk = slice(k, k + args.micro_batch_size)
            lay = layout(qr[chunk], attention[chunk], context, padding_free=True)
            t0 = time.perf_counter()
            recomputed.append(forward(model, None, lay, responses[chunk], args.temperature, with_values=False)[0])
            seconds.append(time.perf_counter() - t0)
            again.append(forward(model, None, lay, responses[chunk], args.temperature, with_values=False)[0])
    recomputed, again = torch.cat(recomputed), torch.cat(again)
    valid = mask
    print(f"{int(valid.sum())} sampled tokens, {args.num_prompts} prompts, {args.model}")
    for name, a, b in (("generate()'s logits vs the update's forward", from_generate, recomputed),
                       ("the update's forward, twice", recomputed, again)):
        diff = (a - b)[valid].abs()
        ratio = torch.exp((b - a)[valid])
        print(f"{name}: log-prob max |diff| {diff.max():.2e}, mean {diff.mean():.2e}; "
              f"first-minibatch ratio in [{ratio.min():.7f}, {ratio.max():.7f}]")
    print(f"the recompute forward: {sum(seconds):.3f} s for {args.num_prompts} prompts")
