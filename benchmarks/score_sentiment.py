"""Sentiment of models' responses to the embedded task's held-out review starts: the same prompts and the same random
draws for every model, scored by VADER's compound (sentiment alone) and by the task's gold judge. Run by hand:

    python benchmarks/score_sentiment.py /tmp/smollm2 /tmp/dpo_smol      # the model before and after DPO

Pure sampling at temperature 0.7 with `common.sample`, through each model's chat template, 48 new tokens, 128 prompts.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common import encode_prompt, end_token_id, sample, setup_tokenizer  # noqa: E402
from reviews_task import ensure_data, gold_score  # noqa: E402


def responses(path: str, prompts: list[str], max_new_tokens: int = 48, batch: int = 32) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    setup_tokenizer(tokenizer, model)
    end, texts = end_token_id(tokenizer), []
    for k in range(0, len(prompts), batch):
        ids = [encode_prompt(tokenizer, p, 64)[0] for p in prompts[k: k + batch]]
        width = max(map(len, ids))
        queries = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids])  # left-padded
        mask = (queries != tokenizer.pad_token_id).long()
        torch.manual_seed(k)  # the same draws for every model
        out = sample(model, queries, mask, max_new_tokens, 0.7, end, tokenizer.pad_token_id)[:, width:].tolist()
        texts += [tokenizer.decode(r[: r.index(end) if end in r else len(r)], skip_special_tokens=True) for r in out]
    return texts


if __name__ == "__main__":
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    ensure_data(os.path.join(REPO, "data", "reviews"))
    with open(os.path.join(REPO, "data", "reviews", "prompts_eval.jsonl")) as f:
        prompts = [json.loads(line)["prompt"] for line in f][:128]
    for path in sys.argv[1:]:
        texts = responses(path, prompts)
        compound = torch.tensor([vader.polarity_scores(t)["compound"] for t in texts])
        gold = torch.tensor([gold_score(p, t) for p, t in zip(prompts, texts)])
        print(f"{path}: VADER compound {compound.mean():.3f}, glowing (> 0.3) {(compound > 0.3).float().mean():.1%}, "
              f"negative (< -0.3) {(compound < -0.3).float().mean():.1%}, gold {gold.mean():.3f}")
