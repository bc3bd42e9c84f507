"""How long should a packed row be? One reward-model training step (32 pairs = 64 sequences of the embedded task:
forward, Bradley-Terry loss, backward, fused AdamW) on the tiny benchmark Llama, padded and packed with rows of
1, 2 and 4 times the longest sequence, and with the whole batch in one row (TRL's padding_free). By hand:

    python benchmarks/bench_pack_width.py

Layouts alternate step by step on the same batches; we print the median step time, the tokens each layout feeds
the model (real ones and filler) and the speed-up over padding.
"""

import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from bench_ppo import build_models  # noqa: E402
from bench_sft_rm import pairwise_data  # noqa: E402
from common import encode_prompt, encode_response, reward_scores  # noqa: E402
from common import pad  # noqa: E402
from plumbing import pack  # noqa: E402

if __name__ == "__main__":
    models = os.path.join(REPO, "benchmarks/.models")
    build_models(models)
    tok = AutoTokenizer.from_pretrained(f"{models}/policy")
    rows = [json.loads(line) for line in open(pairwise_data(models))][: 32 * 24]
    seqs = [[encode_prompt(tok, r["prompt"], 64)[0] + encode_response(tok, r[k], 48)[0] for k in ("chosen", "rejected")]
            for r in rows]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(f"{models}/policy", num_labels=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    layouts = {"padded": None, "rows of 1x longest": 1, "rows of 2x longest (the default here)": 2, "rows of 4x longest": 4,
               "one row per batch": 0}
    times, tokens = {k: [] for k in layouts}, {k: [] for k in layouts}
    for step in range(24):
        batch = [s for pair in seqs[step * 32: (step + 1) * 32] for s in pair]  # chosen, rejected, chosen, ...
        for name, mult in layouts.items():
            longest = max(map(len, batch))
            t0 = time.perf_counter()
            if mult is None:
                ids, mask = pad(batch, tok.pad_token_id)
                scores = reward_scores(model, ids, mask)
            else:
                ids, positions, starts = pack(batch, tok.pad_token_id, room=mult * longest or sum(map(len, batch)))
                last = starts + torch.stack([torch.zeros(len(batch), dtype=torch.long),
                                             torch.tensor([len(s) - 1 for s in batch])], dim=1)
                scores = reward_scores(model, ids, position_ids=positions, last=last)
            loss = -torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 4:  # warm-up dropped
                times[name].append(time.perf_counter() - t0)
                tokens[name].append(ids.numel())
    real = statistics.median(sum(len(s) for s in [x for p in seqs[i * 32: (i + 1) * 32] for x in p]) for i in range(4, 24))
    base = statistics.median(times["padded"])
    print(f"\n64 sequences per step, median {real:.0f} real tokens\n")
    print("| layout | ms / step | tokens fed | speed-up over padding |\n| --- | --- | --- | --- |")
    for name in layouts:
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.0f} | {statistics.median(tokens[name]):.0f} | {base / med:.2f}x |")
