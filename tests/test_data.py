"""Formatting, tokenisation, exact loss masks, bucketing and the file readers' errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxtune.checkpoint import offline_tokenizer
from jaxtune.data import (DataError, Pair, bucket_length, collate, collate_packed, encode, encode_pairs, epoch_batches,
                          format_example, inspect_rows, pack_rows, plan_epoch, read_pairs, reference_batch,
                          tokenize_text)

ROOT = Path(__file__).resolve().parents[1]

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


# "<|endoftext|>" as ordinary text: < | end of text | >
LITERAL_EOS_IDS = [27, 91, 437, 1659, 5239, 91, 29]


def test_typed_special_tokens_are_text_and_only_the_appended_eos_is_eos(tokenizer):
    instruction, response = "Ignore this<|endoftext|>x", "Sure<|endoftext|>y"
    prompt = [6310, 2762, 25, 41032, 428, *LITERAL_EOS_IDS, 87, 198, 31077, 25]  # Instruction: Ignore this<|...|>x\nResponse:
    answer = [10889, *LITERAL_EOS_IDS, 88]  # ␣Sure<|endoftext|>y
    e = encode(tokenizer, instruction, response)
    assert e.input_ids.tolist() == prompt + answer + [EOS]
    assert e.loss_mask.tolist() == [0] * len(prompt) + [1] * (len(answer) + 1)  # the response and the appended EOS
    assert tokenizer.decode(e.input_ids[:-1]) == format_example(instruction, response)
    assert encode(tokenizer, instruction, response, loss_on="reference").input_ids.tolist() == prompt + answer
    # the reference's preprocess is kept as it was: there the typed string is the EOS token
    assert EOS in reference_batch(tokenizer, [instruction], [response])["input_ids"][0, :-1]


def test_tokenize_text_is_the_tokenizers_split_special_tokens_and_leaves_the_tokenizer_alone():
    tok = offline_tokenizer()  # fresh: the padding set below must not reach the copy made on first use
    reference_batch(tok, ["a", "a much longer instruction"], ["b", "c"])  # sets padding on the shared backend
    root = Path(__file__).resolve().parents[1] / "examples"
    texts = [format_example(p.instruction, p.response) for p in read_pairs(root / "customer_service_val.jsonl")]
    texts += ["a<|endoftext|>b", "!<|endoftext|>", " <|endoftext|> ", "caf\u00e9\u2028x\x85y 🦜\r\n\tend", "<|endoftext|>"]
    ours = tokenize_text(tok, texts)
    theirs = tok(texts, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    assert [t.ids for t in ours] == theirs["input_ids"]
    assert [[tuple(o) for o in t.offsets] for t in ours] == [[tuple(o) for o in m] for m in theirs["offset_mapping"]]
    assert all(tok.decode(t.ids) == text for t, text in zip(ours, texts))
    assert tok("<|endoftext|>", add_special_tokens=False).input_ids == [EOS]  # the tokenizer's own default is untouched


def test_rows_with_no_room_for_the_response_are_left_out_and_counted(tokenizer):
    """"Answer politely" is 8 prompt tokens: at max_length 8 none of the response fits, at 9 one token does.
    "Hi" is 7, and its response one token and the EOS."""
    rows = [Pair("Hi", "Hello", "d.jsonl line 1"),
            Pair("Answer politely", "Of course, how may I assist you?", "d.jsonl line 2")]
    kept = encode_pairs(tokenizer, rows, max_length=9)
    assert kept.pairs == rows and not kept.dropped and kept.warning is None and kept.truncated == 1
    assert kept.examples[1].loss_mask.tolist() == [0] * 8 + [1]
    s = encode_pairs(tokenizer, rows, max_length=8)
    assert s.pairs == rows[:1] and s.dropped == ["d.jsonl line 2"] and s.truncated == 1
    assert s.examples[0].input_ids.tolist() == [6310, 2762, 25, 15902, 198, 31077, 25, 18435]  # ...Response: Hello
    assert s.warning.startswith("1 row(s) left out: nothing of the response fits in max_length 8 tokens (d.jsonl line 2)")
    assert s.tokens == 8
    with pytest.raises(DataError, match=r"no row keeps any of its response within max_length 7 tokens \(first: d.jsonl line 1\)"):
        encode_pairs(tokenizer, rows, max_length=7)
    report = inspect_rows(rows, tokenizer, max_length=8)
    assert report.pairs == rows[:1] and report.dropped == ["d.jsonl line 2"] and report.truncated == 1
    assert [e.input_ids.tolist() for e in report.encoded] == [e.input_ids.tolist() for e in s.examples]
    assert "d.jsonl line 2: nothing of the response fits in max_length 8 tokens; the row is left out (raise max " \
           "length or shorten the instruction)" in report.warnings
    assert report.summary() == "1 pair, 8 tokens, 1 will be truncated, 1 left out (no room for the response)"
    assert report.numbers == [1]


def test_inspect_rows_numbers_each_usable_pair_by_its_place_among_the_rows(tokenizer):
    """The app's preview finds a table row by these numbers; blank, empty, duplicate and left-out rows keep theirs."""
    rows = [["Hi", "Hello"], ["", ""], ["", "orphan"], ["Hi", "Hello"], ["word " * 40, "late"], ["Bye", "Goodbye"]]
    report = inspect_rows(rows, tokenizer, max_length=16, first_row=3)
    assert report.numbers == [3, 6, 8] and [p.where for p in report.pairs] == ["row 3", "row 6", "row 8"]
    assert report.dropped == ["row 7"] and any(p.startswith("row 5: empty instruction") for p in report.problems)


def test_encode_pairs_in_batches_equals_encoding_one_by_one(tokenizer):
    pairs = [Pair(f"question {i}" * (i % 7 + 1), f"answer<|endoftext|> {i}" * (i % 5 + 1)) for i in range(1100)]
    s = encode_pairs(tokenizer, pairs, max_length=40)  # more than one batched call
    one_by_one = [encode(tokenizer, p.instruction, p.response, max_length=40) for p in pairs]
    assert s.pairs == pairs and not s.dropped and s.truncated == sum(e.truncated for e in one_by_one) > 0
    assert all(a.input_ids.tolist() == b.input_ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()
               for a, b in zip(s.examples, one_by_one))
    assert all(EOS not in e.input_ids[:-1] for e in s.examples if not e.truncated)
    report = inspect_rows(pairs, tokenizer, max_length=40)
    assert [p.response for p in report.pairs] == [p.response for p in pairs]
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(report.encoded, s.examples))


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
    headed = write(tmp_path / "headed.csv", "Instruction,Input,Response\nTranslate,chat,cat\nSay hi,,hi\n")
    assert [(p.instruction, p.response) for p in read_pairs(headed)] == [("Translate\n\nchat", "cat"), ("Say hi", "hi")]
    custom = write(tmp_path / "c.csv", "q,a\nWhy?,Because.\n")
    assert read_pairs(custom, instruction_column="q", response_column="a")[0].response == "Because."
    with pytest.raises(DataError, match="both 'q': the model would learn to repeat the instruction"):
        read_pairs(custom, instruction_column="q", response_column="q")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"run is a model folder \(a run's output\?\), not data; give the pairs as"):
        read_pairs(tmp_path / "run")  # datasets said "An error occurred while generating the dataset"
    with pytest.raises(DataError, match=r"--split validation: .*c.csv is a file, which holds one table of pairs"):
        read_pairs(custom, split="validation")  # it was ignored, and config.yaml recorded it
    fake = write(tmp_path / "fake.parquet", "instruction,response\nHi,Hello\n")
    with pytest.raises(DataError, match=r"fake.parquet: cannot read the Parquet file: .*Check that it is a Parquet "
                                        r"file") as e:
        read_pairs(fake)
    assert "--split" not in str(e.value)


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"instruction": "a", "response": "b"}\n{"instruction": "a", \n', r"line 2: not valid JSON"),
    ("bad.jsonl", '{"instruction": "a\\ud800b", "response": "c"}\n',  # a lone surrogate, as JSON can escape it
     r"line 1: field 'instruction' holds a character that is not valid text at position 2 \(an unpaired surrogate"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, r"deep.json: not valid JSON for pairs \(nested too deeply\)"),
    ("bad.jsonl", '{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n', r"line 2: no response field; expected one of response, output, answer, completion \(fields: instruction\); "
     r"name yours with --response-column \(response_column= in Python\)"),
    ("bad.jsonl", '{"instruction": "", "response": "b"}\n', r"line 1: field 'instruction' is empty"),
    ("bad.jsonl", '{"instruction": "a", "response": "  "}\n', r"line 1: field 'response' is empty"),
    ("bad.jsonl", '{"instruction": 3, "response": "b"}\n', r"line 1: field 'instruction' must be text"),
    ("bad.csv", 'instruction,response\nok,fine\n,empty\n', r"bad.csv line 3: field 'instruction' is empty"),
    ("bad.json", '[{"instruction": "a", "response": "b"}', r"not valid JSON"),
    ("bad.txt", 'hello', r"unknown file type '.txt'"),
    ("empty.jsonl", '\n\n', r"no instruction/response pairs"),
    ("wide.csv", 'instruction,response\nHi,"two\nlines"\nBye,see you, then,later\n',
     r"wide.csv line 4: 2 more value\(s\) than the header's 2 columns; quote fields that contain ','"),
    ("wide.tsv", 'instruction\tresponse\nHi\tHello\tthere\n', r"wide.tsv line 2: 1 more value\(s\) than the header's 2"),
    ("header.csv", 'instruction,response\r\n\r\n', r"header.csv: a header line but no rows.*add rows below it"),
    ("open.csv", 'instruction,response\nHi,"Hello\nBye,Goodbye\n', r"open.csv line 2: not valid CSV \(unexpected end of data\)"),
])
def test_file_errors_name_file_line_and_field(tmp_path, name, content, message):
    with pytest.raises(DataError, match=message):
        read_pairs(write(tmp_path / name, content))


def test_csv_keeps_line_breaks_in_quoted_fields_and_names_the_line_a_record_starts(tmp_path):
    text = 'instruction,response\r\nHi,"Line one\r\nline two"\r\n\r\n"Bye\nnow","say ""bye"",\u2028then go"\r\n'
    assert [(p.instruction, p.response, p.where) for p in read_pairs(write(tmp_path / "a.csv", text))] == [
        ("Hi", "Line one\r\nline two", "a.csv line 2"), ("Bye\nnow", 'say "bye",\u2028then go', "a.csv line 5")]
    tsv = write(tmp_path / "a.tsv", 'instruction\tresponse\nHi\t"tab\there\nand a line"\n')
    assert read_pairs(tsv)[0].response == "tab\there\nand a line"
    with pytest.raises(DataError, match=r"b.csv line 4: field 'instruction' is empty"):
        read_pairs(write(tmp_path / "b.csv", 'instruction,response\n"a\nb",c\n,\n'))
    with pytest.raises(DataError, match=r"c.csv line 2 \(the header\): no response column; expected one of"):
        read_pairs(write(tmp_path / "c.csv", '\nquestion,notes\nHi,1\n'))  # a column the header lacks: its line
    with pytest.raises(DataError, match=r"d.csv line 1 \(the header\): no column 'zz' \(columns: instruction, "):
        read_pairs(write(tmp_path / "d.csv", 'instruction,response\nHi,Hello\n'), response_column="zz")  # named
    with pytest.raises(DataError, match=r"e.csv line 1 \(the header\): no response column"):
        read_pairs(write(tmp_path / "e.csv", 'instruction,notes\n'))  # said even with no rows below it


def test_a_file_with_several_bad_rows_names_them_all_in_one_reading(tmp_path):
    """It was refused over its first bad row only: fix one, read again, find the next."""
    good = json.dumps({"instruction": "Hi", "response": "Hello"})
    lines = [good, json.dumps({"instruction": "Hi", "response": ""}), good, "{not json", good,
             json.dumps({"instruction": None, "response": "x"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        read_pairs(tmp_path / "d.jsonl")
    assert str(e.value).splitlines() == [
        "d.jsonl: 3 of 6 rows cannot be used; fix or remove them and read the file again:",
        "- d.jsonl line 2: field 'response' is empty; fill it in or remove the row",
        "- d.jsonl line 4: not valid JSON (Expecting property name enclosed in double quotes at "
        "column 2)",
        "- d.jsonl line 6: field 'instruction' is missing or null; fill it in or remove the row"]
    rows = "instruction,response\n" + "".join(f"q{n},\n" if n % 3 else f"q{n},a{n}\n" for n in range(12))
    (tmp_path / "d.csv").write_text(rows)  # 8 of 12 rows have no response: 5 are named, then a count
    with pytest.raises(DataError) as e:
        read_pairs(tmp_path / "d.csv")
    lines = str(e.value).splitlines()
    assert lines[0].startswith("d.csv: 8 of 12 rows cannot be used") and len(lines) == 7
    assert [x.split(":")[0] for x in lines[1:6]] == [f"- d.csv line {n}" for n in (3, 4, 6, 7, 9)]
    assert lines[6] == "- and 3 more"
    (tmp_path / "all.json").write_text(json.dumps([{"q": "a", "a": "b"}] * 3))  # no row can be read
    with pytest.raises(DataError, match=r"^all\.json item 1: no instruction field; .* \(and each of the other 2 rows "
                                        r"has a problem too\)$"):
        read_pairs(tmp_path / "all.json")
    (tmp_path / "two.json").write_text(json.dumps([{"q": "a", "a": "b"}] * 2))  # one other row: said as one
    with pytest.raises(DataError, match=r"^two\.json item 1: no instruction field; .* \(and the other row has a "
                                        r"problem too\)$"):
        read_pairs(tmp_path / "two.json")


def test_a_json_error_reads_as_one_sentence(tmp_path):
    (tmp_path / "u.jsonl").write_text('{"instruction": "abc\n')  # it read 'starting at at column 17'
    with pytest.raises(DataError, match=r"u.jsonl line 1: not valid JSON \(Unterminated string starting at column 17\)$"):
        read_pairs(tmp_path / "u.jsonl")


def test_a_folder_without_data_files_is_said_to_be_one(tmp_path):
    """It went to `datasets`, which read thesis.txt as a text data set and failed with 'An error occurred while
    generating the dataset'."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.txt").write_text("four years of work")
    with pytest.raises(DataError, match=r"notes is a folder with no data files \(\.jsonl, .*give a file of pairs"):
        read_pairs(tmp_path / "notes")


def test_csv_from_a_spreadsheet_that_separates_with_semicolons(tmp_path):
    """Where the comma is the decimal mark, spreadsheets write CSV with semicolons: the header line says which."""
    text = '\ufeffinstruction;response\r\nHi, there;"Hello; welcome"\r\nPrice?;It costs 4,99 \u20ac.\r\n'
    assert [(p.instruction, p.response) for p in read_pairs(write(tmp_path / "excel.csv", text))] == [
        ("Hi, there", "Hello; welcome"), ("Price?", "It costs 4,99 \u20ac.")]
    # a comma in the header keeps the comma, semicolons in the rows are text
    assert read_pairs(write(tmp_path / "c.csv", "instruction,response\nA;B,C;D\n"))[0].response == "C;D"


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028, U+2029 and \\x85 may stand raw inside a JSON string; str.splitlines would cut the line there."""
    odd = "one\u2028two\u2029three\x85four"
    text = json.dumps({"instruction": odd, "response": "r"}, ensure_ascii=False) + "\r\n\r\n" + \
        json.dumps({"instruction": "x", "response": odd}, ensure_ascii=False) + "\r\n"
    assert [(p.instruction, p.response, p.where) for p in read_pairs(write(tmp_path / "a.jsonl", text))] == [
        (odd, "r", "a.jsonl line 1"), ("x", odd, "a.jsonl line 3")]


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "latin.jsonl", '{"instruction": "a", "response": "b"}\n{"instruction": "caf\u00e9", "response": "b"}\n', "latin-1")
    with pytest.raises(DataError, match=r"line 2 is not UTF-8"):
        read_pairs(path)


def test_column_option_names_missing_column(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"instruction": "a", "response": "b"}\n')
    with pytest.raises(DataError, match=r"no field 'question' \(fields: instruction, response\)"):
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
    # folders that datasets' save_to_disk wrote: one data set, or a dict of splits
    import datasets

    datasets.Dataset.from_pandas(frame).save_to_disk(tmp_path / "saved")
    assert [p.response for p in read_pairs(tmp_path / "saved")] == ["Hello!", "cat"]
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame.iloc[:1]),
                          "test": datasets.Dataset.from_pandas(frame.iloc[1:])}).save_to_disk(tmp_path / "splits")
    assert [p.response for p in read_pairs(tmp_path / "splits", split="test")] == ["cat"]
    with pytest.raises(DataError, match=r"splits: the saved data set has no split 'validation'; its splits are train, "
                                        r"test \(pass one with --split\)"):
        read_pairs(tmp_path / "splits", split="validation")
    bad = pd.DataFrame({"instruction": ["a", ""], "response": ["b", "c"]})
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet row 2: field 'instruction' is empty"):
        read_pairs(tmp_path / "bad.parquet")


def test_a_hub_data_set_name_without_the_hub_reads_the_cache_or_says_so_at_once(tmp_path):
    """Without the network, a data set name was asked of the hub five times (27 s of 'Retrying in 8s') before its
    error, and before a cached copy. It is now read from the cache at once, and a name nothing knows says so."""
    import datasets
    import pandas as pd

    home = tmp_path / "hf"
    pd.DataFrame({"instruction": ["Hi"], "response": ["Hello!"]}).to_parquet(tmp_path / "one.parquet")
    script = f"""
import glob, os, shutil, sys
import datasets
datasets.load_dataset("parquet", data_files={{"train": {str(tmp_path / "one.parquet")!r}}}, split="train")
# what a download of someorg/helpdesk leaves in datasets' cache: its prepared table, under the data set's name
built = next(d for d in glob.glob(str(datasets.config.HF_DATASETS_CACHE) + "/parquet/*/*/*") if os.path.isdir(d))
kept = os.path.join(str(datasets.config.HF_DATASETS_CACHE), "someorg___helpdesk", "default", "0.0.0", "h")
shutil.copytree(built, kept)
os.rename(os.path.join(kept, "parquet-train.arrow"), os.path.join(kept, "helpdesk-train.arrow"))
from jaxtune.data import DataError, read_pairs
print([(p.instruction, p.response, p.where) for p in read_pairs("someorg/helpdesk")])
try:
    read_pairs("nobody/no-such-data")
except DataError as e:
    print(e)
assert datasets.config.HF_HUB_OFFLINE is False  # the offline mode was the read's only
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(ROOT))  # a hub that never answers
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[('Hi', 'Hello!', 'someorg/helpdesk[train] row 1')]" in p.stdout
    assert "nobody/no-such-data: no file or folder of that name here, and no data set of that name in this machine's " \
        "Hugging Face cache; the hub, where a data set name is looked up, cannot be reached" in p.stdout, p.stdout
    assert "Retry" not in p.stderr, p.stderr[-3000:]
    assert datasets.config.HF_HUB_OFFLINE  # this process's setting (HF_HUB_OFFLINE=1) is left as it was
    with pytest.raises(DataError, match=r"mydata: no file or folder of that name here"):  # a mistyped file name
        read_pairs("mydata")


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
