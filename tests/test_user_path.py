"""The path a new user takes: a chat model of their own and TRL-format conversational files, with nothing but
--model-name-or-path / --dataset and output paths given. Nothing of the embedded task may leak in (its held-out
files, its judge, its tiny model's learning rates), and every stage must end with a saved model that loads."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CHATML, REPO, read_metrics, run_script, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import reviews_task

SYSTEM = {"role": "system", "content": "You finish restaurant reviews."}


def user(text):
    return {"role": "user", "content": f"Finish this review: {text}"}


def assistant(text):
    return {"role": "assistant", "content": text}


def make_chat_model(tok, out):
    """A stand-in for a Hub chat model: a ChatML template, pad == eos == <|im_end|> (SmolLM2's trap), and no mark of
    the embedded task, so the scripts must treat it as a pretrained model."""
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = tok.pad_token = "<|im_end|>"
    tok.chat_template = CHATML
    model = reviews_task.build_tiny_model(tok, hidden_size=64, num_layers=2)
    del model.config.embedded_tiny_model
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tokenizer):
    """A chat model whose vocabulary has a `<pad>` token the scripts can take as their pad."""
    return make_chat_model(copy.deepcopy(tokenizer), tmp_path_factory.mktemp("chat_model"))


@pytest.fixture(scope="module")
def unpadded_chat_model_dir(tmp_path_factory, task_dir):
    """A chat model with no `<pad>` in its vocabulary (SmolLM2's case): the scripts add one and grow the embeddings."""
    with open(task_dir / "sft_train.jsonl") as f:
        texts = [r["prompt"] + r["completion"] for r in map(json.loads, f)]
    return make_chat_model(reviews_task.build_tokenizer(texts, vocab_size=400, with_pad=False),
                           tmp_path_factory.mktemp("unpadded_chat_model"))


def test_a_users_chat_model_and_files_run_the_whole_chain(chat_model_dir, tmp_path):
    dishes = ["the pasta", "the soup", "the steak", "the coffee", "the pizza", "the salad", "the bread", "the curry",
              "the noodles", "the burger", "the dessert", "the wine"]
    # fewer examples, pairs and prompts than the default batch sizes (32 examples, 8 groups, 64 prompts)
    write_jsonl(tmp_path / "sft.jsonl", [{"messages": [SYSTEM, user(f"{d} was"), assistant(f"{d} was great.")]}
                                         for d in dishes])
    write_jsonl(tmp_path / "prefs.jsonl",
                [{"prompt": [user(f"{d} was")], "chosen": [assistant(" lovely.")], "rejected": [assistant(" awful.")]}
                 for d in dishes[:5]]
                + [{"chosen": [user("the tea was"), assistant(" warm.")], "rejected": [user("the tea was"),
                                                                                       assistant(" cold.")]}])
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [SYSTEM, user(f"{d} was")]} for d in dishes[:6]]
                + [{"messages": [user(f"{d} tasted")]} for d in dishes[6:10]])
    for stage in ("sft", "rm", "ppo"):
        (tmp_path / stage).mkdir()

    sft = run_script("sft.py", "--model-name-or-path", chat_model_dir, "--dataset", tmp_path / "sft.jsonl",
                     "--output-dir", tmp_path / "models" / "sft", cwd=tmp_path / "sft")
    assert "12 training examples" in sft.stdout and "no held-out set" in sft.stdout
    assert "learning rate 1e-05 (a pretrained model" in sft.stdout
    rm = run_script("reward_model.py", "--model-name-or-path", tmp_path / "models" / "sft", "--dataset",
                    tmp_path / "prefs.jsonl", "--output-dir", tmp_path / "models" / "rm", cwd=tmp_path / "rm")
    assert "6 training pairs" in rm.stdout and "normalised on 6 sft_samples" in rm.stdout
    ppo = run_script("ppo_rlhf.py", "--sft-model-path", tmp_path / "models" / "sft", "--reward-model-path",
                     tmp_path / "models" / "rm", "--dataset", tmp_path / "prompts.jsonl", "--output-dir",
                     tmp_path / "models" / "ppo", cwd=tmp_path / "ppo")
    assert "--rollout-batch-size 64 -> 10" in ppo.stdout

    # pretrained-model learning rates, no embedded-task evaluation or judge
    for stage, peak in [("sft", 1e-5), ("rm", 1e-5), ("ppo", 3e-6)]:
        assert max(v for _, v in read_metrics(tmp_path / stage, "charts/lr")) <= peak
    (run,) = (tmp_path / "sft" / "runs").iterdir()
    logged = {k for line in open(run / "metrics.jsonl") for k in json.loads(line)}
    assert "eval/sft/eos_rate" in logged and not {"eval/sft/loss", "eval/sft/gold_mean"} & logged
    assert not read_metrics(tmp_path / "rm", "eval/rm/accuracy")
    assert not read_metrics(tmp_path / "ppo", "eval/gold_score") and read_metrics(tmp_path / "ppo", "eval/scores")

    # every stage saved a model that loads with plain transformers, with a pad token that is not the end of a turn
    tok = AutoTokenizer.from_pretrained(tmp_path / "models" / "sft")
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|im_end|>"
    AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "sft")
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "models" / "rm").config.num_labels == 1
    AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "ppo")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "models" / "ppo" / "value_model")

    # the next round: label the PPO policy against the SFT policy on the conversational prompts, then continue the
    # reward model on the first labels and the new ones; responses come back as assistant turns (TRL's format)
    write_jsonl(tmp_path / "judge.py", ["def pick(prompt, a, b):", "    return 'A' if len(a) >= len(b) else 'B'"])
    run_script("label.py", "--policy-path", tmp_path / "models" / "ppo", "--policy-b-path", tmp_path / "models" / "sft",
               "--prompts", tmp_path / "prompts.jsonl", "--output", tmp_path / "labels.jsonl", "--annotator",
               f"{tmp_path / 'judge.py'}:pick", cwd=tmp_path)
    with open(tmp_path / "labels.jsonl") as f:
        labels = [json.loads(line) for line in f]
    assert labels and all(r["chosen"][0]["role"] == "assistant" and isinstance(r["prompt"], list) for r in labels)
    assert all("<|im_end|>" not in r["chosen"][0]["content"] + r["rejected"][0]["content"] for r in labels)
    (tmp_path / "rm2").mkdir()
    rm2 = run_script("reward_model.py", "--model-name-or-path", tmp_path / "models" / "sft", "--continue-from",
                     tmp_path / "models" / "rm", "--dataset", tmp_path / "prefs.jsonl", tmp_path / "labels.jsonl",
                     "--output-dir", tmp_path / "models" / "rm2", cwd=tmp_path / "rm2")
    assert f"{6 + len(labels)} training pairs" in rm2.stdout


@pytest.mark.parametrize("script, missing, command", [("reward_model.py", "models/sft", "python sft.py"),
                                                      ("ppo_rlhf.py", "models/sft", "python sft.py"),
                                                      ("ppo_rlhf.py", "models/reward_model", "python reward_model.py")])
def test_a_missing_upstream_stage_is_named(script, missing, command, tmp_path):
    """Run out of order, a stage says which folder is missing and which command makes it (not a Hub traceback)."""
    if missing == "models/reward_model":  # an SFT model there (its files: the check looks for them, not the folder)
        (tmp_path / "models" / "sft").mkdir(parents=True)
        (tmp_path / "models" / "sft" / "config.json").write_text("{}")
    proc = run_script(script, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{missing} does not exist: run `{command}` first" in proc.stderr


@pytest.mark.parametrize("script", ["reward_model.py", "dpo.py", "grpo.py"])
def test_an_unfinished_sft_run_is_named(script, tmp_path):
    """models/sft holding only an interrupted run's checkpoint/: the next stage says so, in one line, not a tokenizer
    backend's error."""
    (tmp_path / "models" / "sft" / "checkpoint").mkdir(parents=True)
    extra = ["--reward-fn", "reward_functions.py:positivity"] if script == "grpo.py" else []
    proc = run_script(script, *extra, cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "models/sft holds an unfinished run (only its checkpoint/): finish it (rerun `python sft.py`)" in proc.stderr


@pytest.mark.parametrize("script", ["sft.py", "grpo.py"])
def test_data_errors_come_before_any_model_loads(script, chat_model_dir, tmp_path):
    """A bad record stops the run before the wait of a model load: here the model named after it (a reward model that
    does not exist) is never reached; the error names the file, line and field."""
    kind = {"sft.py": '{"prompt": "a"}', "grpo.py": '{"answer": 1}'}[script]
    data = write_jsonl(tmp_path / "data.jsonl", ['{"prompt": "the pasta was", "completion": " good."}', kind])
    flags = (["--model-name-or-path", "no-such-org/no-such-model"] if script == "sft.py" else
             ["--sft-model-path", chat_model_dir, "--reward-model-path", "no-such-org/no-such-reward-model"])
    proc = run_script(script, *flags, "--dataset", data, "--output-dir", tmp_path / "out", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "data.jsonl, line 2: missing field" in proc.stderr, proc.stderr[-500:]


def test_help_reads_as_paragraphs():
    """--help gives each flag's text as one paragraph (the docstrings' line breaks are the source's, not the text's)."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "sft.py"), "--help"], capture_output=True, text=True,
                          env=os.environ | {"COLUMNS": "1000"})
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("│ --")}
    assert "gradients and optimizer state across them" in lines["--strategy"]
    assert "samples training prompts" in lines["--eval-dataset"]


def test_dpo_on_a_users_chat_model_and_conversational_pairs(chat_model_dir, tmp_path):
    """dpo.py with only --model-name-or-path and --dataset: TRL's conversational pairs, one of them written as whole
    chosen/rejected conversations with no prompt field. Its evaluation samples the pairs' own prompts; nothing of the
    embedded task is used."""
    dishes = ["the pasta", "the soup", "the steak", "the coffee", "the pizza"]
    data = write_jsonl(tmp_path / "prefs.jsonl",
                       [{"prompt": [SYSTEM, user(f"{d} was")], "chosen": [assistant(" lovely.")],
                         "rejected": [assistant(" awful.")]} for d in dishes]
                       + [{"chosen": [user("the tea was"), assistant(" warm.")],
                           "rejected": [user("the tea was"), assistant(" cold.")]}])
    proc = run_script("dpo.py", "--model-name-or-path", chat_model_dir, "--dataset", data, "--output-dir",
                      tmp_path / "dpo", cwd=tmp_path)
    assert "learning rate 5e-07 (a pretrained model" in proc.stdout
    assert "6 prompts to sample (from the training pairs)" in proc.stdout
    assert read_metrics(tmp_path, "eval/gold_score") == []  # no judge on the user's data
    assert len(read_metrics(tmp_path, "eval/kl")) == 2  # sampled at the start and at the end
    AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")


def test_every_cut_is_reported(chat_model_dir, tmp_path):
    """Limits that cut a user's data say so, with counts and a warning when many are cut: completions that lose their
    end token in SFT, prompts cut in PPO, responses that reach --response-length; the end and pad tokens are named."""
    long_answer = " ".join(["the sauce was rich and the service was quick"] * 4)
    write_jsonl(tmp_path / "sft.jsonl", [{"messages": [user(f"the {d} was"), assistant(f"{d}: {long_answer}")]}
                                         for d in ("pasta", "soup", "steak", "tea")])
    sft = run_script("sft.py", "--model-name-or-path", chat_model_dir, "--dataset", tmp_path / "sft.jsonl",
                     "--output-dir", tmp_path / "sft", "--max-steps", "1", "--max-completion-length", "16",
                     "--num-eval-generations", "0", cwd=tmp_path)
    assert "end token '<|im_end|>', pad token '<pad>' (added" in sft.stdout
    assert "warning: 4 of 4 completions were cut, losing their end token: raise --max-completion-length" in sft.stdout
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [user(f"the {d} was {long_answer}")]}
                                             for d in ("pasta", "soup", "steak", "tea")])
    ppo = run_script("ppo_rlhf.py", "--sft-model-path", tmp_path / "sft", "--dataset", tmp_path / "prompts.jsonl",
                     "--reward-fn", "reward_functions.py:positivity", "--output-dir", tmp_path / "ppo",
                     "--num-iterations", "1", "--response-length", "2", "--max-prompt-length", "24", cwd=tmp_path)
    assert "warning: 4 of 4 prompts cut from the left to --max-prompt-length 24" in ppo.stdout
    assert "responses reached --response-length 2 without their end token" in ppo.stdout


def test_track_without_wandb_stops_at_once(tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    proc = run_script("sft.py", "--track", "--output-dir", tmp_path / "out", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--track logs to Weights & Biases, which is not installed: pip install wandb" in proc.stderr
    assert not (tmp_path / "models").exists()  # stopped before making or loading anything


def test_a_reward_model_scores_where_transformers_reads_it(chat_model_dir, tmp_path):
    """Loaded the usual way (AutoModelForSequenceClassification on the chat template's rendering of the conversation,
    which ends "<|im_end|>\\n"), a reward model trained by reward_model.py gives the score it was trained to give: its
    training read the same last token, the one after the end token."""
    import reward_model
    from common import read_jsonl, reward_scores, score_suffix
    pairs = [{"prompt": [user(f"{d} was")], "chosen": [assistant(" lovely.")], "rejected": [assistant(" awful.")]}
             for d in ("the pasta", "the soup", "the steak", "the tea")]
    write_jsonl(tmp_path / "prefs.jsonl", pairs)
    proc = run_script("reward_model.py", "--model-name-or-path", chat_model_dir, "--dataset", tmp_path / "prefs.jsonl",
                      "--output-dir", tmp_path / "rm", "--max-steps", "40", "--learning-rate", "1e-3", "--normalize-on",
                      "dataset", cwd=tmp_path)
    assert "with a new scalar head" in proc.stdout and "LOAD REPORT" not in proc.stderr  # the new head is expected
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert score_suffix(tok) == tok("\n", add_special_tokens=False)["input_ids"]
    trained_on = reward_model.encode_pairs(read_jsonl(str(tmp_path / "prefs.jsonl"), "preference"), tok,
                                           reward_model.Args())[0]  # (prompt, chosen, rejected) ids, as in training
    for pair, (prompt_ids, *response_ids) in zip(pairs, trained_on):
        standard = []
        for response, ids in zip((pair["chosen"], pair["rejected"]), response_ids):
            inputs = tok.apply_chat_template(pair["prompt"] + response, return_tensors="pt", return_dict=True)
            assert prompt_ids + ids == inputs["input_ids"][0].tolist()  # training read the last token, as below
            standard.append(rm(**inputs).logits[0, 0].item())  # transformers' pooling: at the last token, the "\n"
            ours = reward_scores(rm, inputs["input_ids"], inputs["attention_mask"]).item()
            assert ours + rm.config.reward_offset == pytest.approx(standard[-1], abs=1e-5)
        assert standard[0] > standard[1], standard  # chosen above rejected, loaded the usual way


@pytest.mark.parametrize("padding_free", [False, True])
def test_ppo_reads_a_reward_model_where_transformers_does(chat_model_dir, padding_free):
    """PPO's responses stop at the end token; their score is read after the template's suffix, as on the rendered
    conversation. A response cut at --response-length (no end token) is read at its last token, unchanged."""
    from common import (encode_prompt, end_token_id, reward_scores, score_suffix, setup_tokenizer, truncate_after_eos,
                        with_score_suffix)
    from plumbing import layout
    tok = setup_tokenizer(AutoTokenizer.from_pretrained(chat_model_dir))
    rm = AutoModelForSequenceClassification.from_pretrained(chat_model_dir, num_labels=1).eval()
    setup_tokenizer(tok, rm)
    torch.manual_seed(0)
    torch.nn.init.normal_(rm.score.weight)
    prompts = [[user("the pasta was")], [user("the soup at the corner place was")]]
    queries = [encode_prompt(tok, p, 64)[0] for p in prompts]
    end = end_token_id(tok)
    sampled = [tok(" lovely.", add_special_tokens=False)["input_ids"] + [end, 7, 7],
               tok(" cold and", add_special_tokens=False)["input_ids"] + [9, 9, 9]]  # the second never ends
    width = max(map(len, queries))
    query_ids = torch.tensor([[tok.pad_token_id] * (width - len(q)) + q for q in queries])
    query_mask = (query_ids != tok.pad_token_id).long()
    responses, response_mask, has_eos = truncate_after_eos(torch.tensor(sampled), end, tok.pad_token_id)
    ids, mask = with_score_suffix(torch.cat([query_ids, responses], 1), torch.cat([query_mask, response_mask.long()], 1),
                                  has_eos, score_suffix(tok))
    inputs, _, last = layout(ids, mask, width, padding_free)
    with torch.no_grad():
        ours = reward_scores(rm, **inputs, last=last)
        rendered = tok.apply_chat_template(prompts[0] + [assistant(" lovely.")], return_tensors="pt", return_dict=True)
        assert ours[0].item() == pytest.approx(rm(**rendered).logits[0, 0].item(), abs=1e-5)
        cut = torch.tensor([queries[1] + sampled[1]])
        assert ours[1].item() == pytest.approx(rm(input_ids=cut).logits[0, 0].item(), abs=1e-5)


def test_grpo_on_a_users_chat_model_with_a_verifier(chat_model_dir, tmp_path):
    """grpo.py with only --sft-model-path, --dataset (conversational prompts with an `answer` field) and a verifier as
    --reward-fn: a pretrained model's learning rate, no KL penalty and no reference pass (a reward function alone), no
    embedded-task judge or held-out file, the verifier's unreadable answers counted; the saved policy loads."""
    write_jsonl(tmp_path / "problems.jsonl", [{"prompt": [SYSTEM, user(f"Compute {a} + {b}.")], "answer": str(a + b)}
                                              for a in range(3) for b in range(3)])
    proc = run_script("grpo.py", "--sft-model-path", chat_model_dir, "--dataset", tmp_path / "problems.jsonl",
                      "--reward-fn", "arithmetic_task.py:verify", "--output-dir", tmp_path / "grpo", "--num-iterations",
                      "2", cwd=tmp_path)
    assert "learning rate 1e-06 (a pretrained model" in proc.stdout
    assert "kl_coef 0: no KL penalty and no reference pass in training" in proc.stdout
    assert "--rollout-batch-size 16 -> 9" in proc.stdout and "no held-out prompts" in proc.stdout
    assert read_metrics(tmp_path, "eval/gold_score") == [] and len(read_metrics(tmp_path, "eval/scores")) == 2
    failures = [v for _, v in read_metrics(tmp_path, "objective/parse_failures")]
    assert len(failures) == 2 and all(0 <= v <= 1 for v in failures)
    # what fits a verifier, once: its one score term is the score itself, and stutters are a reward model's hazard
    assert not read_metrics(tmp_path, "eval/score_verify") and not read_metrics(tmp_path, "objective/score_verify")
    assert not read_metrics(tmp_path, "eval/stutter_rate") and len(read_metrics(tmp_path, "eval/parse_failures")) == 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "grpo")
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|im_end|>"
    AutoModelForCausalLM.from_pretrained(tmp_path / "grpo")


def test_grpo_grows_the_references_embeddings_too(unpadded_chat_model_dir, tmp_path):
    """A model whose vocabulary has no pad token gets one, in the policy and in the reference alike: the final
    evaluation samples the reference on left-padded prompts (the win rate against it), so its embeddings must hold the
    new pad id."""
    write_jsonl(tmp_path / "problems.jsonl", [{"prompt": [user(f"Compute {a} + {b}." + " Show your work." * a)],
                                               "answer": str(a + b)} for a in range(3) for b in range(3)])
    run_script("grpo.py", "--sft-model-path", unpadded_chat_model_dir, "--dataset", tmp_path / "problems.jsonl",
               "--reward-fn", "arithmetic_task.py:verify", "--eval-reward-fn", "arithmetic_task.py:verify",
               "--output-dir", tmp_path / "grpo", "--num-iterations", "1", "--num-generations", "2",
               "--num-mini-batches", "1", cwd=tmp_path)
    assert len(read_metrics(tmp_path, "eval/gold_win_rate_vs_sft")) == 1
