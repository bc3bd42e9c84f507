"""The embedded "reviews" task: a seeded data generator, a gold judge, and the tiny default model.

It mirrors the classic RLHF demo ("make the model write positive reviews", Ziegler et al. 2019, sec. 4.1), offline:
- prompts are the opening words of a short review; completions finish it with one or two clauses of mixed sentiment;
- the simulated human is `gold_score`: VADER's compound sentiment of the response (a lexicon rated by people,
  Hutto & Gilbert 2014), minus penalties for repetition and for an unfinished review;
- annotators compare two completions of one prompt with Bradley-Terry noise, P(A wins) = sigmoid((g_A - g_B) / tau),
  and answer "Tie" when they cannot tell (|g_A - g_B| < tie_margin); ties are dropped from the preference files;
- for the training file they rank K = 4 completions of a prompt at once (as InstructGPT's labellers ranked 4 to 9),
  with noise that gives every pair of the ranking the same Bradley-Terry label; the ranking is written out as its
  K(K-1)/2 pairs on consecutive lines. Held-out pairs are independent pairs.

    python reviews_task.py                 # writes data/reviews/*.jsonl and models/tiny-llama (same seed, same bytes)
    python reviews_task.py --out-dir data/reviews_60k --sizes.pref-train 60000     # more preference pairs

The stages call `ensure_data` / `ensure_tiny_model` for their defaults, so nobody has to run this by hand.
"""

import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass

DATA_DIR = "data/reviews"
TINY_MODEL_DIR = "models/tiny-llama"
# the noise of the simulated annotators; the accuracy ceiling it implies is printed by `python reviews_task.py`
TAU = 0.3
TIE_MARGIN = 0.05
# training labels are rankings of this many completions of one prompt (InstructGPT ranked 4 to 9), written as pairs
RANKING_SIZE = 4

SUBJECTS = {
    "restaurant": ["the pasta", "the soup", "the steak", "the dessert", "the coffee", "the pizza", "the service",
                   "the waiter", "the menu", "the wine list", "the bread", "the salad", "the curry", "the burger",
                   "the noodles", "the brunch"],
    "film": ["the plot", "the acting", "the ending", "the soundtrack", "the dialogue", "the lead actor", "the villain",
             "the pacing", "the special effects", "the script", "the cinematography", "the sequel"],
    "product": ["the battery", "the screen", "the keyboard", "the charger", "the blender", "the headphones",
                "the camera", "the vacuum", "the kettle", "the backpack", "the mattress", "the app"],
    "place": ["the hotel room", "the beach", "the museum", "the park", "the view", "the hostel", "the campsite",
              "the old town", "the train station", "the pool", "the lobby", "the market"],
}
OPENERS = ["{s} was", "Honestly, {s} was", "I tried {s} last week and it was", "We went back and {s} was",
           "After two weeks, {s} is", "My first impression: {s} was", "To be fair, {s} seemed",
           "I expected more, but {s} was", "Overall, {s} was", "Our friends recommended it, and {s} was",
           "For the price, {s} was", "On our second visit, {s} was", "I have to say {s} felt",
           "Compared to last year, {s} is", "According to my partner, {s} was"]
POSITIVE = ["good", "great", "excellent", "wonderful", "amazing", "delightful", "superb", "lovely", "fantastic",
            "pleasant", "charming", "impressive", "brilliant", "perfect", "fresh", "lively", "delicious", "beautiful",
            "solid", "friendly", "enjoyable", "fun", "comfortable", "clean", "helpful", "outstanding", "stunning",
            "happy", "satisfying", "cute", "gorgeous", "peaceful", "elegant", "generous", "neat", "warm", "nice",
            "glad", "inspiring", "terrific", "cheerful", "gentle", "sweet", "awesome", "fabulous", "pleasing"]
NEGATIVE = ["bad", "terrible", "awful", "horrible", "disappointing", "unpleasant", "boring", "dull", "rude", "dirty",
            "noisy", "slow", "lame", "broken", "disgusting", "depressing", "overpriced", "inferior", "poor", "weak",
            "annoying", "uncomfortable", "confusing", "painful", "ugly", "irritating", "worthless", "unfriendly",
            "unacceptable", "frustrating",
            "disastrous", "ridiculous", "awkward", "rotten", "gross", "dreadful", "miserable", "pathetic", "useless",
            "crowded", "careless", "messy", "lazy", "harsh", "nasty", "lousy"]
NEUTRAL = ["okay", "average", "ordinary", "standard", "typical", "simple", "small", "large", "quiet", "busy", "long",
           "short", "different", "unusual", "plain", "modest", "basic", "normal", "predictable", "brief", "light",
           "dense", "new", "old", "familiar"]
INTENSIFIERS = ["very", "really", "extremely", "incredibly", "truly", "remarkably", "quite", "so", "absolutely",
                "totally", "genuinely", "slightly", "a bit"]
CONJUNCTIONS = ["but", "and", "although", "while", "yet", "though", "and honestly", "even if"]
VERBS = ["was", "felt", "seemed", "is", "looked"]
TAILS = ["", "", "", " overall", " to be honest", " for the price", " in my opinion", " this time", " as usual"]


def _predicate(rng: random.Random) -> str:
    """One clause's predicate: an adjective, maybe intensified, negated ("not bad") or paired."""
    words = rng.choice([POSITIVE, POSITIVE, NEGATIVE, NEGATIVE, NEUTRAL])
    adj = rng.choice(words)
    form = rng.random()
    if form < 0.05:
        return f"not {adj}"
    if form < 0.45:
        return f"{rng.choice(INTENSIFIERS)} {adj}"
    if form < 0.62:
        return f"{adj} and {rng.choice(words)}"
    return adj


def sample_completion(rng: random.Random, domain: str, flawed_prob: float = 0.0) -> str:
    """Finish a review: one or two clauses, ending with a period. Starts with a space (it follows the prompt)."""
    text = " " + _predicate(rng)
    if rng.random() < 0.6:
        other = rng.choice(SUBJECTS[domain])
        text += f", {rng.choice(CONJUNCTIONS)} {other} {rng.choice(VERBS)} {_predicate(rng)}"
    text += rng.choice(TAILS)
    if rng.random() < flawed_prob:  # what real model samples sometimes do: stutter, or stop mid-sentence
        words = text.split()
        if rng.random() < 0.5:
            i = rng.randrange(len(words))
            text = " " + " ".join(words[: i + 1] + [words[i]] * rng.randint(1, 3) + words[i + 1:]) + "."
        else:
            text = " " + " ".join(words[: max(1, len(words) - rng.randint(1, 3))])
        return text
    return text + "."


def all_prompts() -> list[tuple[str, str]]:
    """Every (domain, prompt) pair, in a fixed order."""
    out = []
    for domain, subjects in SUBJECTS.items():
        for s in subjects:
            for o in OPENERS:
                prompt = o.format(s=s)
                out.append((domain, prompt[0].upper() + prompt[1:]))
    return out


_VADER = None


def gold_score(prompt: str, response: str) -> float:
    """The simulated human's score of a response, about -2 (bad) to +1 (glowing).

    VADER compound sentiment of the response, minus 1.0 times the fraction of repeated word bigrams (stuttering) and
    minus 1.0 if the review is unfinished (does not end with a period). The prompt is ignored: it sets the topic only.
    """
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    text = response.strip()
    score = _VADER.polarity_scores(text)["compound"]
    words = re.findall(r"[a-z']+", text.lower())
    bigrams = list(zip(words, words[1:]))
    if bigrams:
        score -= 1.0 * (1.0 - len(set(bigrams)) / len(bigrams))
    if len(set(words)) < len(words) / 2:  # a word salad of one or two words repeated
        score -= 1.0
    if not text.endswith("."):
        score -= 1.0
    return score


def noise_ceiling(gold_a: list[float], gold_b: list[float], tau: float = TAU) -> float:
    """Expected accuracy of a perfect judge (one that knows gold_score) on labels drawn with Bradley-Terry noise.

    For one pair with p = sigmoid((g_A - g_B) / tau) the best guess is right with probability max(p, 1 - p).
    """
    ps = [1.0 / (1.0 + math.exp(-(a - b) / tau)) for a, b in zip(gold_a, gold_b)]
    return sum(max(p, 1 - p) for p in ps) / len(ps)


def annotator_ranking(golds: list[float], rng: random.Random, tau: float = TAU) -> list[int]:
    """A noisy annotator's ranking of K responses, best first: sort by g / tau + Gumbel noise (Plackett-Luce).

    The difference of two Gumbel variables is logistic, so each pair (i, j) of the ranking comes out in the order
    i > j with probability sigmoid((g_i - g_j) / tau): exactly the pairwise Bradley-Terry annotator's label.
    """
    noisy = [g / tau - math.log(-math.log(max(rng.random(), 1e-300))) for g in golds]
    return sorted(range(len(golds)), key=lambda i: -noisy[i])


def annotate(prompt: str, a: str, b: str) -> str:
    """The simulated annotator for `label.py --annotator reviews_task.py:annotate`: "A", "B" or "Tie", drawn with the
    same Bradley-Terry noise and tie margin that labelled the task's own files. Its randomness is seeded by the texts,
    so the same question always gets the same answer, in any order and after any restart."""
    ga, gb = gold_score(prompt, a), gold_score(prompt, b)
    if abs(ga - gb) < TIE_MARGIN:
        return "Tie"
    seed = int.from_bytes(hashlib.sha256(json.dumps([prompt, a, b]).encode()).digest()[:8], "big")
    return "A" if random.Random(seed).random() < 1.0 / (1.0 + math.exp(-(ga - gb) / TAU)) else "B"


@dataclass
class Sizes:
    sft_train: int = 20000
    sft_eval: int = 500
    pref_train: int = 21000
    pref_eval: int = 600
    ranking_size: int = RANKING_SIZE  # K completions ranked per training prompt; held-out pairs are always K = 2
    prompts_eval: int = 256


def generate(out_dir: str = DATA_DIR, seed: int = 0, sizes: Sizes = Sizes()) -> dict:
    """Write the task's JSONL files. Held-out files use prompts never seen in training. Returns summary figures."""
    rng = random.Random(seed)
    prompts = all_prompts()
    rng.shuffle(prompts)
    n_eval = len(prompts) // 6
    splits = {"eval": prompts[:n_eval], "train": prompts[n_eval:]}
    os.makedirs(out_dir, exist_ok=True)
    summary = {}
    for split, pool in splits.items():
        n_sft = sizes.sft_train if split == "train" else sizes.sft_eval
        rows = []
        for _ in range(n_sft):
            domain, prompt = rng.choice(pool)
            rows.append({"prompt": prompt, "completion": sample_completion(rng, domain)})
        _write(os.path.join(out_dir, f"sft_{split}.jsonl"), rows)

        n_pref = sizes.pref_train if split == "train" else sizes.pref_eval
        rows, ties, gold_chosen, gold_rejected = [], 0, [], []
        while split == "train" and sizes.ranking_size > 2 and len(rows) < n_pref:
            domain, prompt = rng.choice(pool)
            responses = [sample_completion(rng, domain, 0.1) for _ in range(sizes.ranking_size)]
            golds = [gold_score(prompt, r) for r in responses]
            order = annotator_ranking(golds, rng)
            for a, i in enumerate(order):
                for j in order[a + 1:]:
                    if abs(golds[i] - golds[j]) < TIE_MARGIN:
                        ties += 1
                        continue
                    rows.append({"prompt": prompt, "chosen": responses[i], "rejected": responses[j]})
                    gold_chosen.append(golds[i])
                    gold_rejected.append(golds[j])
        while len(rows) < n_pref:
            domain, prompt = rng.choice(pool)
            a, b = sample_completion(rng, domain, 0.1), sample_completion(rng, domain, 0.1)
            ga, gb = gold_score(prompt, a), gold_score(prompt, b)
            if abs(ga - gb) < TIE_MARGIN:  # the annotator answers "Tie": no preference to learn from
                ties += 1
                continue
            a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(ga - gb) / TAU))
            chosen, rejected = (a, b) if a_wins else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            gold_chosen.append(max(ga, gb) if a_wins == (ga > gb) else min(ga, gb))
            gold_rejected.append(ga + gb - gold_chosen[-1])
        _write(os.path.join(out_dir, f"preference_{split}.jsonl"), rows)
        summary[f"{split}/ties_dropped"] = ties
        summary[f"{split}/label_agrees_with_gold"] = sum(c > r for c, r in zip(gold_chosen, gold_rejected)) / len(rows)
        summary[f"{split}/noise_ceiling"] = noise_ceiling(gold_chosen, gold_rejected)

        prompt_rows = [{"prompt": p} for _, p in pool]
        if split == "eval":
            prompt_rows = prompt_rows[: sizes.prompts_eval]
        _write(os.path.join(out_dir, f"prompts_{split}.jsonl"), prompt_rows)
    return summary


def _write(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def ensure_data(out_dir: str = DATA_DIR) -> None:
    """Generate the task's files once, the first time a stage needs them."""
    if not os.path.exists(os.path.join(out_dir, "prompts_eval.jsonl")):
        print(f"generating the embedded reviews task in {out_dir} (once)")
        generate(out_dir)


def build_tokenizer(texts: list[str], vocab_size: int = 1024, with_pad: bool = True):
    """A byte-level BPE tokenizer trained on the task's corpus, with <s> (BOS), </s> (EOS) and a distinct <pad>.

    with_pad=False leaves the pad token out, as many real tokenizers do (the tests use it for that case)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"] if with_pad else ["<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sorted(set(texts)), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if with_pad else None, padding_side="right")


def build_tiny_model(tokenizer, hidden_size: int = 256, num_layers: int = 4, seed: int = 0):
    """A randomly initialised Llama-architecture causal LM of a few million parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 8 // 3,
                         num_hidden_layers=num_layers, num_attention_heads=max(1, hidden_size // 64),
                         num_key_value_heads=max(1, hidden_size // 64), max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # marks this model and every model trained from it (the config travels with save_pretrained): the stages then
    # default to the learning rates of a model learning from scratch, not those of a pretrained model
    config.embedded_tiny_model = True
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def ensure_tiny_model(out_dir: str = TINY_MODEL_DIR, data_dir: str = DATA_DIR) -> None:
    """Make the default model folder once (deterministically), from the task's training corpus."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return
    ensure_data(data_dir)
    print(f"building the tiny default model in {out_dir} (once)")
    with open(os.path.join(data_dir, "sft_train.jsonl")) as f:
        texts = [row["prompt"] + row["completion"] for row in map(json.loads, f)]
    tokenizer = build_tokenizer(texts)
    model = build_tiny_model(tokenizer)
    tmp = out_dir.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)


if __name__ == "__main__":
    import tyro  # e.g. --out-dir data/reviews_60k --sizes.pref-train 60000 for a larger preference set

    for key, value in tyro.cli(generate).items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    ensure_tiny_model()
