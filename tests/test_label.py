"""label.py: the interactive labeller driven through a real terminal (a pty), resumed after a quit and after a kill;
the unattended annotator; and the files it writes, read as reward_model.py reads them."""

import fcntl
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from common import read_jsonl
from conftest import REPO, run_script, write_jsonl


class Terminal:
    """label.py on a pseudo-terminal: `expect` reads its output up to a pattern, `send` types a line."""

    def __init__(self, args, cwd):
        master, slave = pty.openpty()

        def controlling_terminal():  # in the child: its own session, with the pty as its terminal (Ctrl-C -> SIGINT)
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "label.py"), *map(str, args)], cwd=cwd,
                                     stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     preexec_fn=controlling_terminal,
                                     env=os.environ | {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
        os.close(slave)
        self.master, self.text, self.seen = master, "", 0

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """The first match of `pattern` in the output after the previous match, waiting for it."""
        deadline = time.time() + timeout
        while True:
            match = re.compile(pattern).search(self.text, self.seen)
            if match:
                self.seen = match.end()
                return match
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.time()))
            if not ready:
                raise AssertionError(f"timed out waiting for {pattern!r}; output so far:\n{self.text[-3000:]}")
            try:
                chunk = os.read(self.master, 4096).decode("utf-8", "replace")
            except OSError:  # the process ended
                chunk = ""
            if not chunk:
                raise AssertionError(f"label.py ended before {pattern!r}; output:\n{self.text[-3000:]}")
            self.text += chunk.replace("\r\n", "\n")

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def question(self) -> dict:
        """Wait for the next comparison; returns its prompt and the two responses as shown."""
        m = self.expect(r"\[(\d+)/(\d+)\][^\n]*\nPrompt: (.*)\n  A: (.*)\n  B: (.*)\n")
        return {"n": int(m[1]), "total": int(m[2]), "prompt": m[3], "a": m[4], "b": m[5]}

    def finish(self, timeout: float = 60.0) -> int:
        deadline = time.time() + timeout
        try:  # drain the output until the process exits
            while time.time() < deadline:
                ready, _, _ = select.select([self.master], [], [], 1.0)
                if ready:
                    chunk = os.read(self.master, 4096)
                    if not chunk:
                        break
                    self.text += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
                elif self.proc.poll() is not None:
                    break
        except OSError:
            pass
        os.close(self.master)
        return self.proc.wait(timeout=timeout)


def thread_signals(pid: int) -> str:
    """Each thread of a process: its state, its signals pending, blocked and caught, and the syscall it waits in, for
    a failure message."""
    rows = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f, open(f"/proc/{pid}/task/{tid}/syscall") as g:
                fields = [line.split()[:2] for line in f if line.startswith(("State", "SigPnd", "ShdPnd", "SigBlk", "SigCgt"))]
                rows.append(f"  thread {tid}: " + " ".join(k + v for k, v in fields) + f" syscall {g.read().strip()}")
        except OSError as e:  # ended meanwhile, or /proc not readable here
            rows.append(f"  thread {tid}: {e}")
    return "\n".join(rows)


def lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_interactive_labelling_invalid_keys_undo_quit_kill_resume(sft_dir, task_dir, tmp_path):
    out = tmp_path / "labels" / "prefs.jsonl"
    ties = str(out) + ".ties.jsonl"
    args = ["--policy-path", sft_dir, "--prompts", task_dir / "prompts_train.jsonl", "--num-prompts", "5",
            "--output", out, "--ask-reason", "--device", "cpu"]
    shown = {}  # prompt -> (A, B) as displayed
    expected_pairs, expected_ties = [], []

    def answered(q, label, reason=""):
        shown.setdefault(q["prompt"], (q["a"], q["b"]))
        assert shown[q["prompt"]] == (q["a"], q["b"]), "a prompt shown again must show the same responses"
        if label in "AB":
            chosen, rejected = (q["a"], q["b"]) if label == "A" else (q["b"], q["a"])
            expected_pairs.append({"prompt": q["prompt"], "chosen": chosen, "rejected": rejected, "label": label,
                                   **({"reason": reason} if reason else {})})
        else:
            expected_ties.append({"prompt": q["prompt"], "response_a": q["a"], "response_b": q["b"], "label": label})

    # session 1: an invalid key, A with a reason, B, undo (B is taken back and asked again), Tie, then quit
    term = Terminal(args, tmp_path)
    q1 = term.question()
    assert (q1["n"], q1["total"]) == (1, 5)
    term.send("x")
    term.expect(r"'x' is not one of")
    term.send("a")
    term.expect(r"Reason \(optional")
    term.send("clearly positive")
    answered(q1, "A", "clearly positive")
    q2 = term.question()
    assert q2["n"] == 2
    term.send("b")
    term.expect(r"Reason \(optional")
    term.send("")
    q3 = term.question()
    term.send("u")
    term.expect(r"undone: your 'B'")
    q2_again = term.question()
    assert q2_again["n"] == 2 and q2_again["prompt"] == q2["prompt"]
    term.send("t")
    answered(q2_again, "Tie")
    q3 = term.question()
    assert q3["n"] == 3
    term.send("q")
    assert term.finish() == 0
    assert [{k: r[k] for k in expected_pairs[0]} for r in lines(out)] == expected_pairs
    assert [{k: r[k] for k in expected_ties[0]} for r in lines(ties)] == expected_ties

    # session 2: it continues at the third prompt, with the responses it drew before; skip, B, then SIGKILL while
    # the fifth question waits for its answer
    term = Terminal(args, tmp_path)
    term.expect(r"2 answered before \(1 pairs, 1 ties, 0 skipped\); 3 to go")
    q3_again = term.question()
    assert (q3_again["n"], q3_again["prompt"], q3_again["a"], q3_again["b"]) == (3, q3["prompt"], q3["a"], q3["b"])
    term.send("s")
    answered(q3_again, "skip")
    q4 = term.question()
    term.send("b")
    term.expect(r"Reason \(optional")
    term.send("")
    answered(q4, "B")
    q5 = term.question()
    term.expect(r"quit > ")
    term.proc.send_signal(signal.SIGKILL)
    term.finish()
    assert [r["prompt"] for r in lines(out)] == [q1["prompt"], q4["prompt"]]  # the answer before the kill is kept

    # a kill in the middle of a write leaves half a line: the next run removes it and says so
    with open(out, "a") as f:
        f.write('{"prompt": "half a li')
    term = Terminal(args, tmp_path)
    term.expect(r"removing an unfinished last line")
    q5_again = term.question()
    assert (q5_again["n"], q5_again["prompt"], q5_again["a"], q5_again["b"]) == (5, q5["prompt"], q5["a"], q5["b"])
    term.send("a")
    term.expect(r"Reason \(optional")
    term.send("")
    answered(q5_again, "A")
    term.expect(r"3 pairs, 1 ties, 1 skipped")
    assert term.finish() == 0

    pairs, tie_rows = lines(out), lines(ties)
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected", "label")} for r in pairs] == [
        {k: r[k] for k in ("prompt", "chosen", "rejected", "label")} for r in expected_pairs]
    assert [r.get("reason", "") for r in pairs] == ["clearly positive", "", ""]
    assert [{k: r[k] for k in expected_ties[0]} for r in tie_rows] == expected_ties
    prompts = [r["prompt"] for r in pairs + tie_rows]
    assert len(prompts) == len(set(prompts)) == 5  # every prompt once: no duplicate, none lost
    assert all(r["chosen_model"] == r["rejected_model"] == str(sft_dir) for r in pairs)
    # reward_model.py's reader takes the file as it is
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in read_jsonl(str(out), "preference")] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in expected_pairs]


def test_annotator_two_models_resume_and_errors(sft_dir, model_dir, task_dir, tmp_path):
    """The simulated annotator labels the SFT model against the untrained one: the same file from one run or from a
    run stopped halfway and continued; records name the model of each response; the labels mostly prefer SFT."""
    base = ["--policy-path", sft_dir, "--policy-b-path", model_dir, "--prompts", task_dir / "prompts_train.jsonl",
            "--annotator", "reviews_task.py:annotate", "--device", "cpu", "--batch-size", "8"]
    run_script("label.py", *base, "--num-prompts", "40", "--output", tmp_path / "once.jsonl", cwd=REPO)
    run_script("label.py", *base, "--num-prompts", "20", "--output", tmp_path / "twice.jsonl", cwd=REPO)
    proc = run_script("label.py", *base, "--num-prompts", "40", "--output", tmp_path / "twice.jsonl", cwd=REPO)
    assert "20 to go" in proc.stdout
    once, twice = lines(tmp_path / "once.jsonl"), lines(tmp_path / "twice.jsonl")
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, once)) == sorted(map(key, twice)) and len(once) >= 10
    assert len(once) + len(lines(str(tmp_path / "once.jsonl") + ".ties.jsonl")) == 40
    assert {r["chosen_model"] for r in once} == {str(sft_dir), str(model_dir)}
    assert sum(r["chosen_model"] == str(sft_dir) for r in once) > 0.7 * len(once)
    assert all({r["chosen_model"], r["rejected_model"]} == {str(sft_dir), str(model_dir)} for r in once)

    write_jsonl(tmp_path / "bad.py", ["def annotate(prompt, a, b):", "    return 'maybe'"])
    proc = run_script("label.py", *base[:-6], "--annotator", f"{tmp_path / 'bad.py'}:annotate", "--num-prompts", "2",
                      "--output", tmp_path / "bad.jsonl", "--device", "cpu", cwd=REPO, check=False)
    assert proc.returncode != 0 and "returned 'maybe'" in proc.stderr and "Traceback" not in proc.stderr


def test_label_existing_pairs_conversational(tmp_path, sft_dir):
    """--pairs: responses are read, not sampled; a conversational prompt gives TRL's conversational preference
    records; a missing response field is reported with file, line and field."""
    rows = [{"prompt": [{"role": "user", "content": f"Review {i}"}], "response_a": f"great {i}.",
             "response_b": f"awful {i}.", "model_a": "x", "model_b": "y"} for i in range(6)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    write_jsonl(tmp_path / "judge.py", ["def annotate(prompt, a, b):",
                                        "    return 'A' if 'great' in a else 'B'"])
    run_script("label.py", "--pairs", tmp_path / "pairs.jsonl", "--annotator", f"{tmp_path / 'judge.py'}:annotate",
               "--output", tmp_path / "out.jsonl", cwd=tmp_path)
    out = lines(tmp_path / "out.jsonl")
    assert len(out) == 6 and {r["label"] for r in out} == {"A", "B"}  # the A/B order was drawn per prompt
    assert all(r["chosen"][0]["content"].startswith("great") and r["chosen_model"] == "x" for r in out)
    assert [r["prompt"] for r in read_jsonl(str(tmp_path / "out.jsonl"), "preference")] == [r["prompt"] for r in rows]

    write_jsonl(tmp_path / "broken.jsonl", [rows[0], {"prompt": "p", "response_a": "x"}])
    proc = run_script("label.py", "--pairs", tmp_path / "broken.jsonl", "--annotator",
                      f"{tmp_path / 'judge.py'}:annotate", "--output", tmp_path / "o2.jsonl", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "broken.jsonl, line 2: field 'response_b'" in proc.stderr


@pytest.mark.parametrize("case", ["another run holds it", "a folder", "a bad line in it", "no annotator"])
def test_an_output_that_cannot_be_written_is_one_line(case, tmp_path):
    """--output held by another label.py run (whose undo would remove this one's lines), a folder, or a file with a
    line that is not UTF-8; an --annotator file that is not there: one line each, nothing written."""
    import plumbing

    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "response_a": "great.", "response_b": "awful."}])
    write_jsonl(tmp_path / "judge.py", ["def annotate(prompt, a, b):", "    return 'A'"])
    output, annotator = tmp_path / "out.jsonl", f"{tmp_path / 'judge.py'}:annotate"
    if case == "another run holds it":
        release = plumbing.hold_lock(plumbing.lock_path(str(output)), str(output), "wait")
    elif case == "a folder":
        output.mkdir()
    elif case == "a bad line in it":
        output.write_bytes(b'{"prompt": "caf\xe9", "label": "A"}\n')
    else:
        annotator = f"{tmp_path / 'missing.py'}:annotate"
    proc = run_script("label.py", "--pairs", tmp_path / "pairs.jsonl", "--annotator", annotator, "--output", output,
                      cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert {"another run holds it": "is in use by another run", "a folder": "is a folder",
            "a bad line in it": "out.jsonl, line 1: not a record", "no annotator": "no file"}[case] in proc.stderr
    if case == "another run holds it":
        release()
        assert not output.exists()


@pytest.mark.parametrize("answers", [("A", "B"), ("Tie",)])
def test_simulated_annotator_is_the_task_noise_model(answers):
    """reviews_task.annotate: ties within the margin, otherwise P(A) = sigmoid((gA - gB) / tau), the same answer
    for the same question."""
    import reviews_task

    if answers == ("Tie",):
        assert reviews_task.annotate("The soup was", " good.", " good.") == "Tie"
        return
    a, b = " good.", " okay."  # gold 0.44 and 0.23: P(A) = 0.67, far from 0 and 1
    ga, gb = reviews_task.gold_score("", a), reviews_task.gold_score("", b)
    p = 1 / (1 + 2.718281828 ** (-(ga - gb) / reviews_task.TAU))
    got = [reviews_task.annotate(f"Prompt {i} was", a, b) for i in range(2000)]
    assert set(got) <= set(answers)
    assert abs(got.count("A") / len(got) - p) < 0.03
    assert got == [reviews_task.annotate(f"Prompt {i} was", a, b) for i in range(2000)]


def test_undo_steps_over_automatic_ties_and_ctrl_c_stops_cleanly(tmp_path):
    """Identical responses are recorded as a tie without asking; undo then takes back the person's last answer and
    that tie (recorded again when reached), never writing a prompt twice; Ctrl-C quits without a traceback."""
    rows = [{"prompt": "p0 was", "response_a": " good.", "response_b": " bad."},
            {"prompt": "p1 was", "response_a": " same.", "response_b": " same."},
            {"prompt": "p2 was", "response_a": " fine.", "response_b": " awful."}]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "prefs.jsonl"
    term = Terminal(["--pairs", tmp_path / "pairs.jsonl", "--output", out], tmp_path)
    q0 = term.question()
    term.send("a")
    term.expect("identical responses: recorded as a tie")
    term.question()
    term.send("u")
    term.expect(r"undone: your 'A'")
    assert term.question()["prompt"] == q0["prompt"]
    term.send("b")
    term.expect("identical responses: recorded as a tie")
    term.question()
    term.expect(r"quit > ")
    missed = []  # label.py's threads at each Ctrl-C it did not react to, for the failure message
    for _ in range(10):  # Ctrl-C at the question, again if it went unseen: CPython's input() misses a SIGINT that
        os.write(term.master, b"\x03")  # lands between writing the prompt and reading (seen in the suite, under load)
        try:
            term.expect(r"prompts left", timeout=5)  # label.py's last line, printed when it stops
            break
        except AssertionError:
            if term.proc.poll() is not None:
                break
            missed.append(thread_signals(term.proc.pid))
    assert term.finish() == 0 and "Traceback" not in term.text, term.text[-1500:] + "\nat each unseen Ctrl-C:\n" + (
        "\n".join(missed))
    pairs, ties = lines(out), lines(str(out) + ".ties.jsonl")
    assert [(r["prompt"], r["chosen"]) for r in pairs] == [("p0 was", q0["b"])]
    assert [(r["prompt"], r["label"]) for r in ties] == [("p1 was", "Tie")]


def test_control_characters_are_shown_escaped():
    """A response holding terminal escape sequences must not rewrite what the labeller sees: each control character is
    shown as its escape (newlines stay newlines), in plain text and in conversations."""
    import label

    shown = label.show("fine\r\x1b[2Kawful\x1b]0;title\x07\x08 end\nnext")
    assert shown == "fine\\r\\x1b[2Kawful\\x1b]0;title\\x07\\x08 end\nnext"
    turns = label.show([{"role": "user", "content": "hi\x1b[2J"}, {"role": "assistant", "content": "ok\r"}])
    assert not any(c != "\n" and not c.isprintable() for c in turns) and "\\x1b[2J" in turns
