"""Stage 2: where the score is read, padding invariance, the loss, learning, the head's init, saving, bad pairs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, run_script, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common import encode_prompt, encode_response, last_token_index, pad, reward_scores
from reward_model import collate, group_pairs, init_score_head


@pytest.fixture(scope="module")
def rm(model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model


def test_score_is_read_at_the_last_real_token(rm):
    """Hand-laid batch: the index is the EOS of each row, and the score equals the head applied to that hidden state."""
    eos, pad_id = 2, 0
    rows = [[1, 40, 41, eos], [1, 42, eos], [1, 43, 44, 45, 46, eos]]
    ids, mask = pad(rows, pad_id)
    assert last_token_index(mask).tolist() == [3, 2, 5]
    with torch.no_grad():
        scores = reward_scores(rm, ids, mask)
        for i, row in enumerate(rows):
            hidden = rm.model(torch.tensor([row])).last_hidden_state[0, -1]
            assert torch.allclose(scores[i], rm.score(hidden).squeeze(), atol=1e-5)


def test_score_ignores_padding_side_and_amount(rm):
    rows = [[1, 40, 41, 2], [1, 42, 2], [1, 43, 44, 45, 46, 2]]
    with torch.no_grad():
        right = reward_scores(rm, *pad(rows, 0, "right"))
        left = reward_scores(rm, *pad(rows, 0, "left"))
        extra = reward_scores(rm, *pad(rows + [[1] * 20], 0, "right"))[:3]
        alone = torch.stack([reward_scores(rm, *pad([r], 0))[0] for r in rows])
    # tolerance: fp32 attention over different padded lengths differs by rounding only
    for other in (left, extra, alone):
        assert torch.allclose(right, other, atol=1e-5), (right, other)


def test_collate_puts_chosen_and_rejected_in_one_batch():
    pairs = [([1, 5], [6, 2], [7, 8, 2]), ([1], [9, 2], [2])]
    batch, chosen, rejected = collate(pairs, 0)
    # independent pairs: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 0], [1, 9, 2, 0, 0], [1, 5, 7, 8, 2], [1, 2, 0, 0, 0]]
    assert last_token_index(batch["attention_mask"]).tolist() == [3, 2, 4, 1]
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3]
    # padding-free: longest first into rows of 5; the 3- and 2-token sequences share a row
    batch, chosen, rejected = collate(pairs, 0, padding_free=True)
    assert batch["input_ids"].tolist() == [[1, 5, 7, 8, 2], [1, 5, 6, 2, 0], [1, 9, 2, 1, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["last"].tolist() == [[1, 3], [2, 2], [0, 4], [2, 4]]  # (row, column) of each sequence's EOS
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3]


@pytest.mark.parametrize("padding_free", [False, True])
def test_ranking_pairs_share_rows_and_give_the_same_loss(rm, padding_free):
    """A ranking a > b > c written as its 3 pairs: 5 distinct sequences instead of 8, and the same scores and loss
    as scoring every pair's two sequences separately (the slow reference), padded or packed."""
    p, a, b, c = [1, 40], [41, 2], [42, 43, 2], [44, 2]
    pairs = [(p, a, b), (p, a, c), (p, b, c), ([1, 45], [46, 2], [47, 2])]
    batch, chosen, rejected = collate(pairs, 0, padding_free)
    assert len(batch["last" if padding_free else "input_ids"]) == 5
    with torch.no_grad():
        scores = reward_scores(rm, **batch)
        fast = -F.logsigmoid(scores[chosen] - scores[rejected]).mean()
        slow = torch.stack([-F.logsigmoid(reward_scores(rm, *pad([q + x], 0)) - reward_scores(rm, *pad([q + y], 0)))
                            for q, x, y in pairs]).mean()
        order = [p + a, p + b, [1, 45, 46, 2], p + c, [1, 45, 47, 2]]  # first seen among chosen, then rejected
        alone = torch.cat([reward_scores(rm, *pad([s], 0)) for s in order])
    assert torch.allclose(fast, slow, atol=1e-5)
    assert torch.allclose(scores, alone, atol=1e-5)


def test_comparison_groups_are_consecutive_pairs_of_one_prompt():
    pairs = [([1, 7], [5], [6]), ([1, 7], [5], [8]), ([1, 7], [6], [8]), ([1, 9], [5], [6]), ([1, 7], [5], [6])]
    assert group_pairs(pairs, 36) == [[0, 1, 2], [3], [4]]
    assert group_pairs(pairs, 2) == [[0, 1], [2], [3], [4]]
    assert group_pairs(pairs, 1) == [[0], [1], [2], [3], [4]]


def rm_args(model_dir, data, eval_data, out, *extra):
    return ["--model-name-or-path", model_dir, "--dataset", data, "--eval-dataset", eval_data, "--output-dir", out,
            "--per-device-train-batch-size", "16", "--num-normalize-samples", "32", "--max-completion-length", "16",
            "--eval-reward-fn", "", *extra]


def test_separable_preference_is_learned_and_saved(model_dir, tmp_path):
    """Chosen always says 'great', rejected 'awful': the model must reach >= 95% held-out accuracy."""
    import random

    rng = random.Random(0)
    rows = [{"prompt": f"The {rng.choice(['pasta', 'plot', 'view', 'screen'])} was",
             "chosen": f" {rng.choice(['', 'very ', 'so '])}great.", "rejected": f" {rng.choice(['', 'very ', 'so '])}awful."}
            for _ in range(400)]
    for r in rows[::2]:  # vary the lengths so that length alone cannot separate
        r["chosen"], r["rejected"] = r["chosen"][:-1] + " and fun.", r["rejected"][:-1] + " and dull."
    data = write_jsonl(tmp_path / "train.jsonl", rows[:320])
    eval_data = write_jsonl(tmp_path / "eval.jsonl", rows[320:])
    out = tmp_path / "rm"
    proc = run_script("reward_model.py", *rm_args(model_dir, data, eval_data, out, "--learning-rate", "3e-3",
                                                   "--num-epochs", "2"), cwd=tmp_path)
    accuracy = read_metrics(tmp_path, "eval/rm/accuracy")
    assert accuracy[0][1] < 0.9 and accuracy[-1][1] >= 0.95, accuracy
    assert "calibration" in proc.stdout and "accuracy by response length" in proc.stdout

    # the saved folder loads with plain transformers and gives the same scores (minus the recorded offset)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    config = json.load(open(out / "config.json"))
    assert "reward_offset" in config and model.config.num_labels == 1
    texts = ["The pasta was great.</s>", "The view was so awful.</s>"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hf = model(**batch).logits.squeeze(-1) - config["reward_offset"]
        ours = reward_scores(model, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(hf, ours, atol=1e-5)
    assert ours[0] > ours[1]


def test_normalisation_centres_sft_samples(model_dir, tmp_path, task_dir):
    """After normalisation the mean score of the SFT policy's samples is ~0 (within sampling noise)."""
    out = tmp_path / "rm"
    proc = run_script("reward_model.py", *rm_args(model_dir, task_dir / "preference_train.jsonl",
                                                   task_dir / "preference_eval.jsonl", out, "--max-steps", "5",
                                                   "--num-normalize-samples", "64", "--seed", "3"), cwd=tmp_path)
    assert "normalised on 64 sft_samples" in proc.stdout
    offset = json.load(open(out / "config.json"))["reward_offset"]
    assert offset != 0.0
    # score fresh SFT-policy samples with the saved model: their mean is near 0 compared to the score spread
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    prompts = [json.loads(line)["prompt"] for line in open(task_dir / "prompts_train.jsonl")][:128]
    torch.manual_seed(0)
    ids, mask = pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id, side="left")
    with torch.no_grad():
        gen = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=16,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        seqs = []
        for row, m in zip(gen.tolist(), mask):
            resp = row[ids.shape[1]:]
            resp = resp[: resp.index(tok.eos_token_id) + 1] if tok.eos_token_id in resp else resp
            seqs.append(row[ids.shape[1] - int(m.sum()): ids.shape[1]] + resp)
        scores = reward_scores(rm, *pad(seqs, tok.pad_token_id))
    assert abs(scores.mean()) < 0.35 * scores.std() + 0.05, (scores.mean(), scores.std())


def test_head_init_std():
    """The new head is N(0, 1/sqrt(d + 1)), as in lm-human-preferences (d = 1024: 1024 draws, ~2% error)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=16, hidden_size=1024, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(config)
    torch.manual_seed(0)
    init_score_head(model)
    expected = 1 / math.sqrt(1024 + 1)
    assert abs(model.score.weight.std().item() - expected) < 0.1 * expected
    assert abs(model.score.weight.mean().item()) < 0.1 * expected
    assert model.config.reward_offset == 0.0


def test_bad_pairs_error_or_are_skipped(model_dir, tmp_path):
    good = [{"prompt": f"Visit {i}: the pasta was", "chosen": " great.", "rejected": " awful."} for i in range(40)]
    lines = good + [{"prompt": "p", "chosen": " x."}, {"prompt": "p", "chosen": " same.", "rejected": " same."},
                           {"prompt": "", "chosen": " a.", "rejected": " b."}]
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    proc = run_script("reward_model.py", *rm_args(model_dir, data, data, tmp_path / "o"), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{data}, line 41: missing field 'rejected'" in proc.stderr
    proc = run_script("reward_model.py", *rm_args(model_dir, data, data, tmp_path / "o", "--skip-bad-pairs",
                                                   "--max-steps", "1", "--normalize-on", "dataset"), cwd=tmp_path)
    assert "skipped 6 bad lines" in proc.stdout  # 3 in the training file and 3 in the held-out file (the same file)
    assert "40 training pairs" in proc.stdout


def test_logged_loss_is_the_bradley_terry_loss_of_the_model(model_dir, tmp_path):
    """At learning rate 0 the model never moves, so the loss the script logs for its one step must be
    mean(-log sigmoid(r_chosen - r_rejected - margin)) over every pair, a ranking's pairs included, recomputed
    here pair by pair from the saved model."""
    ranking = [{"prompt": "The plot was", "chosen": c, "rejected": r}
               for c, r in [(" great.", " fine."), (" great.", " awful."), (" fine.", " awful.")]]
    rows = ranking + [{"prompt": f"The {s} was", "chosen": " so good.", "rejected": " bad."}
                      for s in ("pasta", "view", "screen", "soup")]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "rm"
    run_script("reward_model.py", *rm_args(model_dir, data, data, out, "--per-device-train-batch-size", "5",
                                            "--max-steps", "1", "--learning-rate", "0", "--margin", "0.5",
                                            "--normalize-on", "none"), cwd=tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)

    def score(prompt, response):
        return reward_scores(model, *pad([encode_prompt(tok, prompt, 64)[0] + encode_response(tok, response, 16)[0]],
                                         tok.pad_token_id))[0]
    with torch.no_grad():
        losses = [-F.logsigmoid(score(r["prompt"], r["chosen"]) - score(r["prompt"], r["rejected"]) - 0.5) for r in rows]
    ((step, logged),) = read_metrics(tmp_path, "train/rm/loss")
    assert step == 1 and abs(logged - torch.stack(losses).mean().item()) < 1e-5


def test_gradient_accumulation_matches_one_big_batch(task_dir, model_dir, tmp_path):
    """Rankings with ties dropped give micro-batches of different pair counts: the loss is summed over pairs and
    divided by the pairs of the whole accumulated batch, so 2 x 4 groups equal 1 x 8 groups, step for step."""
    runs = []
    for name, bs, ga in [("big", "8", "1"), ("acc", "4", "2")]:
        (tmp_path / name).mkdir()
        run_script("reward_model.py", *rm_args(model_dir, task_dir / "preference_train.jsonl",
                                                task_dir / "preference_eval.jsonl", tmp_path / name / "out",
                                                "--max-steps", "3", "--learning-rate", "1e-3", "--eval-steps", "1000",
                                                "--normalize-on", "none", "--per-device-train-batch-size", bs,
                                                "--gradient-accumulation-steps", ga), cwd=tmp_path / name)
        runs.append([v for _, v in read_metrics(tmp_path / name, "train/rm/loss")])
    assert len(runs[0]) == 3 and torch.allclose(torch.tensor(runs[0]), torch.tensor(runs[1]), atol=1e-5), runs


def test_model_is_saved_before_a_failing_analysis(model_dir, tmp_path):
    """A judge that fails in the end-of-run analysis must not cost the trained model."""
    (tmp_path / "judge.py").write_text("def gold(prompt, response):\n    raise RuntimeError('the judge failed')\n")
    rows = [{"prompt": f"Visit {i}: the pasta was", "chosen": " great.", "rejected": " awful."} for i in range(16)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    proc = run_script("reward_model.py", *rm_args(model_dir, data, data, tmp_path / "rm", "--max-steps", "2",
                                                   "--normalize-on", "dataset"),
                      "--eval-reward-fn", f"{tmp_path / 'judge.py'}:gold", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "the judge failed" in proc.stderr
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").config.num_labels == 1


def test_normalisation_samples_as_ppo_samples():
    """The offset makes PPO's first rollouts score about 0 only if it is measured on samples drawn the same way."""
    import ppo_rlhf
    import reward_model

    rm, ppo = reward_model.Args(), ppo_rlhf.Args()
    assert (rm.normalize_temperature, rm.normalize_response_length, rm.normalize_max_prompt_length) == (
        ppo.temperature, ppo.response_length, ppo.max_prompt_length)
