"""Formatting, tokenisation, exact loss masks, bucketing and the file readers' errors."""

import json

import numpy as np
import pytest

from jaxtune.data import (DataError, bucket_length, collate, collate_packed, encode, epoch_batches, format_example,
                          pack_rows, plan_epoch, read_pairs, reference_batch)

# "Instruction: Answer politely\nResponse: Of course, how may I assist you?" in GPT-2's vocabulary
PROMPT_IDS = [6310, 2762, 25, 23998, 34313, 198, 31077, 25]  # Instruction : ␣Answer ␣politely \n Response :
RESPONSE_IDS = [3226, 1781, 11, 703, 743, 314, 3342, 345, 30]  # ␣Of ␣course , ␣how ␣may ␣I ␣assist ␣you ?
EOS = 50256


def test_format_is_the_reference_string():
    assert format_example("Answer politely", "Of course, how may I assist you?") == \
        "Instruction: Answer politely\nResponse: Of course, how may I assist you?"


def test_response_mask(tokenizer):
    e = encode(tokenizer, "Answer politely", "Of course, how may I assist you?", loss_on="response")
    assert e.input_ids.tolist() == PROMPT_IDS + RESPONSE_IDS + [EOS]
    assert e.loss_mask.tolist() == [0] * 8 + [1] * 9 + [1]  # response tokens and the closing EOS
    assert not e.truncated


def test_all_mask(tokenizer):
    e = encode(tokenizer, "Answer politely", "Of course, how may I assist you?", loss_on="all")
    assert e.input_ids.tolist() == PROMPT_IDS + RESPONSE_IDS + [EOS]
    assert e.loss_mask.tolist() == [0] + [1] * 17


def test_reference_mode_has_no_eos(tokenizer):
    e = encode(tokenizer, "Answer politely", "Of course, how may I assist you?", loss_on="reference")
    assert e.input_ids.tolist() == PROMPT_IDS + RESPONSE_IDS
    assert e.loss_mask.tolist() == [0] + [1] * 16


def test_truncation_cuts_the_eos_and_says_so(tokenizer):
    e = encode(tokenizer, "Answer politely", "Of course, how may I assist you?", loss_on="response", max_length=10)
    assert e.input_ids.tolist() == PROMPT_IDS + RESPONSE_IDS[:2] and e.truncated
    assert e.loss_mask.tolist() == [0] * 8 + [1, 1]


def test_padding_is_masked_by_position_not_id(tokenizer):
    """Pads share EOS's id; the appended EOS carries loss, the pads after it do not."""
    short = encode(tokenizer, "Provide price", "The price is $99.")
    long = encode(tokenizer, "Answer politely", "Of course, how may I assist you?")
    b = collate([short, long], batch_size=3, length=32, pad_id=EOS)
    n = len(short.input_ids)
    assert b["input_ids"][0, n - 1] == EOS and b["loss_mask"][0, n - 1] == 1
    assert (b["input_ids"][0, n:] == EOS).all() and (b["loss_mask"][0, n:] == 0).all()
    assert b["attention_mask"][0].tolist() == [1] * n + [0] * (32 - n)
    assert b["loss_mask"][2].sum() == 0 and b["attention_mask"][2].sum() == 0  # filler row


def test_reference_batch_pads_right_with_eos(tokenizer):
    b = reference_batch(tokenizer, ["Answer politely", "Provide price"],
                        ["Of course, how may I assist you?", "The price is $99."])
    assert b["input_ids"].shape == (2, 17)
    n = int(b["attention_mask"][1].sum())
    assert (b["input_ids"][1, n:] == EOS).all() and b["attention_mask"][1, n:].sum() == 0


def test_buckets_keep_shapes_few(tokenizer):
    assert [bucket_length(n, (32, 64, 128), 100) for n in (1, 32, 33, 64, 65, 100)] == [32, 32, 64, 64, 100, 100]
    examples = [encode(tokenizer, "q" * (i % 40 + 1), "a " * (i % 70 + 1), max_length=128) for i in range(300)]
    lengths = {b["input_ids"].shape[1] for b in epoch_batches(examples, batch_size=8, buckets=(32, 64, 128),
                                                              max_length=128, pad_id=EOS, seed=0, epoch=0)}
    assert lengths <= {32, 64, 128}


def test_epochs_cover_every_example_once(tokenizer):
    examples = [encode(tokenizer, f"question {i}", f"answer {i}") for i in range(21)]
    batches = list(epoch_batches(examples, batch_size=4, buckets=(32,), max_length=32, pad_id=EOS, seed=3, epoch=1))
    assert len(batches) == 6 and sum(int(b["attention_mask"][:, 0].sum()) for b in batches) == 21


def test_packed_rows_keep_each_example_whole_with_its_own_segment_and_positions(tokenizer):
    short = encode(tokenizer, "Provide price", "The price is $99.")
    long = encode(tokenizer, "Answer politely", "Of course, how may I assist you?")
    a, b = len(short.input_ids), len(long.input_ids)
    batch = collate_packed([[short, long], [long]], batch_size=3, length=40, pad_id=EOS)
    assert batch["input_ids"][0].tolist() == short.input_ids.tolist() + long.input_ids.tolist() + [EOS] * (40 - a - b)
    assert batch["segment_ids"][0].tolist() == [1] * a + [2] * b + [0] * (40 - a - b)
    assert batch["positions"][0].tolist() == list(range(a)) + list(range(b)) + [0] * (40 - a - b)
    assert batch["loss_mask"][0].tolist() == short.loss_mask.tolist() + long.loss_mask.tolist() + [0] * (40 - a - b)
    assert batch["loss_mask"][0, a] == 0  # the second example's first token is not predicted from the first's EOS
    assert batch["attention_mask"][0].sum() == a + b and batch["attention_mask"][2].sum() == 0
    with_targets = collate_packed([[short, long], [long]], batch_size=3, length=40, pad_id=EOS, targets=32)
    targets = np.flatnonzero(batch["loss_mask"][0])  # each target is predicted from the position before it
    assert with_targets["logit_positions"][0].tolist() == (targets - 1).tolist() + [0] * (32 - len(targets))
    assert with_targets["logit_targets"][0].tolist() == batch["input_ids"][0, targets].tolist() + [0] * (32 - len(targets))
    assert with_targets["logit_mask"].sum(axis=1).tolist() == batch["loss_mask"].sum(axis=1).tolist()
    with pytest.raises(ValueError, match="more than targets"):
        collate_packed([[short, long]], batch_size=1, length=40, pad_id=EOS, targets=8)
    with pytest.raises(ValueError, match="more than the packed length"):
        collate_packed([[long, long]], batch_size=1, length=b + 1, pad_id=EOS)


def test_packing_fills_rows_and_every_epoch_covers_every_example_once(tokenizer):
    lengths = [int(n) for n in np.random.default_rng(0).integers(10, 70, 500)]
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert sum(lengths) / (128 * len(rows)) > 0.95
    for epoch in (0, 1):
        plan = plan_epoch(lengths, batch_size=4, seed=0, epoch=epoch, pack_length=128)
        assert sorted(i for batch in plan for row in batch for i in row) == list(range(500))
        assert all(len(batch) <= 4 for batch in plan)
    shuffled = [plan_epoch(lengths, batch_size=4, seed=0, epoch=e, pack_length=128)[0] for e in (0, 1)]
    assert shuffled[0] != shuffled[1]


# ---------------------------------------------------------------------------------------------- files
def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_reads_jsonl_json_csv_and_alpaca(tmp_path):
    rows = [{"instruction": "Hi", "response": "Hello!"}, {"instruction": "Bye", "response": "Goodbye."}]
    jl = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    js = write(tmp_path / "a.json", json.dumps(rows))
    cs = write(tmp_path / "a.csv", 'instruction,response\nHi,Hello!\nBye,"Goodbye."\n')
    for path in (jl, js, cs):
        assert [(p.instruction, p.response) for p in read_pairs(path)] == [("Hi", "Hello!"), ("Bye", "Goodbye.")]
    alpaca = write(tmp_path / "alpaca.json", json.dumps([{"instruction": "Translate", "input": "chat", "output": "cat"},
                                                          {"instruction": "Say hi", "input": "", "output": "hi"}]))
    assert [(p.instruction, p.response) for p in read_pairs(alpaca)] == [("Translate\n\nchat", "cat"), ("Say hi", "hi")]
    custom = write(tmp_path / "c.csv", "q,a\nWhy?,Because.\n")
    assert read_pairs(custom, instruction_column="q", response_column="a")[0].response == "Because."


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"instruction": "a", "response": "b"}\n{"instruction": "a", \n', r"line 2 is not valid JSON"),
    ("bad.jsonl", '{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n', r"line 2: no response column"),
    ("bad.jsonl", '{"instruction": "", "response": "b"}\n', r"line 1: field 'instruction' is empty"),
    ("bad.jsonl", '{"instruction": "a", "response": "  "}\n', r"line 1: field 'response' is empty"),
    ("bad.jsonl", '{"instruction": 3, "response": "b"}\n', r"line 1: field 'instruction' must be text"),
    ("bad.csv", 'instruction,response\nok,fine\n,empty\n', r"bad.csv line 3: field 'instruction' is empty"),
    ("bad.json", '[{"instruction": "a", "response": "b"}', r"not valid JSON"),
    ("bad.txt", 'hello', r"unknown file type '.txt'"),
    ("empty.jsonl", '\n\n', r"no instruction/response pairs"),
])
def test_file_errors_name_file_line_and_field(tmp_path, name, content, message):
    with pytest.raises(DataError, match=message):
        read_pairs(write(tmp_path / name, content))


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "latin.jsonl", '{"instruction": "a", "response": "b"}\n{"instruction": "caf\u00e9", "response": "b"}\n', "latin-1")
    with pytest.raises(DataError, match=r"line 2 is not UTF-8"):
        read_pairs(path)


def test_column_option_names_missing_column(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"instruction": "a", "response": "b"}\n')
    with pytest.raises(DataError, match=r"no column 'question' \(columns: instruction, response\)"):
        read_pairs(path, instruction_column="question")


def test_parquet_and_datasets_folders(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"instruction": ["Hi", "Translate"], "input": ["", "chat"], "output": ["Hello!", "cat"]})
    frame.to_parquet(tmp_path / "a.parquet")
    assert [(p.instruction, p.response) for p in read_pairs(tmp_path / "a.parquet")] == \
        [("Hi", "Hello!"), ("Translate\n\nchat", "cat")]
    # a data set folder in the hub's layout goes through datasets.load_dataset, as a hub name does
    folder = tmp_path / "helpdesk"
    (folder / "data").mkdir(parents=True)
    frame.iloc[:1].to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    frame.iloc[1:].to_parquet(folder / "data" / "test-00000-of-00001.parquet")
    assert [p.response for p in read_pairs(folder)] == ["Hello!"]
    assert [p.response for p in read_pairs(folder, split="test")] == ["cat"]
    with pytest.raises(DataError, match=r"could not load the data set \(split 'validation'\)"):
        read_pairs(folder, split="validation")
    bad = pd.DataFrame({"instruction": ["a", ""], "response": ["b", "c"]})
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet row 2: field 'instruction' is empty"):
        read_pairs(tmp_path / "bad.parquet")


def test_unknown_hub_data_set_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DataError, match=r"nobody/no-such-data: could not load the data set \(split 'train'\): Couldn't reach"):
        read_pairs("nobody/no-such-data")


def test_bundled_example_data_is_clean(tokenizer):
    """The help-desk examples: 300+ training and 50+ held-out pairs, no empty, duplicate or truncated rows, and
    no held-out instruction among the training ones."""
    from pathlib import Path

    from jaxtune.data import inspect_rows

    root = Path(__file__).resolve().parents[1] / "examples"
    train = read_pairs(root / "customer_service.jsonl")
    val = read_pairs(root / "customer_service_val.jsonl")
    assert len(train) >= 300 and len(val) >= 50
    for pairs in (train, val):
        report = inspect_rows(pairs, tokenizer, max_length=96)
        assert not report.problems and not report.warnings, report.warnings[:3]
    assert not {p.instruction.lower() for p in val} & {p.instruction.lower() for p in train}
