"""Tool calls inside rollouts (common.rollout_with_tools): the call parsed, run under a timeout, its failures handed
to the model as text; the tool turn inserted as the chat template renders it, after the sampled ids as they are."""

import copy
import os
import time

import pytest
import torch
from conftest import CHATML, REPO

import common
import reviews_task
from common import call_tool, parse_tool_call, rollout_with_tools, tool_turn


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def slow(x: int) -> int:
    """Never answers in time."""
    time.sleep(30)
    return x


def broken(x: int) -> int:
    """Raises."""
    raise RuntimeError("the calculator is on fire")


TOOLS = {"multiply": multiply, "slow": slow, "broken": broken}


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    common.setup_tokenizer(tok)
    return tok


def test_a_call_parses_or_says_why_not():
    assert parse_tool_call('I will. <tool_call>{"name": "multiply", "arguments": {"a": 3, "b": 4}}</tool_call>') == (
        "multiply", {"a": 3, "b": 4})
    assert parse_tool_call("<tool_call>{name: multiply}</tool_call>").startswith("error: the tool call is not JSON")
    assert parse_tool_call('<tool_call>["multiply"]</tool_call>').startswith("error: a tool call is")
    assert parse_tool_call("no call here").startswith("error: no <tool_call>")


def test_whatever_goes_wrong_becomes_the_result_and_is_counted():
    def call(name, **arguments):
        import json
        return call_tool(TOOLS, f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>", 0.5)

    assert call("multiply", a=12, b=34) == ("408", "ok")
    result, outcome = call("divide", a=1, b=2)
    assert outcome == "unknown" and "no tool named 'divide'" in result
    result, outcome = call("broken", x=1)
    assert outcome == "error" and "RuntimeError: the calculator is on fire" in result
    result, outcome = call("multiply", a=1)  # a missing argument: the model called it wrong
    assert outcome == "error" and "TypeError" in result
    start = time.time()
    result, outcome = call("slow", x=1)
    assert outcome == "timeout" and time.time() - start < 10  # abandoned, not waited for (the tool sleeps 30 s)
    assert call_tool(TOOLS, "<tool_call>{oops</tool_call>", 0.5)[1] == "parse"


def test_the_tool_turn_is_the_templates_rendering(chat_tokenizer):
    ids = tool_turn(chat_tokenizer, "408")
    assert chat_tokenizer.decode(ids) == "\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]
    rendered = chat_tokenizer.apply_chat_template(conversation + [{"role": "tool", "content": "408"}], tokenize=False,
                                                  add_generation_prompt=True)
    cut = chat_tokenizer.apply_chat_template(conversation, tokenize=False).rstrip("\n")
    assert rendered == cut + chat_tokenizer.decode(ids)


class NoModel(torch.nn.Module):
    """Where a rollout only asks the model for its device (the sampling is scripted)."""
    device = torch.device("cpu")


def test_a_template_that_shows_tools_gets_their_schema_in_every_prompt(chat_tokenizer, capsys):
    """With a template that renders tools (as Qwen's do, in a system turn), each prompt holds the tool's JSON schema,
    from its type hints and docstring, and keeps it when a long prompt is cut (its user turn loses text instead);
    no start line says the schema is missing."""
    from plumbing import load_tools
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = ("{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
                         "<|im_end|>\n{% endif %}" + CHATML)
    spec = os.path.join(REPO, "calculator_task.py") + ":multiply"  # type hints and a docstring with Args
    tools = list(load_tools((spec,), tok).values())
    assert "shows no tool schema" not in capsys.readouterr().out
    ids, cut = common.encode_prompt(tok, "Compute 12 * 34.", 512, tools)
    text = tok.decode(ids)
    assert not cut and '"name": "multiply"' in text and '"a": {"type": "integer"' in text, text
    short, cut = common.encode_prompt(tok, "Compute " + "12 * " * 40 + "34.", len(ids) + 10, tools)
    assert cut and len(short) <= len(ids) + 10 and '"name": "multiply"' in tok.decode(short)
    plain = copy.deepcopy(chat_tokenizer)  # ChatML alone: no schema, and a start line says so
    load_tools((spec,), plain)
    assert "shows no tool schema" in capsys.readouterr().out
    assert "multiply" not in plain.decode(common.encode_prompt(plain, "Compute 12 * 34.", 512, tools)[0])


def scripted_sample(turns):
    """A stand-in for common.sample that writes the given ids, turn after turn per row, and records what it was fed."""
    fed = []

    def sample(model, queries, query_mask, max_new_tokens, temperature, end_id, pad_id, *rest):
        fed.append([q[m.bool()].tolist() for q, m in zip(queries, query_mask)])
        rows = [turns[len(fed) - 1][k] for k in range(len(queries))]
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        return torch.cat([queries, new], dim=1)
    return sample, fed


def test_token_in_token_out(chat_tokenizer, monkeypatch):
    """The episode holds the sampled ids exactly (here a tokenization no encoder would produce: "<tool_call>" and the
    JSON spelled out byte by byte), the template's tool turn after them, and the policy's answer; the second round is
    fed those very ids; only the sampled tokens are the policy's."""
    tok = chat_tokenizer
    end = common.end_token_id(tok)
    call_text = '<tool_call>{"name": "multiply", "arguments": {"a": 12, "b": 34}}</tool_call>'
    canonical = tok(call_text, add_special_tokens=False)["input_ids"]
    call_ids = [i for ch in call_text for i in tok(ch, add_special_tokens=False)["input_ids"]] + [end]  # one by one
    assert call_ids[:-1] != canonical and tok.decode(call_ids[:-1]) == call_text
    answer = tok(" 408", add_special_tokens=False)["input_ids"] + [end]
    plain = tok(" no tool", add_special_tokens=False)["input_ids"] + [end]
    sample, fed = scripted_sample([[call_ids, plain], [answer]])
    monkeypatch.setattr(common, "sample", sample)
    prompts = [tok("Compute 12 * 34.")["input_ids"], tok("Say hi.")["input_ids"]]
    out = rollout_with_tools(NoModel(), tok, prompts, TOOLS, 160, 1.0, end, tok.pad_token_id,
                             max_tool_calls=2)
    inserted = tool_turn(tok, "408")
    first = call_ids + inserted + answer
    assert out.responses[0, : len(first)].tolist() == first
    assert out.policy_mask[0, : len(first)].tolist() == [True] * len(call_ids) + [False] * len(inserted) + [True] * len(
        answer)
    assert out.response_mask[0].sum() == len(first) and not out.policy_mask[0, len(first):].any()
    assert fed[1] == [prompts[0] + call_ids + inserted]  # round 2: the unfinished response alone, ids as sampled
    assert out.tool_calls == [[("408", "ok")], []]
    assert out.responses[1, : len(plain)].tolist() == plain and out.policy_mask[1].sum() == len(plain)
    assert out.has_eos.tolist() == [True, True]


def test_rewards_read_what_the_policy_wrote_not_the_tools_result(chat_tokenizer, monkeypatch):
    """A verifier reads the response the policy wrote: its turns, never a tool's result. Found in the calculator task:
    with the decoded response (tool turns included) as the text, the policy learned to answer a call's result with
    nothing ("</tool_call>") and the verifier took the result, the last number in the text, for its answer."""
    from types import SimpleNamespace

    from arithmetic_task import verify
    from plumbing import score_responses
    tok = chat_tokenizer
    end = common.end_token_id(tok)
    call_ids = tok('<tool_call>{"name": "multiply", "arguments": {"a": 12, "b": 34}}</tool_call>',
                   add_special_tokens=False)["input_ids"] + [end]
    silent, answered = (tok(text, add_special_tokens=False)["input_ids"] + [end] for text in (" ok", " It is 408."))
    monkeypatch.setattr(common, "sample", scripted_sample([[call_ids, call_ids], [silent, answered]])[0])
    batch = rollout_with_tools(NoModel(), tok, [tok("Compute 12 * 34.")["input_ids"]] * 2, TOOLS, 160, 1.0, end,
                               tok.pad_token_id)
    assert common.response_texts(batch, tok)[1].endswith("</tool_call>\n It is 408.")
    records = [{"prompt": "Compute 12 * 34.", "fields": {"answer": "408"}}] * 2
    args = SimpleNamespace(reward_fn_timeout=10.0)
    scores, _ = score_responses(batch, records, tok, [], [("score_verify", verify, 1.0)], args, False, None)
    assert scores.tolist() == [0.0, 1.0]  # the silent one read as 34, a call's argument: wrong


def test_calls_are_capped_and_outputs_cut(chat_tokenizer, monkeypatch):
    tok = chat_tokenizer
    end = common.end_token_id(tok)
    tools = {"huge": lambda: "x" * 1_000_000}  # a megabyte of output
    call_ids = tok('<tool_call>{"name": "huge"}</tool_call>', add_special_tokens=False)["input_ids"] + [end]
    sample, fed = scripted_sample([[call_ids], [call_ids], [call_ids]])
    monkeypatch.setattr(common, "sample", sample)
    out = rollout_with_tools(NoModel(), tok, [tok("Go.")["input_ids"]], tools, 200, 1.0, end,
                             tok.pad_token_id, max_tool_calls=2, max_tool_output_tokens=8)
    assert len(fed) == 3 and [o for _, o in out.tool_calls[0]] == ["ok+cut", "ok+cut"]  # the third turn's call is not run
    assert all(result.endswith(" [cut]") and len(result) < 100 for result, _ in out.tool_calls[0])
    assert out.response_mask.sum() <= 200


def test_a_real_model_samples_with_tools(chat_tokenizer):
    """No script: a tiny random model's rollout has the shapes and masks a plain rollout has."""
    tok = chat_tokenizer
    torch.manual_seed(0)
    model = reviews_task.build_tiny_model(tok, hidden_size=32, num_layers=1).eval()
    prompts = [tok("Compute 12 * 34.")["input_ids"], tok("Say hi.")["input_ids"]]
    out = rollout_with_tools(model, tok, prompts, TOOLS, 16, 1.0, common.end_token_id(tok), tok.pad_token_id)
    episodes = out
    assert episodes.query_responses.shape == (2, episodes.context_length + episodes.responses.shape[1])
    assert (out.policy_mask <= episodes.response_mask).all() and episodes.response_mask.sum(1).max() <= 16


def test_a_tool_turn_is_context_never_an_action(chat_tokenizer, monkeypatch):
    """A response with two calls (sampled, tool turn, sampled, tool turn, sampled): one optimizer step's gradient is
    the hand-written one, -A * grad log pi of the sampled tokens only, each given everything before it (tool turns
    included) over the count of sampled tokens; with other results in the tool turns it is again that reference
    (the tool tokens' own log-probs never enter), and counting the tool turns as actions would change it."""
    from grpo import Args, Episodes, backward_minibatch
    from plumbing import Parallel

    tok = chat_tokenizer
    end = common.end_token_id(tok)
    torch.manual_seed(0)
    model = reviews_task.build_tiny_model(tok, hidden_size=32, num_layers=2)
    call = lambda a, b: tok('<tool_call>{"name": "multiply", "arguments": {"a": %d, "b": %d}}</tool_call>' % (  # noqa: E731
        a, b), add_special_tokens=False)["input_ids"] + [end]
    answer = tok(" 4080", add_special_tokens=False)["input_ids"] + [end]
    prompts = [tok("Compute 12 * 34 * 10.")["input_ids"], tok("Compute 2 * 3.")["input_ids"]]
    args = Args(loss_aggregation="token", kl_coef=0.0, response_length=200, temperature=0.7)

    def step(tools, as_actions=False):
        sample, _ = scripted_sample([[call(12, 34), call(2, 3)], [call(408, 10), answer], [answer]])
        monkeypatch.setattr(common, "sample", sample)
        batch = rollout_with_tools(NoModel(), tok, prompts, tools, 200, 0.7, end, tok.pad_token_id, max_tool_calls=2)
        mask = (batch.response_mask if as_actions else batch.actions()).float()
        episodes = Episodes(batch, mask, torch.tensor([1.5, -0.5]), None, None)
        model.zero_grad()
        backward_minibatch(Parallel(model), episodes, torch.arange(2), 1, args, True,
                           lambda: torch.autocast("cpu", enabled=False))
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()  # the reference: each response alone, no padding, its log-probs at the sampled tokens
        count = sum(batch.actions()[i].sum() for i in range(2))
        for i in range(2):
            n = int(batch.response_mask[i].sum())
            ids = torch.tensor([prompts[i] + batch.responses[i, :n].tolist()])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompts[i]) - 1: -1] / 0.7, -1)
            token_logp = logp.gather(1, ids[0, len(prompts[i]):, None])[:, 0]
            (-episodes.advantages[i] * token_logp[batch.actions()[i, :n]].sum() / count).backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        # over the whole gradient: a few weights with near-zero gradients (q, k of a random model) carry only rounding
        return batch, (sum((got[k] - expected[k]).norm() ** 2 for k in expected) ** 0.5
                       / sum(expected[k].norm() ** 2 for k in expected) ** 0.5).item()

    batch, gap = step(TOOLS)
    assert [len(c) for c in batch.tool_calls] == [2, 1] and gap < 1e-5
    inserted = (~batch.actions() & batch.response_mask).sum(1).tolist()
    assert inserted == [len(tool_turn(tok, "408")) + len(tool_turn(tok, "4080")), len(tool_turn(tok, "6"))]
    other = {"multiply": lambda a, b: a + b}  # other tool results: other context, the same rule
    batch_other, gap = step(other)
    assert batch_other.tool_calls[0][0][0] == "46" and gap < 1e-5
    assert step(TOOLS, as_actions=True)[1] > 1e-3  # the tool turns' tokens as actions: another gradient


TOOLS_FILE = '''
import time


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def broken(n: int) -> int:
    """A tool that raises.

    Args:
        n: anything
    """
    raise RuntimeError("out of order")


def slow(n: int) -> int:
    """A tool that hangs.

    Args:
        n: anything
    """
    time.sleep(60)
    return n


def huge(n: int) -> str:
    """A tool that answers a megabyte.

    Args:
        n: anything
    """
    return "x" * 1_000_000


def calls_multiply(prompt, response):
    """A judge: 1 when the policy's text calls multiply and holds no tool's turn (decoded, it reads "\\ntool\\n408")."""
    return float('"multiply"' in response and "\\ntool\\n" not in response)


def answered_directly(prompt, response, messages=None):
    """1 when the response holds no tool's turn."""
    return float(messages is not None and len(messages) == 1)


def used_the_tool(prompt, response, messages=None):
    """1 when the exchange holds a tool's turn after the first assistant turn: what reward functions see."""
    return float(messages is not None and len(messages) > 1 and messages[1]["role"] == "tool")
'''
KINDS = {"Compute": "multiply", "Break": "broken", "Wait": "slow", "Dump": "huge"}


@pytest.fixture(scope="module")
def caller_dir(tmp_path_factory, task_dir):
    """A tiny chat model taught by SFT to answer each kind of prompt with a call of its tool, and the files to run it."""
    import json
    import random

    from conftest import run_script, write_jsonl
    from test_user_path import make_chat_model
    out = tmp_path_factory.mktemp("tool_caller")
    random.seed(0)
    rows = []
    for k in range(400):
        verb, tool = list(KINDS.items())[k % 4]
        a, b = random.randint(10, 99), random.randint(10, 99)
        arguments = {"a": a, "b": b} if tool == "multiply" else {"n": a}
        rows.append({"prompt": f"{verb} {a} and {b}.", "completion": "<tool_call>" + json.dumps(
            {"name": tool, "arguments": arguments}) + "</tool_call>"})
    for k in range(200):  # "Ask": half the demonstrations call multiply, half answer directly (a choice RL can move)
        a, b = random.randint(10, 99), random.randint(10, 99)
        rows.append({"prompt": f"Ask {a} and {b}.", "completion": "<tool_call>" + json.dumps(
            {"name": "multiply", "arguments": {"a": a, "b": b}}) + "</tool_call>" if k % 2 else f"It is {a * b}."})
    write_jsonl(out / "sft.jsonl", rows)
    write_jsonl(out / "ask.jsonl", [{"prompt": f"Ask {a} and {b}."} for a in range(20, 28) for b in range(50, 58)])
    write_jsonl(out / "prompts.jsonl", [{"prompt": f"{verb} {12 + k} and {34 + k}."} for k, verb in enumerate(KINDS)])
    (out / "tools.py").write_text(TOOLS_FILE)
    with open(task_dir / "sft_train.jsonl") as f:
        texts = [r["prompt"] + r["completion"] for r in map(json.loads, f)] + [r["completion"] for r in rows]
    make_chat_model(reviews_task.build_tokenizer(texts, vocab_size=500), out / "chat")
    run_script("sft.py", "--model-name-or-path", out / "chat", "--dataset", out / "sft.jsonl", "--eval-dataset", "none",
               "--output-dir", out / "caller", "--max-steps", "400", "--per-device-train-batch-size", "16",
               "--learning-rate", "3e-3", "--num-eval-generations", "0", cwd=out)
    return out


def tool_run_args(d, out, iterations=4, judge=""):
    return ["--sft-model-path", d / "caller", "--dataset", d / "prompts.jsonl", "--output-dir", out, "--tools",
            *[f"{d / 'tools.py'}:{t}" for t in KINDS.values()], "--reward-fn", f"{d / 'tools.py'}:used_the_tool",
            "--rollout-batch-size", "4", "--num-generations", "2", "--response-length", "64", "--num-iterations",
            str(iterations), "--num-mini-batches", "2", "--tool-timeout", "0.3", "--max-tool-output-tokens", "16",
            "--learning-rate", "1e-4", "--num-eval-prompts", "4", "--eval-steps", "2", "--save-steps", "2",
            *(["--eval-reward-fn", f"{d / 'tools.py'}:{judge}", "--eval-pass-k", "1"] if judge else
              ["--eval-reward-fn", ""])]


def test_a_run_with_tools_calls_them_survives_them_and_trains_on_its_own_tokens(caller_dir, tmp_path):
    """grpo.py --tools end to end: the policy calls, each kind of failure (a raise, a hang past the timeout, a megabyte
    of output) is counted and the run goes on, reward functions see the exchange, and the trainer's log-probs of the
    sampled tokens, computed over the stored ids with the tool turns in place, are the sampler's (token in, token
    out: re-encoded text would differ), the first minibatch's ratio exactly 1."""
    from conftest import read_metrics, run_script
    run_script("grpo.py", *tool_run_args(caller_dir, tmp_path / "out", judge="calls_multiply"), cwd=tmp_path)
    total = {key: sum(v for _, v in read_metrics(tmp_path, key)) / 4 for key in (
        "tools/used", "tools/error", "tools/timeout", "tools/cut", "objective/scores")}
    assert total["tools/used"] > 0.9 and total["objective/scores"] > 0.5, total  # the reward read `messages`
    assert min(total["tools/error"], total["tools/timeout"], total["tools/cut"]) > 0, total
    assert max(v for _, v in read_metrics(tmp_path, "val/sampler_logprob_gap_max")) < 1e-4
    assert max(v for _, v in read_metrics(tmp_path, "val/first_ratio_max_dev")) < 1e-5
    assert read_metrics(tmp_path, "tools/inserted_tokens")[0][1] > 0
    # the judge reads the policy's text (its calls; no tool's result) and greedy accuracy splits by calling or not
    greedy = {key: [v for _, v in read_metrics(tmp_path, f"eval/{key}")] for key in (
        "pass@1_greedy", "tools_used_greedy", "pass@1_greedy_with_call", "pass@1_greedy_without_call")}
    assert len(greedy["tools_used_greedy"]) == 3 and max(greedy["tools_used_greedy"]) > 0.5, greedy
    for acc, used, with_call, without in zip(*greedy.values()):
        assert abs(acc - (used * with_call + (1 - used) * without)) < 1e-6 and 0 < acc < 1, greedy


@pytest.mark.parametrize("reward, direction", [("used_the_tool", 1), ("answered_directly", -1)])
def test_grpo_learns_whether_to_call(caller_dir, tmp_path, reward, direction):
    """A policy that calls on about half of the "Ask" prompts calls on more of them when the reward pays a call, and
    on fewer when it pays a direct answer: the advantage reaches the call's tokens, through the tool's turn."""
    from conftest import read_metrics, run_script
    run_script("grpo.py", "--sft-model-path", caller_dir / "caller", "--dataset", caller_dir / "ask.jsonl",
               "--output-dir", tmp_path / "out", "--tools", f"{caller_dir / 'tools.py'}:multiply", "--reward-fn",
               f"{caller_dir / 'tools.py'}:{reward}", "--rollout-batch-size", "8", "--num-generations", "4",
               "--response-length", "48", "--num-iterations", "12", "--learning-rate", "1e-3", "--temperature", "1.0",
               "--num-eval-prompts", "0", "--save-steps", "100", cwd=tmp_path)
    used = [v for _, v in read_metrics(tmp_path, "tools/used")]  # the first iteration's: the SFT model's samples
    assert 0.25 < used[0] < 0.75, used  # undecided (0.47 here)
    assert direction * (sum(used[-3:]) / 3 - used[0]) > 0.35, used  # 0.98 and 0 after 12 iterations here


def test_a_run_with_tools_resumes_where_it_stopped(caller_dir, tmp_path):
    """Killed after its first checkpoint, the run resumed logs what the uninterrupted one logs (the tool calls
    included: they depend on the sampled text alone)."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO, read_metrics, run_script
    from test_resume import logged_after
    (tmp_path / "ref").mkdir()
    (tmp_path / "x").mkdir()
    run_script("grpo.py", *tool_run_args(caller_dir, tmp_path / "ref" / "out", 6), cwd=tmp_path / "ref")
    args = [str(a) for a in tool_run_args(caller_dir, tmp_path / "x" / "out", 6)]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "grpo.py"), *args], cwd=tmp_path / "x",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "x" / "out" / "checkpoint" / "training_state.pt"
    while proc.poll() is None and not (state.exists() and logged_after(tmp_path / "x", "loss/policy", 2)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run finished before a checkpoint was seen"
    assert "resuming" in run_script("grpo.py", *args, cwd=tmp_path / "x").stdout
    for key in ("loss/policy", "tools/calls_per_response", "tools/inserted_tokens"):
        reference, resumed = read_metrics(tmp_path / "ref", key), read_metrics(tmp_path / "x", key)
        assert [s for s, _ in resumed] == [s for s, _ in reference]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(resumed, reference)), key
