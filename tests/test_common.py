"""The contracts between the stages: data formats and their errors, tokenizer padding, the reward index."""

import copy
import filecmp

import pytest
import torch
from conftest import CHATML, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import reviews_task
from common import (DataError, encode_prompt, encode_response, end_token_id, last_token_index, pad, read_jsonl, rollout,
                    sample, setup_tokenizer)
from plumbing import disable_dropout, pack, packing_works


def test_formats_are_normalised(tmp_path):
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "p", "completion": " c"},
        {"messages": conv + [{"role": "assistant", "content": "Hello"}]},
    ])
    a, b = read_jsonl(path, "sft")
    assert (a["prompt"], a["completion"], a["where"]) == ("p", " c", f"{path}, line 1")
    assert b["prompt"] == conv and b["completion"] == [{"role": "assistant", "content": "Hello"}]

    path = write_jsonl(tmp_path / "b.jsonl", [
        {"prompt": "p", "chosen": " good", "rejected": " bad"},
        {"chosen": conv + [{"role": "assistant", "content": "A"}], "rejected": conv + [{"role": "assistant", "content": "B"}]},
    ])
    a, b = read_jsonl(path, "preference")
    assert (a["chosen"], a["rejected"]) == (" good", " bad")
    assert b["prompt"] == conv and b["chosen"][0]["content"] == "A" and b["rejected"][0]["content"] == "B"
    assert read_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "x"}]), "prompt")[0]["prompt"] == "x"


def test_prompt_records_keep_their_other_fields(tmp_path):
    """What reward functions read (an `answer`, any column) stays with a prompt record, whatever its format; the
    format's own fields do not."""
    conv = [{"role": "user", "content": "2 + 3?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2 + 3?", "answer": "5", "level": 1},
        {"messages": conv, "answer": "5"},  # a conversation awaiting its answer
        {"messages": conv + [{"role": "assistant", "content": "5"}], "answer": 5},  # an SFT record used for prompts
        {"prompt": "p", "chosen": " a", "rejected": " b", "source": "x"},  # a preference record used for prompts
    ])
    records = read_jsonl(path, "prompt")
    assert [r["fields"] for r in records] == [{"answer": "5", "level": 1}, {"answer": "5"}, {"answer": 5},
                                              {"source": "x"}]
    assert records[1]["prompt"] == conv and records[2]["prompt"] == conv


@pytest.mark.parametrize("line, kind, message", [
    ('{"prompt": "p", "completion": "c"', "sft", "line 2: not valid JSON"),
    ('{"prompt": "p"}', "sft", "line 2: missing field 'completion'"),
    ('{"prompt": 3, "completion": "c"}', "sft", "line 2: field 'prompt' must be a non-empty string"),
    ('{"prompt": "p", "completion": "   "}', "sft", "line 2: field 'completion' is an empty string"),
    ('["p", "c"]', "sft", "line 2: expected a JSON object"),
    ('{"prompt": "p", "chosen": "c"}', "preference", "line 2: missing field 'rejected'"),
    ('{"prompt": "p", "chosen": "c", "rejected": "c"}', "preference", "line 2: fields 'chosen' and 'rejected' are identical"),
    ('{"prompt": "p", "chosen": "", "rejected": "c"}', "preference", "line 2: field 'chosen' is an empty string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "sft", "line 2: field 'messages' must end with an assistant"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, kind, message):
    good = '{"prompt": "p", "completion": "c", "chosen": "a", "rejected": "b"}'
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError) as e:
        read_jsonl(path, kind)
    assert str(e.value).startswith(f"{path}, {message}")


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: the file has no records"):
        read_jsonl(str(tmp_path / "empty.jsonl"), "sft")
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_jsonl(str(tmp_path / "nope.jsonl"), "sft")


@pytest.mark.parametrize("case", ["pad_is_eos", "no_pad"])
def test_pad_token_is_made_distinct_from_eos(case):
    """SmolLM2's trap: pad == eos and no spare token. A new <pad> is added, the embeddings grow, EOS stays a target."""
    tok = reviews_task.build_tokenizer(["The pasta was good.", "The plot was bad."] * 5, vocab_size=300, with_pad=False)
    tok.pad_token = tok.eos_token if case == "pad_is_eos" else None
    model = reviews_task.build_tiny_model(tok, hidden_size=32, num_layers=1)
    vocab = model.get_input_embeddings().weight.shape[0]
    setup_tokenizer(tok, model)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1 == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    ids, _ = encode_response(tok, " good.", 48)
    assert ids[-1] == tok.eos_token_id


def word_tokenizer(chat_template=None):
    """A word-level tokenizer whose ids can be laid out by hand."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "very", "good", ".", "<|im_start|>", "<|im_end|>",
                                         "user", "assistant", "Hi"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = chat_template
    return tok


def test_encode_response_on_hand_laid_ids():
    tok = word_tokenizer()
    assert encode_response(tok, "very good .", 48) == ([3, 4, 5, 2], False)  # the text, then EOS (2)
    assert encode_response(tok, "very good .", 2) == ([3, 4], True)  # cut from the right: no end token
    chat = word_tokenizer(CHATML)  # with a template a response ends with the end-of-turn token, <|im_end|> (7)
    assert encode_response(chat, [{"role": "assistant", "content": "very good ."}], 48) == ([3, 4, 5, 7], False)


def test_encoding_and_chat_template(tokenizer):
    ids, cut = encode_prompt(tokenizer, "The pasta was", 64)
    assert ids[0] == tokenizer.bos_token_id and not cut
    ids, cut = encode_prompt(tokenizer, "The pasta was very good and the service was slow", 4)
    whole = tokenizer("The pasta was very good and the service was slow")["input_ids"]
    assert cut and ids == [tokenizer.bos_token_id] + whole[-3:]  # cut from the left, BOS kept

    chat = copy.deepcopy(tokenizer)
    chat.chat_template = CHATML
    text = "<|im_start|>user\nRate the pasta<|im_end|>\n<|im_start|>assistant\n"
    ids, _ = encode_prompt(chat, [{"role": "user", "content": "Rate the pasta"}], 512)
    assert ids == chat(text, add_special_tokens=False)["input_ids"]  # no BOS added on top of the template
    assert encode_prompt(chat, "Rate the pasta", 512)[0] == ids  # a plain prompt becomes one user turn


def test_long_chat_prompt_keeps_its_frame(tokenizer):
    """A chat prompt over the limit loses the oldest words of its user turn, never the BOS, the system turn or the
    assistant header that the template puts around it; one whose fixed part alone is too long cannot be used."""
    chat = copy.deepcopy(tokenizer)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = "{{ bos_token }}" + CHATML
    story = " ".join(f"the pasta was very good on day {i}" for i in range(30))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": story}]
    assert len(encode_prompt(chat, messages, 10**6)[0]) > 100
    ids, cut = encode_prompt(chat, messages, 40)
    text = chat.decode(ids)
    assert cut and 30 < len(ids) <= 40
    assert text.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("on day 29<|im_end|>\n<|im_start|>assistant\n")  # the newest words are kept
    assert encode_prompt(chat, messages, 8) == (None, True)  # the frame alone is longer than 8 tokens


def test_end_of_turn_token_that_is_not_eos(tokenizer, model_dir):
    """Gemma's template ends a turn with <end_of_turn>, not EOS: a response must end with it, and sampling must stop
    at it."""
    from sft import sample_texts

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end_token_id(tok) == eot != tok.eos_token_id
    assert encode_response(tok, [{"role": "assistant", "content": " fine."}], 48)[0][-1] == eot
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.resize_token_embeddings(len(tok))

    def prefer_end_of_turn(module, inputs, logits):  # the model now always wants to end its turn
        logits[..., eot] += 100.0
        return logits
    model.lm_head.register_forward_hook(prefer_end_of_turn)
    texts, ended = sample_texts(model, tok, ["The pasta was", "The plot was"], 64, 8, "cpu")
    assert texts == ["", ""] and ended == [True, True]


def test_the_sampler_reports_the_log_probs_it_drew_with(model_dir):
    """`rollout(..., with_logprobs=True)`: for each drawn token, log softmax(logits / T) as generation computed it
    (a KV cache, left padding), which a full forward pass over the sampled sequences reproduces in fp32; 0 past the end
    token. These are what GRPO's --tis-cap compares the trainer's log-probs against."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25], [31]]  # unequal: left padding
    torch.manual_seed(0)
    batch = rollout(policy, prompts, 12, 0.7, end_id=7, pad_id=0, with_logprobs=True)
    position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = policy(input_ids=batch.query_responses, attention_mask=batch.attention_mask,
                        position_ids=position_ids).logits[:, batch.context_length - 1: -1] / 0.7
    forward = torch.log_softmax(logits, -1).gather(2, batch.responses[..., None]).squeeze(-1)
    mask = batch.response_mask
    assert batch.sampler_logprobs.shape == batch.responses.shape and (batch.sampler_logprobs[~mask] == 0).all()
    assert torch.allclose(batch.sampler_logprobs[mask], forward[mask], atol=1e-5)
    assert rollout(policy, prompts, 12, 0.7, end_id=7, pad_id=0).sampler_logprobs is None  # only when asked


def test_sampling_ignores_the_models_generation_config(sft_dir, monkeypatch):
    """A generation_config.json with a repetition penalty, no_repeat_ngram_size, min_new_tokens, suppress_tokens and
    top_k must not reach the sampler: the processors generate() builds are the temperature alone, and the first
    token of 4,000 samples follows softmax(logits / T) (total variation below 0.06; sampling noise is ~0.02)."""
    policy = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    tok = AutoTokenizer.from_pretrained(sft_dir)
    prompt = tok("The pasta was")["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(policy(torch.tensor([prompt])).logits[0, -1] / 0.7, dim=-1)  # (V,)
    likely = probs.topk(5).indices.tolist()
    policy.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=3, top_k=3,
                                    suppress_tokens=likely)  # would forbid the five likeliest first tokens
    built = []
    original = type(policy)._get_logits_processor
    monkeypatch.setattr(type(policy), "_get_logits_processor",
                        lambda self, *a, **k: built.append(original(self, *a, **k)) or built[-1])
    torch.manual_seed(0)
    n = 4000
    out = sample(policy, torch.tensor([prompt] * n), torch.ones(n, len(prompt), dtype=torch.long), 1, 0.7,
                 tok.eos_token_id, tok.pad_token_id)
    assert [type(p).__name__ for p in built[0]] == ["TemperatureLogitsWarper"]
    assert policy.generation_config.repetition_penalty == 5.0  # the model's own config is back after the call
    empirical = torch.bincount(out[:, -1], minlength=len(probs)).float() / n
    # total variation over bins: each token of probability >= 1% alone, the rest pooled (per-token counts of a flat
    # tail are too noisy for 4,000 draws)
    bins = torch.where(probs >= 0.01, torch.arange(len(probs)), len(probs))
    binned = lambda p: torch.zeros(len(probs) + 1).index_add_(0, bins, p)  # noqa: E731
    assert 0.5 * (binned(empirical) - binned(probs)).abs().sum() < 0.06
    assert probs[likely].sum() > 0.2  # the test has teeth: suppressing these would move a fifth of the mass


def test_temperature_zero_is_greedy_whatever_the_models_config(sft_dir):
    """Temperature 0 (greedy evaluation): every step takes the argmax of the model's own logits, with the model's
    generation_config (a repetition penalty, top_k 3) kept out as in sampling."""
    policy = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    tok = AutoTokenizer.from_pretrained(sft_dir)
    policy.generation_config.update(repetition_penalty=5.0, top_k=3, do_sample=True, temperature=1.5)
    prompt = tok("The pasta was")["input_ids"]
    torch.manual_seed(0)
    out = sample(policy, torch.tensor([prompt] * 3), torch.ones(3, len(prompt), dtype=torch.long), 8, 0.0, -1,
                 tok.pad_token_id)  # no end token: 8 steps
    assert (out == out[0]).all()  # no randomness
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):  # the slow reference: a full forward, argmax, append
            ids = torch.cat([ids, policy(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out[0].tolist() == ids[0].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dropout_held_as_float_attributes_is_disabled(arch):
    """Llama and Qwen2 attention copy config.attention_dropout into a float at build time; train-mode forwards must
    be identical after disable_dropout all the same."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, attention_dropout=0.3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))
    model.train()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # attention dropout is on
        disable_dropout(model)
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_byte_order_mark_and_crlf_are_read(tmp_path):
    """Files saved by Windows editors and spreadsheet exports: a UTF-8 BOM and CRLF line ends."""
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "completion": " c"}\r\n{"prompt": "q", "completion": " d"}\r\n')
    assert [(r["prompt"], r["completion"]) for r in read_jsonl(str(path), "sft")] == [("p", " c"), ("q", " d")]


def test_prompt_file_takes_conversations_awaiting_an_answer(tmp_path):
    system, user = {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}
    answer = {"role": "assistant", "content": "Hello"}
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [system, user]}, {"prompt": [user]},
                                                    {"messages": [user, answer]}, {"prompt": "plain"}])
    assert [r["prompt"] for r in read_jsonl(path, "prompt")] == [[system, user], [user], [user], "plain"]


def test_last_token_index_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 2]
    ids, mask = pad([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_task_generation_is_deterministic(tmp_path):
    sizes = reviews_task.Sizes(sft_train=50, sft_eval=10, pref_train=40, pref_eval=10, prompts_eval=8)
    reviews_task.generate(str(tmp_path / "a"), seed=3, sizes=sizes)
    reviews_task.generate(str(tmp_path / "b"), seed=3, sizes=sizes)
    reviews_task.generate(str(tmp_path / "c"), seed=4, sizes=sizes)
    names = ["sft_train.jsonl", "sft_eval.jsonl", "preference_train.jsonl", "preference_eval.jsonl",
             "prompts_train.jsonl", "prompts_eval.jsonl"]
    assert filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", names, shallow=False)[0] == names
    assert not filecmp.cmp(tmp_path / "a" / "sft_train.jsonl", tmp_path / "c" / "sft_train.jsonl", shallow=False)
    train = {r["prompt"] for r in read_jsonl(str(tmp_path / "a" / "prompts_train.jsonl"), "prompt")}
    held_out = {r["prompt"] for r in read_jsonl(str(tmp_path / "a" / "prompts_eval.jsonl"), "prompt")}
    assert not train & held_out


def test_gold_judge():
    g = reviews_task.gold_score
    assert g("The pasta was", " wonderful and delightful.") > 0.5
    assert g("The pasta was", " awful, and the service was rude.") < -0.5
    assert g("The pasta was", " not bad.") > 0
    assert g("The pasta was", " wonderful and delightful") < g("The pasta was", " wonderful and delightful.") - 0.9
    assert g("The pasta was", " great great great great great great.") < 0  # stuttering is punished
    assert 0.5 < reviews_task.noise_ceiling([1.0, 0.0], [0.0, 1.0], tau=0.25) < 1.0


def test_ranking_annotator_labels_each_pair_like_bradley_terry():
    """Plackett-Luce with Gumbel noise: over many rankings of 4 fixed golds, the frequency of i ranked above j
    matches sigmoid((g_i - g_j) / tau) for every pair (the pairwise annotator's label), within sampling error."""
    import math
    import random

    golds, tau, n = [0.9, 0.5, 0.4, -0.6], 0.3, 20000
    rng = random.Random(0)
    above = [[0] * 4 for _ in range(4)]
    for _ in range(n):
        order = reviews_task.annotator_ranking(golds, rng, tau)
        for a, i in enumerate(order):
            for j in order[a + 1:]:
                above[i][j] += 1
    for i in range(4):
        for j in range(4):
            if i != j:
                p = 1 / (1 + math.exp(-(golds[i] - golds[j]) / tau))
                assert abs(above[i][j] / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3, (i, j, above[i][j] / n, p)


def test_training_pairs_come_in_rankings(tmp_path):
    """The training file holds each ranking's pairs on consecutive lines with one prompt; they are transitive."""
    sizes = reviews_task.Sizes(sft_train=10, sft_eval=10, pref_train=300, pref_eval=10, prompts_eval=8, ranking_size=4)
    reviews_task.generate(str(tmp_path), seed=0, sizes=sizes)
    rows = read_jsonl(str(tmp_path / "preference_train.jsonl"), "preference")
    runs, i = [], 0
    while i < len(rows):
        j = i
        while j < len(rows) and rows[j]["prompt"] == rows[i]["prompt"]:
            j += 1
        runs.append(rows[i:j])
        i = j
    # a ranking of 4 gives 4 * 3 / 2 = 6 pairs, fewer when the annotator calls a pair a tie
    assert all(len(r) <= 12 for r in runs) and sum(len(r) == 6 for r in runs) > 0.5 * len(runs)
    for run in runs:  # the pairs of a ranking never contradict each other: no a > b and b > a
        wins = {(r["chosen"], r["rejected"]) for r in run}
        assert not any((b, a) in wins for a, b in wins)


def test_packing_check_catches_a_model_that_mixes_packed_sequences(model_dir, monkeypatch):
    """packing_works is what lets sft.py and reward_model.py pack by default: it must fail for a model whose packed
    sequences attend to each other, here transformers with its packed-sequence detection switched off."""
    import transformers.masking_utils
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert packing_works(model)
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_works(model)


def test_packing_check_uses_several_rows(model_dir, monkeypatch):
    """transformers' flash-attention path finds packed sequences only in a batch of one row, and the scripts pack
    into several: the check must catch a model that keeps packed sequences apart in one row only."""
    import transformers.masking_utils
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    one_row_only = transformers.masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices",
                        lambda position_ids: one_row_only(position_ids) if position_ids.shape[0] == 1 else None)
    assert not packing_works(model)


def test_pack_lays_out_rows_and_picks_the_row_length():
    # rows of 12 (twice the longest) feed 24 tokens against 30 for rows of 6, so they are taken
    ids, positions, starts = pack([[1] * 6, [2] * 4, [3] * 4, [4] * 4, [5] * 4, [6] * 2], 0)
    assert ids.tolist() == [[1] * 6 + [2] * 4 + [6] * 2, [3] * 4 + [4] * 4 + [5] * 4]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3] * 3]
    assert starts.tolist() == [[0, 0], [0, 6], [1, 0], [1, 4], [1, 8], [0, 10]]
    # sequences of equal length gain nothing from longer rows: one per row, as padding would lay them out
    ids, positions, _ = pack([[1] * 5, [2] * 5, [3] * 4], 0)
    assert ids.tolist() == [[1] * 5, [2] * 5, [3] * 4 + [0]]
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 0]]
