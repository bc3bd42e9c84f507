"""Algorithmic rewards for `ppo_rlhf.py --reward-fn reward_functions.py:NAME`, each f(prompt, response) -> float.

They follow the usual progression of a first RLHF tutorial: a word count that is easy to game, one that handles
negation and repetition, and a multi-part score. Use them to see PPO work without a learned reward model, and to watch a policy
exploit a reward's blind spots (run the first with --kl-coef 0 and read the samples).
"""

import re

POSITIVE = {"good", "great", "excellent", "wonderful", "amazing", "lovely", "fantastic", "delightful", "perfect"}
NEGATIVE = {"bad", "awful", "terrible", "horrible", "poor", "dull", "boring", "disappointing"}
NEGATIONS = {"not", "never", "no", "hardly"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def positive_word_count(prompt: str, response: str) -> float:
    """Positive words minus negative words. Easy to game: repeating 'great' scores without limit."""
    words = _words(response)
    return float(sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words))


def positivity(prompt: str, response: str) -> float:
    """Share of positive words, a negated one counting against, scaled down by repetition; in [-1, 1]."""
    words = _words(response)
    if not words:
        return 0.0
    score = 0.0
    for i, w in enumerate(words):
        negated = i > 0 and words[i - 1] in NEGATIONS
        if w in POSITIVE:
            score += -0.5 if negated else 1.0
        elif w in NEGATIVE:
            score += 0.5 if negated else -1.0
    distinct = len(set(words)) / len(words)
    return max(-1.0, min(1.0, score / len(words) * distinct * 3))


def review_quality(prompt: str, response: str) -> float:
    """A weighted mix: positivity (0.5), a finished sentence (0.3) and a length of 3 to 15 words (0.2)."""
    words = _words(response)
    finished = 1.0 if response.strip().endswith(".") else 0.0
    length = 1.0 if 3 <= len(words) <= 15 else 0.0
    return 0.5 * positivity(prompt, response) + 0.3 * finished + 0.2 * length


def count_token_the(prompt: str, response: str) -> float:
    """How often the word 'the' appears: a toy reward the tests use to check that PPO raises a reward."""
    return float(_words(response).count("the"))


def repetition_penalty(prompt: str, response: str) -> float:
    """Minus the share of words that repeat an earlier word of the response (0 for none, toward -1 for a word salad):
    a rule to add to a learned reward (`--reward-model-path ... --reward-fn reward_functions.py:repetition_penalty`)
    against the "outstanding and outstanding" phrasings a reward model can overrate."""
    words = _words(response)
    return -(1.0 - len(set(words)) / len(words)) if words else 0.0
