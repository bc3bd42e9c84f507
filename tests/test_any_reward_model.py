"""Off-the-shelf reward models: their own tokenizer (and chat template), their own width, several labels."""

import json

import pytest
import torch
from conftest import CHATML, read_metrics, run_script
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig,
                          LlamaForSequenceClassification)

import reviews_task
from common import score_texts


def build_reward_model(tmp_path_factory, task_dir, name, num_labels, chat):
    """A tiny Llama sequence classifier with a vocabulary of its own (300 tokens, not the policy's 400) and another
    width (48, not 64), saved as a Hub folder would be."""
    with open(task_dir / "sft_train.jsonl") as f:
        texts = [r["prompt"] + r["completion"] for r in map(json.loads, f)]
    tok = reviews_task.build_tokenizer(texts, vocab_size=300)
    if chat:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels,
                         pad_token_id=tok.pad_token_id, id2label={i: ["NEGATIVE", "POSITIVE"][i] for i in range(num_labels)}
                         if num_labels == 2 else None)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_reward_model(tmp_path_factory, task_dir):
    return build_reward_model(tmp_path_factory, task_dir, "chat_rm", num_labels=1, chat=True)


@pytest.fixture(scope="module")
def sentiment_classifier(tmp_path_factory, task_dir):
    return build_reward_model(tmp_path_factory, task_dir, "sentiment", num_labels=2, chat=False)


def test_retokenized_scores_equal_scoring_the_text_directly(chat_reward_model, sentiment_classifier):
    """The decode / re-tokenize path gives, for each pair, what the model gives for the same text alone (its own
    tokens, its own pooling), however the batch is padded."""
    prompts = ["The pasta was", [{"role": "user", "content": "Rate the soup"}], "I tried the plot"]
    responses = [" great.", " a bit cold, and the service was far too slow for the price.", " dull."]
    for folder in (chat_reward_model, sentiment_classifier):
        model, tok = AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
        with torch.no_grad():
            batched = score_texts(model, tok, prompts, responses)
            for i, (prompt, response) in enumerate(zip(prompts, responses)):
                turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                if tok.chat_template:
                    text = tok.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=False)
                    ids = tok(text, add_special_tokens=False)["input_ids"]
                else:
                    ids = tok("\n".join(m["content"] for m in turns) + response)["input_ids"]
                alone = model(input_ids=torch.tensor([ids])).logits[0].squeeze(-1)  # Hugging Face's own pooling
                assert torch.allclose(batched[i], alone, atol=1e-5), (folder, i, batched[i], alone)
        assert batched.shape == ((3,) if model.config.num_labels == 1 else (3, 2))


def ppo_args(task_dir, sft_dir, reward_model, out, *extra):
    return ["--sft-model-path", sft_dir, "--reward-model-path", reward_model, "--dataset",
            task_dir / "prompts_train.jsonl", "--eval-dataset", task_dir / "prompts_eval.jsonl", "--output-dir", out,
            "--num-iterations", "2", "--rollout-batch-size", "8", "--response-length", "8", "--num-eval-prompts", "4",
            "--learning-rate", "1e-3", "--eval-reward-fn", "", *extra]


def test_ppo_with_a_reward_model_of_another_tokenizer(task_dir, sft_dir, chat_reward_model, tmp_path):
    proc = run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, chat_reward_model, tmp_path / "out"), cwd=tmp_path)
    assert "its own tokenizer (another vocabulary): responses are decoded and re-tokenized, in its chat template" \
        in proc.stdout
    assert "value model: from the SFT model, not the reward model" in proc.stdout
    value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "value_model")
    assert value.config.hidden_size == 64  # the policy's width, not the reward model's 48
    assert [v for _, v in read_metrics(tmp_path, "val/first_ratio_max_dev")] == [0.0, 0.0]


def test_a_two_label_classifier_needs_a_label_index(task_dir, sft_dir, sentiment_classifier, tmp_path):
    proc = run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, sentiment_classifier, tmp_path / "out"), cwd=tmp_path,
                      check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "has 2 outputs ({0: 'NEGATIVE', 1: 'POSITIVE'}): choose the reward with --reward-label-index" in proc.stderr
    proc = run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, sentiment_classifier, tmp_path / "out",
                                               "--reward-label-index", "1", "--reward-transform", "logsigmoid"),
                      cwd=tmp_path)
    assert "as plain text" in proc.stdout
    scores = [v for _, v in read_metrics(tmp_path, "objective/scores")]
    assert len(scores) == 2 and all(s < 0 for s in scores)  # log P(POSITIVE) is never above 0


def test_the_same_tokenizer_is_recognised(task_dir, sft_dir, tmp_path):
    """A reward model saved with the policy's tokenizer (ours always is) is scored on the policy's ids, as before,
    and initialises the value model."""
    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(sft_dir).save_pretrained(rm)
    proc = run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, rm, tmp_path / "out", "--num-iterations", "1"),
                      cwd=tmp_path)
    assert "reward model: the policy's tokenizer; its token ids are scored directly" in proc.stdout
    assert "value model: from the SFT model" not in proc.stdout
