"""Every data source the stages read (JSONL, JSON, Parquet, CSV, `save_to_disk` folders, Hub-layout folders standing in
for Hub datasets) gives the same checked records, and every problem is named: source, row, field."""

import json
import os
import sys

import datasets
import pytest
from conftest import run_script, write_jsonl

from common import DataError, read_data

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
FORMATS = {  # kind -> format -> rows, one format per file as people keep them
    "sft": {
        "prompt/completion": [{"prompt": "p", "completion": " c"}, {"prompt": "q", "completion": " d"}],
        "messages": [{"messages": USER + [{"role": "assistant", "content": "Hello"}]},
                     {"messages": [{"role": "user", "content": "Yo", "name": "ann"},
                                   {"role": "assistant", "content": "Hey"}]}],  # a key only one message has
    },
    "preference": {
        "prompt/chosen/rejected": [{"prompt": "p", "chosen": " a", "rejected": " b"},
                                   {"prompt": "q", "chosen": " c", "rejected": " d", "score": 2.5}],
        "conversations": [{"chosen": USER + [{"role": "assistant", "content": "A"}],
                           "rejected": USER + [{"role": "assistant", "content": "B"}]}] * 2,
    },
    "prompt": {
        "prompt-only": [{"prompt": "2 + 3 =", "answer": 5}, {"prompt": "1 + 1 =", "answer": 2}],
        "messages": [{"messages": USER, "answer": 5}, {"messages": USER[1:], "answer": 7}],
    },
}
CASES = [(kind, name) for kind in FORMATS for name in FORMATS[kind]]


def strip(records):
    return [{k: v for k, v in r.items() if k != "where"} for r in records]


def write_as(rows, path):
    """The rows as `path`'s kind of source, written the way people write them (pandas for CSV, datasets for the rest)."""
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f)
    elif path.endswith(".csv"):
        datasets.Dataset.from_list(rows).to_pandas().to_csv(path, index=False)
    elif path.endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(path)
    return path


@pytest.mark.parametrize("kind, name", CASES)
@pytest.mark.parametrize("source", ["json", "parquet", "csv", "saved"])
def test_every_source_gives_exactly_the_jsonl_records(tmp_path, kind, name, source):
    rows = FORMATS[kind][name]
    if source == "csv" and any(isinstance(v, list) for r in rows for v in r.values()):
        pytest.skip("a CSV cell holds text, not a conversation")
    expected = strip(read_data(write_jsonl(tmp_path / "a.jsonl", rows), kind))
    path = write_as(rows, str(tmp_path / ("a." + source if source != "saved" else "saved")))
    records = read_data(path, kind)
    assert strip(records) == expected
    unit = "record" if source == "json" else "row"
    assert [r["where"] for r in records] == [f"{path}, {unit} {i}" for i in range(len(rows))]


def test_a_conversation_beside_a_prompt_column_is_the_sft_record(tmp_path):
    """HuggingFaceH4/ultrachat_200k keeps its first user turn as a `prompt` column beside `messages`."""
    conversation = USER + [{"role": "assistant", "content": "Hello"}]
    path = write_as([{"prompt": "Hi", "prompt_id": "0a1b", "messages": conversation}], str(tmp_path / "u.parquet"))
    (record,) = read_data(path, "sft")
    assert (record["prompt"], record["completion"]) == (USER, conversation[-1:])
    (record,) = read_data(path, "prompt")  # as prompts: the prompt column, the rest kept for reward functions
    assert (record["prompt"], record["fields"]) == ("Hi", {"prompt_id": "0a1b"})


def test_splits_of_a_saved_dataset_dict_and_of_a_hub_layout_folder(tmp_path):
    train, test = FORMATS["prompt"]["prompt-only"], [{"prompt": "9 - 4 =", "answer": 5}]
    datasets.DatasetDict(train=datasets.Dataset.from_list(train),
                         test=datasets.Dataset.from_list(test)).save_to_disk(str(tmp_path / "saved"))
    hub = tmp_path / "owner_name"  # what `huggingface-cli download --repo-type dataset` leaves: data/{split}-*.parquet
    (hub / "data").mkdir(parents=True)
    datasets.Dataset.from_list(train).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(test).to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))
    for source in (str(tmp_path / "saved"), str(hub)):
        assert [r["prompt"] for r in read_data(source, "prompt")] == ["2 + 3 =", "1 + 1 ="]
        records = read_data(source, "prompt", split="test", held_out=True)
        assert [(r["prompt"], r["fields"]) for r in records] == [("9 - 4 =", {"answer": 5})]
        assert records[0]["where"] == f"{source} (split 'test'), row 0"
        with pytest.raises(DataError, match="validation"):
            read_data(source, "prompt", split="validation")


def test_a_held_out_split_of_a_file_is_an_error_not_the_training_data(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", FORMATS["prompt"]["prompt-only"])
    assert len(read_data(path, "prompt", split="train_prefs")) == 2  # training: a file is its one split
    with pytest.raises(DataError, match=r"p.jsonl: no split 'test'"):
        read_data(path, "prompt", split="test", held_out=True)


def test_a_config_that_does_not_exist(tmp_path):
    hub = tmp_path / "hub"
    (hub / "main").mkdir(parents=True)
    datasets.Dataset.from_list(FORMATS["prompt"]["prompt-only"]).to_parquet(str(hub / "main" / "train.parquet"))
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
                                   "    path: main/train.parquet\n---\n")
    assert len(read_data(str(hub), "prompt", config="main")) == 2
    with pytest.raises(DataError, match=f"{hub}: .*'socratic' not found. Available: \\['main'\\]"):
        read_data(str(hub), "prompt", config="socratic")


def test_an_unreachable_hub_id_and_a_missing_file(tmp_path):
    with pytest.raises(DataError, match="openai/gsm8k \\(not a local file or folder; tried as a Hub dataset id\\)"):
        read_data("openai/gsm8k", "prompt")  # the tests run offline (HF_HUB_OFFLINE)
    with pytest.raises(DataError, match="nope.parquet: file not found"):
        read_data(str(tmp_path / "nope.parquet"), "prompt")


def test_without_the_datasets_package(tmp_path, monkeypatch):
    path = write_as(FORMATS["sft"]["prompt/completion"], str(tmp_path / "a.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    with pytest.raises(DataError, match="optional `datasets` package: pip install datasets"):
        read_data(path, "sft")
    jsonl = write_jsonl(tmp_path / "a.jsonl", FORMATS["sft"]["prompt/completion"])
    assert len(read_data(jsonl, "sft")) == 2  # JSONL and JSON never need it


@pytest.mark.parametrize("source", ["parquet", "saved"])
def test_bad_records_name_the_source_row_and_field(tmp_path, source):
    rows = [{"prompt": "p", "chosen": " a", "rejected": " b"}, {"prompt": "q", "chosen": " c", "rejected": " c"},
            {"prompt": "r", "chosen": " e", "rejected": None}]
    path = write_as(rows, str(tmp_path / ("bad.parquet" if source == "parquet" else "saved")))
    with pytest.raises(DataError) as e:
        read_data(path, "preference")
    assert str(e.value) == f"{path}, row 1: fields 'chosen' and 'rejected' are identical"
    errors = []
    assert len(read_data(path, "preference", errors)) == 1  # reward_model.py / dpo.py --skip-bad-pairs
    assert errors[1] == f"{path}, row 2: missing field 'rejected' (a preference record needs prompt, chosen, rejected)"


def test_a_null_field_is_a_missing_field_in_every_source(tmp_path):
    """`"answer": null` in a JSONL line reads as no answer, as the same null in Parquet does: the start-up check of the
    fields a reward function takes then finds it, not the first iteration."""
    rows = [{"prompt": "a", "answer": None}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    for name in ("p.jsonl", "p.parquet"):
        (record,) = read_data(str(tmp_path / name), "prompt")
        assert "answer" not in record["fields"], name


def test_a_file_datasets_cannot_parse_says_why(tmp_path):
    """A CSV `datasets` fails on reports the parser's reason, not only that generation failed."""
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe,\n")
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DataError, match="UnicodeDecodeError"):
        read_data(str(tmp_path / "bad.csv"), "sft")
    with pytest.raises(DataError, match="EmptyDataError: No columns to parse"):
        read_data(str(tmp_path / "empty.csv"), "sft")


def test_a_stage_reads_a_hub_layout_folder_with_its_held_out_split(tmp_path, model_dir, task_dir):
    """sft.py with only --dataset (a folder laid out as a Hub dataset) and --eval-split: trains on 'train', holds out
    'test'; a bad row in Parquet stops it with one line, no traceback."""
    with open(task_dir / "sft_train.jsonl") as f:
        rows = [json.loads(line) for line in f][:40]
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows[:32]).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[32:]).to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))
    proc = run_script("sft.py", "--model-name-or-path", model_dir, "--dataset", hub, "--eval-split", "test",
                      "--max-steps", "1", "--per-device-train-batch-size", "8", "--num-eval-generations", "2",
                      "--output-dir", tmp_path / "out", cwd=tmp_path)
    assert "32 training examples" in proc.stdout and "8 held out" in proc.stdout, proc.stdout
    assert os.path.exists(tmp_path / "out" / "model.safetensors")
    write_as(rows[:3] + [{"prompt": "p", "completion": " "}], str(tmp_path / "bad.parquet"))
    proc = run_script("sft.py", "--model-name-or-path", model_dir, "--dataset", tmp_path / "bad.parquet",
                      "--output-dir", tmp_path / "out2", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {tmp_path / 'bad.parquet'}, row 3: field 'completion' is an empty string" in proc.stderr
