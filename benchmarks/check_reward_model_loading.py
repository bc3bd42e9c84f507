"""A reward model trained by reward_model.py, loaded the way people load one: AutoModelForSequenceClassification on
tokenizer.apply_chat_template(conversation). Does it rank its first 16 training pairs, and does transformers' pooled
logit equal our `reward_scores` plus the offset? Reads WORKDIR/rm and WORKDIR/chat_pref.jsonl (benchmarks/README.md,
"The user's path on SmolLM2-135M-Instruct").

    python benchmarks/check_reward_model_loading.py /tmp/smollm2_check
"""

import json
import os
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import reward_scores  # noqa: E402

w = sys.argv[1]
tok = AutoTokenizer.from_pretrained(f"{w}/rm")
rm = AutoModelForSequenceClassification.from_pretrained(f"{w}/rm").eval()
pairs = [json.loads(line) for line in open(f"{w}/chat_pref.jsonl")][:16]
standard_right = stripped_right = 0
worst = 0.0
with torch.no_grad():
    for p in pairs:
        s, t = [], []
        for conv in (p["chosen"], p["rejected"]):
            inputs = tok.apply_chat_template(conv, return_tensors="pt", return_dict=True)
            s.append(rm(**inputs).logits[0, 0].item())  # transformers' pooling: the last token ("\n")
            ids = inputs["input_ids"][:, :-1]  # without the trailing "\n": read at <|im_end|>
            t.append(rm(input_ids=ids).logits[0, 0].item())
            ours = reward_scores(rm, inputs["input_ids"], inputs["attention_mask"]).item() + rm.config.reward_offset
            worst = max(worst, abs(ours - s[-1]))
        standard_right += s[0] > s[1]
        stripped_right += t[0] > t[1]
print(f"last token of the rendering: {tok.decode(inputs['input_ids'][0, -2:])!r}")
print(f"AutoModelForSequenceClassification on apply_chat_template(conversation): chosen above rejected on "
      f"{standard_right} of {len(pairs)} training pairs")
print(f"the same, read at <|im_end|> (trailing newline stripped): {stripped_right} of {len(pairs)}")
print(f"largest |reward_scores + offset - transformers' pooled logit|: {worst:.2e}")
