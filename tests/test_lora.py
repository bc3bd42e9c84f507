"""LoRA (--lora-r): only the adapters (and a score head) train, the reference is the policy with its adapters off and
equals the SFT model exactly, the merged save equals the adapter model, and the adapter loads with peft."""

import pytest
import torch
from conftest import read_metrics, run_script
from test_dpo import dpo_args, toy_preferences
from test_ppo import ppo_args
from test_user_path import chat_model_dir, unpadded_chat_model_dir  # noqa: F401  (fixtures: chat models whose pad is eos)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

pytest.importorskip("peft")
from plumbing import Parallel, WithoutAdapters, add_lora, decay_groups, save_model  # noqa: E402


def perturb_adapters(model, seed=0):
    """LoRA starts with B = 0 (the adapters add nothing): give every B some weight, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.05


def test_only_adapters_and_head_are_trained(model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, 4, 8.0, "all-linear", str(model_dir), head="score")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n == "score.weight" for n in trainable), trainable
    assert any("mlp.down_proj.lora_A" in n for n in trainable) and "score.weight" in trainable  # every linear layer
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    optimizer = torch.optim.AdamW(decay_groups(Parallel(model), 0.1), lr=1e-2)
    for _ in range(2):
        model(input_ids=torch.tensor([[5, 9, 12, 7]])).logits.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    in_state = {id(p) for p in optimizer.state}
    assert in_state == {id(p) for p in model.parameters() if p.requires_grad}  # AdamW's moments: of these only
    for name, value in model.state_dict().items():
        if "lora_" not in name and name != "score.weight":
            assert torch.equal(value, start[name.replace(".base_layer.", ".")]), name  # frozen, unchanged


def test_reference_is_the_start_model_with_adapters_off(model_dir):
    start = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    add_lora(policy, 4, 8.0, "all-linear", str(model_dir))
    perturb_adapters(policy)
    ids = torch.tensor([[1, 20, 21, 22, 23, 24]])
    value_net = torch.nn.Linear(2, 2)  # a second model in the wrapper, as PPO's policy_w holds the value model too
    parallel = Parallel(policy, value_net)
    with torch.no_grad():
        expected = start(input_ids=ids).logits
        adapted = parallel(lambda p, v, x: p(input_ids=x).logits, ids)
        reference = WithoutAdapters(parallel, policy)(lambda p, x: p(input_ids=x).logits, ids)
    assert not torch.allclose(adapted, expected)
    assert torch.equal(reference, expected)  # exactly the model the policy started from
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)  # trainable again after


@pytest.mark.parametrize("kind", ["causal", "score"])
def test_merged_save_equals_the_adapter_model_and_loads_with_peft(kind, chat_model_dir, tmp_path):  # noqa: F811
    """A tokenizer with pad == eos makes the scripts add a pad token and grow the embeddings: the merged folder and the
    adapter (loaded by peft onto the base, the grown embeddings with it) both give the trained model's outputs, and
    the adapter loaded back (as a resumed run does) gives them exactly."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
    base = tmp_path / "base"  # the chat model with a token its embeddings lack: the scripts grow them (as a pad
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)  # token added to SmolLM2's tokenizer does)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    AutoModelForCausalLM.from_pretrained(chat_model_dir).save_pretrained(base)
    tokenizer.save_pretrained(base)
    Auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {} if kind == "causal" else {"num_labels": 1}

    def load():
        from common import setup_tokenizer
        model = Auto.from_pretrained(base, **extra)
        setup_tokenizer(tokenizer, model)  # a pad token apart from eos, the embeddings as long as the tokenizer
        return model

    model = load()
    assert len(tokenizer) > AutoModelForCausalLM.from_pretrained(base).config.vocab_size
    add_lora(model, 4, 16.0, "all-linear", str(base), head="" if kind == "causal" else "score")
    perturb_adapters(model)
    if kind == "score":
        torch.nn.init.normal_(model.score.weight, std=0.5)  # a trained head, not the base's random one
    ids = torch.tensor([[3, 10, 11, 12, 13]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_model(str(tmp_path / "out"), tokenizer, {"lora": True}, ("", model))
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]  # a plain model's names
    merged = Auto.from_pretrained(tmp_path / "out", **extra).eval()
    Peft = AutoPeftModelForCausalLM if kind == "causal" else AutoPeftModelForSequenceClassification
    from_adapter = Peft.from_pretrained(tmp_path / "out" / "adapter", **extra).eval()
    resumed = add_lora(load(), 4, 16.0, "all-linear", str(base), head="" if kind == "causal" else "score",
                       resume_dir=str(tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_adapter(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(resumed(input_ids=ids).logits, expected)


@pytest.fixture(scope="module")
def spare_token_model_dir(tmp_path_factory, task_dir):
    """A chat model with pad == eos and an unused special token (<unk>, as SmolLM2 has <|endoftext|>)."""
    import json

    import reviews_task
    from test_user_path import make_chat_model

    with open(task_dir / "sft_train.jsonl") as f:
        texts = [r["prompt"] + r["completion"] for r in map(json.loads, f)]
    tok = reviews_task.build_tokenizer(texts, vocab_size=400, with_pad=False)
    tok.add_special_tokens({"unk_token": "<unk>"})
    return make_chat_model(tok, tmp_path_factory.mktemp("spare_token_model"))


def chat_sft_with_lora(model_dir, tmp_path):
    from conftest import write_jsonl
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": f"{d} was"},
                                                              {"role": "assistant", "content": f" {d} was great."}]}
                                                for d in ("the pasta", "the soup", "the tea", "the bread")])
    run_script("sft.py", "--model-name-or-path", model_dir, "--dataset", data, "--output-dir", tmp_path / "out",
               "--lora-r", "4", "--max-steps", "3", "--learning-rate", "1e-2", "--num-eval-generations", "0",
               cwd=tmp_path)
    return tmp_path / "out"


def test_the_adapter_loads_on_the_untouched_base_the_usual_way(spare_token_model_dir, tmp_path):
    """A tokenizer whose pad is its eos but which has a spare token: that token becomes the pad, the vocabulary stays,
    and `PeftModel.from_pretrained(base, adapter)` on the base as downloaded gives the merged model's outputs; the
    adapter carries no embeddings."""
    from peft import PeftModel
    from safetensors import safe_open

    out = chat_sft_with_lora(spare_token_model_dir, tmp_path)
    assert AutoTokenizer.from_pretrained(out).pad_token == "<unk>"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(spare_token_model_dir), out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[3, 10, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "embed" in k or "lm_head" in k]


def test_the_adapter_loads_on_the_base_grown_as_docs_say(unpadded_chat_model_dir, tmp_path):  # noqa: F811
    """A tokenizer with no pad and no spare token gets a new one: the documented step (grow the base's embeddings to
    the adapter's tokenizer, then load the adapter, which carries the grown embeddings) gives the merged model."""
    from peft import PeftModel

    out = chat_sft_with_lora(unpadded_chat_model_dir, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(unpadded_chat_model_dir)
    assert len(tokenizer) == base.config.vocab_size + 1
    base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[3, 10, 11, 12, len(tokenizer) - 1]])  # the new pad token too
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_ppo_with_lora_shares_the_reference(task_dir, sft_dir, tmp_path):
    """PPO with --lora-r: no second copy of the policy (the reference is the policy with its adapters off), so the first
    minibatch's ratio is exactly 1 and the first KL exactly 0; policy and value model are saved merged, each with its
    adapter; weights outside the adapters are the SFT model's."""
    run_script("ppo_rlhf.py", *ppo_args(task_dir, sft_dir, tmp_path / "out", "--num-iterations", "2", "--lora-r", "8",
                                        "--reward-fn", "reward_functions.py:positivity", "--value-model", "separate",
                                        "--eval-reward-fn", ""), cwd=tmp_path)
    assert [v for _, v in read_metrics(tmp_path, "val/first_ratio_max_dev")] == [0.0, 0.0]
    kl = read_metrics(tmp_path, "objective/kl")
    assert kl[0][1] == 0.0 and kl[1][1] != 0.0
    for folder in (tmp_path / "out", tmp_path / "out" / "value_model"):
        assert (folder / "adapter" / "adapter_model.safetensors").exists()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    start = AutoModelForCausalLM.from_pretrained(sft_dir).state_dict()
    changed = {k for k in start if not torch.equal(trained[k], start[k])}
    assert changed and all(k.endswith("proj.weight") for k in changed), changed  # only the adapted linear layers


def test_dpo_with_lora_learns_the_toy_preference(sft_dir, tmp_path):
    """The DPO learning test with LoRA adapters (rank 8) in place of full fine-tuning: at step 0 every held-out pair
    ties (the reference is the policy with its adapters off, B = 0), and the accuracy reaches 95%."""
    data, eval_data = toy_preferences(tmp_path)
    proc = run_script("dpo.py", *dpo_args(sft_dir, data, eval_data, tmp_path / "out", "--num-epochs", "3",
                                          "--eval-steps", "10", "--lora-r", "8"), cwd=tmp_path)
    assert "learning rate 0.001 (the embedded tiny model, LoRA: 10x" in proc.stdout  # 10x the default of 1e-4
    accuracy = read_metrics(tmp_path, "eval/dpo/accuracy")
    assert accuracy[0][1] == 0.5 and accuracy[-1][1] >= 0.95, accuracy
    margins = [v for _, v in read_metrics(tmp_path, "rewards/margins")]
    assert sum(margins[-5:]) / 5 > 0.5, margins


def test_grpo_with_lora_and_a_kl_term(task_dir, sft_dir, tmp_path):
    """GRPO with --lora-r and a KL penalty: the reference is the policy with its adapters off (nothing else loaded), so
    the first iteration's KL is exactly 0 and the second's is not; the merged model and its adapter are saved."""
    from test_grpo import grpo_args

    proc = run_script("grpo.py", *grpo_args(task_dir, sft_dir, tmp_path / "out", "--num-iterations", "2", "--lora-r",
                                            "8", "--kl-coef", "0.05", "--reward-fn", "reward_functions.py:positivity"),
                      cwd=tmp_path)
    assert "the reference is the policy with its adapters off" in proc.stdout
    kl = read_metrics(tmp_path, "objective/kl")
    assert kl[0][1] == 0.0 and kl[1][1] != 0.0, kl
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_unknown_target_modules_stop_with_one_line(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    message = "error: --lora-target-modules q_proj,qkv_fused: this model has no linear layer named qkv_fused"
    with pytest.raises(SystemExit, match=message):
        add_lora(model, 4, 8.0, "q_proj,qkv_fused", str(model_dir))


def test_bf16_base_keeps_adapters_and_head_in_fp32(model_dir, tmp_path):
    """--bf16 with LoRA: the frozen base is held in bf16, what trains (adapters, score head) and AdamW's state in fp32;
    the merged save is fp32 and gives the trained model's outputs (to bf16's precision)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.bfloat16)
    add_lora(model, 8, 32.0, "all-linear", str(model_dir), head="score")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    optimizer = torch.optim.AdamW(decay_groups(Parallel(model), 0.0), lr=1e-2)
    ids = torch.tensor([[5, 9, 12, 7]])
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids).logits.float().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    save_model(str(tmp_path / "out"), AutoTokenizer.from_pretrained(model_dir), {}, ("", model))
    from safetensors.torch import load_file
    assert {v.dtype for v in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.float32}
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", num_labels=1, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        trained = model(input_ids=ids).logits.float()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=2e-2, atol=2e-2)


def test_without_peft_the_flag_stops_with_the_pip_line(model_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"error: --lora-r needs the optional peft package: pip install peft"):
        add_lora(AutoModelForCausalLM.from_pretrained(model_dir), 4, 8.0, "all-linear", str(model_dir))
