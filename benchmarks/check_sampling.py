"""Does a model's generation_config.json change what the stages sample? A check on a real model, not a test.

    python benchmarks/check_sampling.py --model /tmp/smollm2_check/sft --prompts /tmp/smollm2_check/chat_prompts.jsonl

The same prompts are sampled twice: with `common.sample` (what every stage uses) and with a plain
`generate(generation_config=GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=T, ...))`, the call the
stages made before. For each it prints the logits processors `generate()` built, and two numbers over all sampled
tokens: how often a token repeats one already in the sequence (observed), and how often it would under
softmax(logits / T), the distribution PPO computes its log-probs from (expected: the probability mass of the tokens
already present, averaged over sampled positions). Drawn from that distribution, the two agree within sampling
error; a repetition penalty drives the observed share below the expected one.
"""

import os
import sys
from dataclasses import dataclass

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import encode_prompt, end_token_id, read_jsonl, sample, setup_tokenizer  # noqa: E402
from common import pad  # noqa: E402


@dataclass
class Args:
    model: str
    """a causal LM folder (its generation_config.json is what is being checked)"""
    prompts: str
    """a JSONL prompt file"""
    num_prompts: int = 64
    """prompts sampled by each method"""
    response_length: int = 24
    """tokens sampled per prompt"""
    temperature: float = 0.7
    """sampling temperature"""
    seed: int = 0
    """seed of both samplings"""


def repeat_shares(model, out, query_mask, context_length: int, end_id: int, temperature: float):
    """(observed, expected, standard error): share of sampled tokens already in their sequence, drawn and expected."""
    responses = out[:, context_length:]
    is_end = (responses == end_id).long()
    response_mask = (is_end.cumsum(1) - is_end) == 0  # up to and including the first end token
    mask = torch.cat([query_mask, response_mask.long()], dim=1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    probs = torch.softmax(logits[:, context_length - 1: -1].float() / temperature, dim=-1)  # (B, T, V)
    observed, expected = [], []
    for b in range(out.shape[0]):
        seen = set(out[b, :context_length][query_mask[b].bool()].tolist())
        for t in range(responses.shape[1]):
            if not response_mask[b, t]:
                break
            token = responses[b, t].item()
            observed.append(float(token in seen))
            expected.append(probs[b, t, list(seen)].sum().item())
            seen.add(token)
    p = torch.tensor(expected)
    return sum(observed) / len(observed), p.mean().item(), (p * (1 - p)).sum().sqrt().item() / len(p)


if __name__ == "__main__":
    args = tyro.cli(Args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    setup_tokenizer(tokenizer, model)
    end_id, pad_id = end_token_id(tokenizer), tokenizer.pad_token_id
    print(f"{args.model}: generation_config.json holds", {k: v for k, v in model.generation_config.to_diff_dict().items()
                                                        if k not in ("transformers_version",)})
    records = read_jsonl(args.prompts, "prompt")[: args.num_prompts]
    queries, query_mask = pad([encode_prompt(tokenizer, r["prompt"], 256)[0] for r in records], pad_id, side="left")
    built = []
    original = model._get_logits_processor
    model._get_logits_processor = lambda *a, **k: built.append(original(*a, **k)) or built[-1]
    methods = {
        "common.sample": lambda: sample(model, queries, query_mask, args.response_length, args.temperature, end_id,
                                        pad_id),
        "generate(generation_config=...)": lambda: model.generate(
            input_ids=queries, attention_mask=query_mask, generation_config=GenerationConfig(
                do_sample=True, top_k=0, top_p=1.0, temperature=args.temperature, max_new_tokens=args.response_length,
                eos_token_id=end_id, pad_token_id=pad_id)),
    }
    print("| sampler | logits processors | repeated tokens, observed | expected under softmax(logits / T) | z |")
    print("| --- | --- | --- | --- | --- |")
    for name, draw in methods.items():
        torch.manual_seed(args.seed)
        with torch.no_grad():
            out = draw()
        observed, expected, se = repeat_shares(model, out, query_mask, queries.shape[1], end_id, args.temperature)
        processors = ", ".join(type(p).__name__ for p in built[-1])
        print(f"| {name} | {processors} | {observed:.3f} | {expected:.3f} | {(observed - expected) / se:+.1f} |")
