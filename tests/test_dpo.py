"""dpo.py: the losses against the papers' formulas, which tokens count, a toy preference learned, precomputed
reference log-probs, and a saved policy that loads."""

import json
import math
import random

import pytest
import torch
from conftest import read_metrics, run_script, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import encode_prompt, encode_response
from dpo import collate, dpo_loss, sequence_logprobs


def test_losses_match_the_papers_formulas():
    """Hand-laid summed log-probs; each loss computed term by term in float64 from its paper's equation."""
    chosen, rejected = torch.tensor([-10.0, -7.5, -3.0]), torch.tensor([-12.0, -7.0, -9.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -8.0, -2.0]), torch.tensor([-11.5, -6.0, -8.5])
    beta = 0.3
    for loss_type, smoothing in (("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)):
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type,
                                                            smoothing)
        for i in range(3):
            h = (chosen[i].item() - ref_chosen[i].item()) - (rejected[i].item() - ref_rejected[i].item())
            if loss_type == "ipo":  # Azar et al. 2023, eq. 17
                expected = (h - 1 / (2 * beta)) ** 2
            else:  # Rafailov et al. 2023, eq. 7; conservative DPO mixes in the flipped label
                expected = -(1 - smoothing) * math.log(1 / (1 + math.exp(-beta * h))) - smoothing * math.log(
                    1 / (1 + math.exp(beta * h)))
            assert losses[i].item() == pytest.approx(expected, rel=1e-5)
            assert chosen_rewards[i].item() == pytest.approx(beta * (chosen[i].item() - ref_chosen[i].item()), rel=1e-6)
            assert rejected_rewards[i].item() == pytest.approx(beta * (rejected[i].item() - ref_rejected[i].item()),
                                                               rel=1e-6)


@pytest.mark.parametrize("padding_free", [True, False])
def test_only_response_tokens_count_end_token_included(model_dir, padding_free):
    """The summed log-prob of each sequence equals a slow reference: the sequence alone through the model, log-softmax
    at each position, summed over the positions that predict a response token (its end token too), none of the
    prompt's. A ranking's shared response is one sequence."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt_a, prompt_b = [1, 30, 31, 32], [1, 33]
    great, bad, fine, end = [40, 41], [42], [43, 44, 45], 2
    pairs = [(prompt_a, great + [end], bad + [end]), (prompt_a, great + [end], fine + [end]),
             (prompt_b, fine + [end], bad + [end])]
    batch, chosen, rejected = collate(pairs, 0, padding_free)
    assert batch["num_sequences"] == 5  # prompt_a + great is forwarded once for both of its pairs
    with torch.no_grad():
        logps = sequence_logprobs(model, batch)

        def slow(prompt, response):
            logits = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
            return sum(logits[len(prompt) - 1 + t, token].item() for t, token in enumerate(response))
    for i, (prompt, good, worse) in enumerate(pairs):
        assert logps[chosen[i]].item() == pytest.approx(slow(prompt, good), abs=1e-4)
        assert logps[rejected[i]].item() == pytest.approx(slow(prompt, worse), abs=1e-4)
    # and the prompt does not count: a prompt token's log-prob is not in the sum
    assert logps[chosen[0]].item() != pytest.approx(slow(prompt_a[:2], prompt_a[2:] + great + [end]), abs=1e-3)


def toy_preferences(tmp_path):
    rng = random.Random(0)
    rows = [{"prompt": f"The {rng.choice(['pasta', 'plot', 'view', 'screen'])} was",
             "chosen": f" {rng.choice(['', 'very ', 'so '])}great.", "rejected": f" {rng.choice(['', 'very ', 'so '])}awful."}
            for _ in range(240)]
    return write_jsonl(tmp_path / "train.jsonl", rows[:200]), write_jsonl(tmp_path / "eval.jsonl", rows[200:])


def dpo_args(sft_dir, data, eval_data, out, *extra):
    return ["--model-name-or-path", sft_dir, "--dataset", data, "--eval-dataset", eval_data, "--eval-prompts", eval_data,
            "--output-dir", out, "--num-eval-prompts", "8", "--response-length", "8", "--eval-reward-fn", "", *extra]


def test_toy_preference_is_learned(sft_dir, tmp_path):
    """Chosen says 'great', rejected 'awful': the implicit reward's margin grows, the held-out accuracy reaches
    95%, and the saved policy, loaded with plain transformers, prefers 'great' to 'awful' more than the SFT model."""
    data, eval_data = toy_preferences(tmp_path)
    run_script("dpo.py", *dpo_args(sft_dir, data, eval_data, tmp_path / "out", "--learning-rate", "1e-3",
                                   "--num-epochs", "3", "--eval-steps", "10"), cwd=tmp_path)
    margins = [v for _, v in read_metrics(tmp_path, "rewards/margins")]
    assert sum(margins[-5:]) / 5 > 10 * abs(sum(margins[:5]) / 5) and margins[-1] > 0.5, margins
    accuracy = read_metrics(tmp_path, "eval/dpo/accuracy")
    assert accuracy[0][1] == 0.5 and accuracy[-1][1] >= 0.95, accuracy  # step 0: the policy is the reference, all tie
    chosen_logps = [v for _, v in read_metrics(tmp_path, "logps/chosen")]
    assert len(chosen_logps) == len(margins)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    pairs = [(encode_prompt(tokenizer, r["prompt"], 64)[0], encode_response(tokenizer, r["chosen"], 48)[0],
              encode_response(tokenizer, r["rejected"], 48)[0]) for r in map(json.loads, open(eval_data))]
    batch, chosen, rejected = collate(pairs, tokenizer.pad_token_id, True)
    with torch.no_grad():
        gain = sequence_logprobs(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), batch) - sequence_logprobs(
            AutoModelForCausalLM.from_pretrained(sft_dir), batch)  # log(pi / pi_ref) of each held-out sequence
    assert (gain[chosen] - gain[rejected]).mean() > 1.0


def test_precomputed_reference_gives_the_same_training(sft_dir, tmp_path):
    """--precompute-ref-logprobs moves the reference's forwards out of the loop and changes no number."""
    data, eval_data = toy_preferences(tmp_path)
    for name in ("inline", "precomputed"):
        (tmp_path / name).mkdir()
        run_script("dpo.py", *dpo_args(sft_dir, data, eval_data, tmp_path / name / "out", "--max-steps", "6",
                                       "--learning-rate", "1e-3", *(["--precompute-ref-logprobs"] if name != "inline"
                                                                    else [])), cwd=tmp_path / name)
    for metric in ("train/dpo/loss", "rewards/margins", "logps/rejected"):
        inline, precomputed = (read_metrics(tmp_path / name, metric) for name in ("inline", "precomputed"))
        assert len(inline) == 6 and inline == pytest.approx(precomputed, abs=1e-5), metric
