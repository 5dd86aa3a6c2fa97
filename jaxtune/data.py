"""Data: the reference's formatting, tokenising with loss masks, reading pair files, and length-bucketed batches.

Masks are aligned to tokens: `loss_mask[t] = 1` means token t is a target (predicted from position t - 1).
Padding uses EOS (the reference's pad token) and is excluded by position, never by token id, because the EOS
appended to each example shares that id and is exactly the token that teaches the model to stop.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROMPT_TEMPLATE = "Instruction: {instruction}\nResponse:"

# The reference's two examples.
REFERENCE_INSTRUCTIONS = ["Answer politely", "Provide price"]
REFERENCE_RESPONSES = ["Of course, how may I assist you?", "The price is $99."]

# Column names tried, in order, when a file does not use instruction/response (alpaca uses output).
INSTRUCTION_COLUMNS = ("instruction", "prompt", "question")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion")


class DataError(ValueError):
    """Bad training data; the message says what, where (file, line, field) and what to do."""


def format_prompt(instruction: str) -> str:
    """What the model sees before it answers: `Instruction: {i}\\nResponse:`."""
    return PROMPT_TEMPLATE.format(instruction=instruction)


def format_example(instruction: str, response: str) -> str:
    """Exactly the reference's training string: `Instruction: {i}\\nResponse: {r}`."""
    return f"{format_prompt(instruction)} {response}"


@dataclass(frozen=True)
class Pair:
    instruction: str
    response: str
    where: str = ""  # e.g. "data.jsonl line 7", for messages


def check_pair(instruction, response, where: str) -> Pair:
    for name, value in (("instruction", instruction), ("response", response)):
        if value is None:
            raise DataError(f"{where}: field {name!r} is missing or null; fill it in or remove the row")
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__} ({value!r})")
        if not value.strip():
            raise DataError(f"{where}: field {name!r} is empty; fill it in or remove the row")
        bad = invalid_character(value)
        if bad is not None:
            raise DataError(f"{where}: field {name!r} holds a character that is not valid text at position {bad + 1} "
                            "(an unpaired surrogate, U+D800-U+DFFF); fix or remove it")
    return Pair(instruction, response, where)


def invalid_character(text: str) -> int | None:
    """The index of the first character UTF-8 cannot encode (a lone surrogate, which JSON's \\ud800 escapes and
    some clients send), or None: the tokenizer cannot take such text."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def as_pairs(pairs, what: str = "pairs") -> list[Pair]:
    """Pairs given in Python, checked as a file's rows are: Pair objects, dicts read as a file's rows are (the same
    column names, Alpaca's `input` joined to the instruction), (instruction, response) tuples, or a pandas DataFrame
    (its rows), each with non-empty text on both sides. A path, or one text, is refused with what to call instead."""
    if isinstance(pairs, (str, bytes, os.PathLike)):
        raise DataError(f"{what}: got {type(pairs).__name__} {str(pairs)[:60]!r}, not a list of pairs; read a file "
                        "with jaxtune.read_pairs(path), or make pairs with jaxtune.Pair(instruction, response)")
    if callable(getattr(pairs, "to_dict", None)) and hasattr(pairs, "columns"):  # a DataFrame: its rows
        pairs = pairs.to_dict("records")
    try:
        items = list(pairs)
    except TypeError:
        raise DataError(f"{what}: got {type(pairs).__name__}, not a list of pairs (jaxtune.Pair, or dicts with "
                        "'instruction' and 'response')") from None
    out = []
    for n, item in enumerate(items, start=1):
        where = f"{what}[{n - 1}]"
        if isinstance(item, Pair):
            out.append(check_pair(item.instruction, item.response, item.where or where))
        elif isinstance(item, dict):
            out.append(record_to_pair(item, where, kind="key"))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(check_pair(item[0], item[1], where))
        else:
            raise DataError(f"{where}: {item!r:.60} ({type(item).__name__}) is not a pair; give jaxtune.Pair("
                            "instruction, response), a dict with 'instruction' and 'response', or an (instruction, "
                            "response) tuple")
    return out


def pairs_from_lists(instructions, responses, source: str = "row") -> list[Pair]:
    for name, value in (("instructions", instructions), ("responses", responses)):
        if isinstance(value, str):
            raise DataError(f"{name}: one text ({value[:40]!r}); give a list of texts, one for each pair")
    try:  # a pandas Series or a NumPy array as well as a list
        instructions, responses = list(instructions), list(responses)
    except TypeError as e:
        raise DataError(f"instructions and responses: give two lists of texts ({e})") from None
    if len(instructions) != len(responses):
        raise DataError(f"{len(instructions)} instructions but {len(responses)} responses: they must pair up")
    if not instructions:
        raise DataError("no instruction/response pairs given")
    return [check_pair(i, r, f"{source} {n}") for n, (i, r) in enumerate(zip(instructions, responses), start=1)]


# ---------------------------------------------------------------------------------------------- files
class _BadRows:
    """A file's rows that cannot be used, gathered so that one reading names them all, not only the first."""

    SHOWN = 5

    def __init__(self, name: str):
        self.name, self.errors, self.rows = name, [], 0

    def pair(self, make, *args, **kwargs) -> Pair | None:
        self.rows += 1
        try:
            return make(*args, **kwargs)
        except DataError as e:
            self.errors.append(str(e))
            return None

    def check(self) -> None:
        n = len(self.errors)
        if n == 1:
            raise DataError(self.errors[0])
        if n and n == self.rows:
            raise DataError(f"{self.errors[0]} (and " + ("the other row has a problem too)" if n == 2 else
                                                         f"each of the other {n - 1:,} rows has a problem too)"))
        if n:
            shown = "".join(f"\n- {e}" for e in self.errors[: self.SHOWN])
            raise DataError(f"{self.name}: {n:,} of {self.rows:,} rows cannot be used; fix or remove them and read the "
                            f"file again:{shown}" + (f"\n- and {n - self.SHOWN:,} more" if n > self.SHOWN else ""))


def _pick(columns, wanted: str | None, candidates: tuple[str, ...], field: str, where: str, kind: str) -> str:
    """kind: what the record's keys are called in messages ("column", "field" for a JSON object, whose keys are
    its own, or "key" for a dict given in Python, which no column option renames)."""
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{where}: no {kind} {wanted!r} ({kind}s: {', '.join(map(str, columns))})")
        return wanted
    lowered = None  # "Instruction", as the app's table heads: built for the first name not found as it is
    for name in candidates:
        if name in columns:
            return name
        if lowered is None:
            lowered = {str(c).strip().lower(): c for c in reversed(list(columns))}
        if name in lowered:
            return lowered[name]
    rename = (f"rename yours to {field!r}" if kind == "key" else
              f"name yours with --{field}-column ({field}_column= in Python)")
    raise DataError(f"{where}: no {field} {kind}; expected one of {', '.join(candidates)} "
                    f"({kind}s: {', '.join(map(str, columns))}); {rename}")


def record_to_pair(record: dict, where: str, instruction_column=None, response_column=None, *,
                   kind: str = "column") -> Pair:
    """One row. Alpaca's optional `input` joins the instruction as `{instruction}\\n\\n{input}` when non-empty."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with instruction and response fields, got {type(record).__name__}")
    i_col = _pick(record, instruction_column, INSTRUCTION_COLUMNS, "instruction", where, kind)
    r_col = _pick(record, response_column, RESPONSE_COLUMNS, "response", where, kind)
    instruction = record.get(i_col)
    extra = (record.get(next((c for c in record if str(c).strip().lower() == "input"), "input"))
             if instruction_column is None else None)
    if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    return check_pair(instruction, record.get(r_col), where)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 (byte {e.start}); save the file as UTF-8 and retry") from None


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """datasets and huggingface_hub in offline mode for the block (they read HF_HUB_OFFLINE once, at import)."""
    import datasets
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    if offline:
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _hub_cached(name: str) -> bool:
    """Whether this machine's Hugging Face caches hold anything of the hub data set `name`."""
    import datasets
    import huggingface_hub.constants

    if (Path(huggingface_hub.constants.HF_HUB_CACHE) / ("datasets--" + name.replace("/", "--"))).is_dir():
        return True
    key = name.replace("/", "").replace("_", "").lower()  # datasets' own cache: org___name, the name in snake case
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    return cache.is_dir() and any(p.name.replace("_", "").lower() == key for p in cache.iterdir())


def _records_from_datasets(source: str, split: str, cols: dict, *, parquet: bool) -> list[Pair]:
    """Parquet files and Hugging Face data sets (hub names or local data-set folders) through `datasets`."""
    import datasets

    label = Path(source).name if parquet else f"{source}[{split}]"
    folder = Path(source)
    saved = folder.is_dir() and ((folder / "dataset_dict.json").exists() or (folder / "state.json").exists())
    data_files = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")
    if folder.is_dir() and not saved and not any(f.suffix.lower() in data_files for f in folder.rglob("*")):
        raise DataError(f"{source} is a folder with no data files ({', '.join(data_files)}) and no data set saved "
                        "with datasets' save_to_disk; give a file of pairs, or the folder that holds them")
    unreachable = False
    try:
        if parquet:
            table = datasets.Dataset.from_parquet(source)
        elif saved:  # a folder `save_to_disk` wrote: a data set, or a dict of splits
            table = datasets.load_from_disk(source)
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise DataError(f"{source}: the saved data set has no split {split!r}; its splits are "
                                    f"{', '.join(table)} (pass one with --split)")
                table = table[split]
            else:
                label = folder.name
        elif folder.is_dir():  # data files in the hub's layout
            table = datasets.load_dataset(source, split=split)
        else:  # a hub name: from the hub, or from this machine's cache when the hub cannot be reached
            from jaxtune.checkpoint import hub_reachable

            unreachable = not hub_reachable()
            with _hub_offline(unreachable):  # else datasets asks the hub five times, 27 s, before its cache
                table = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; its message says what went wrong
        if parquet:  # a local file: neither its name nor a split is in question
            raise DataError(f"{source}: cannot read the Parquet file: {e}. Check that it is a Parquet file (or give "
                            "the data as .jsonl, .json or .csv)") from None
        if unreachable and not _hub_cached(source):
            raise DataError(f"{source}: no file or folder of that name here, and no data set of that name in this "
                            "machine's Hugging Face cache; the hub, where a data set name is looked up, cannot be "
                            "reached (no network, or HF_HUB_OFFLINE is set). Check the path, or pass a local "
                            "file") from None
        raise DataError(f"{source}: could not load the data set (split {split!r}): {e}. Check the name and --split, "
                        "or pass a local file") from None
    bad = _BadRows(label)
    pairs = [bad.pair(record_to_pair, dict(r), f"{label} row {n}", **cols) for n, r in enumerate(table, start=1)]
    bad.check()
    return pairs


def _json_msg(e: json.JSONDecodeError) -> str:
    """The decoder's message, without the ' at' that some end with ('Unterminated string starting at')."""
    return e.msg.removesuffix(" at")


def _jsonl_pair(path: Path, line: str, n: int, cols: dict) -> Pair:
    try:
        record = json.loads(line)
    except RecursionError:
        raise DataError(f"{path.name} line {n}: not a pair (nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name} line {n}: not valid JSON ({_json_msg(e)} at column {e.colno})") from None
    return record_to_pair(record, f"{path.name} line {n}", **cols, kind="field")


def _csv_delimiter(text: str) -> str:
    """A comma, unless the header line has none and has semicolons (what spreadsheets write where the comma is the
    decimal mark) or tabs."""
    header = text.lstrip("\r\n").split("\n", 1)[0]
    return next((d for d in (",", ";", "\t") if d in header), ",")


def _csv_pair(header: list, row: list, where: str, delimiter: str, cols: dict) -> Pair:
    if len(row) > len(header):
        raise DataError(f"{where}: {len(row) - len(header)} more value(s) than the header's {len(header)} columns; "
                        f"quote fields that contain {delimiter!r}, like \"a{delimiter} b\"")
    return record_to_pair(dict(zip(header, row + [None] * (len(header) - len(row)))), where, **cols)


def _csv_pairs(path: Path, text: str, delimiter: str, cols: dict) -> list[Pair]:
    """RFC 4180 rows: a quoted field keeps its line breaks, and a record is named by the line it starts on. Strict, so
    a quote left open is an error rather than a field that swallows the rest of the file."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header, pairs, bad = None, [], _BadRows(path.name)
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path.name} line {line}: not valid CSV ({e}); a quoted field must end with a quote, "
                            f"and a quote inside it is written twice (\"\")") from None
        if not row:
            continue  # a blank line
        if header is None:  # its columns are checked here: a column it lacks is the header's problem, not a row's
            header = row
            for side, candidates in (("instruction", INSTRUCTION_COLUMNS), ("response", RESPONSE_COLUMNS)):
                _pick(header, cols.get(f"{side}_column"), candidates, side, f"{path.name} line {line} (the header)",
                      "column")
            continue
        pairs.append(bad.pair(_csv_pair, header, row, f"{path.name} line {line}", delimiter, cols))
    bad.check()
    if header is not None and not pairs:
        raise DataError(f"{path}: a header line but no rows, so no instruction/response pairs found; add rows below it")
    return pairs


def read_pairs(path, *, instruction_column: str | None = None, response_column: str | None = None,
               split: str = "train") -> list[Pair]:
    """Pairs from a .jsonl, .json (a list of objects), .csv, .tsv or .parquet file, or a Hugging Face data set (a hub
    name such as `org/name`, or a local data-set folder) and its `split`; errors name file, line and field."""
    if instruction_column is not None and instruction_column == response_column:
        raise DataError(f"--instruction-column and --response-column are both {instruction_column!r}: the model would "
                        "learn to repeat the instruction; give the response's own column")
    if not isinstance(path, (str, os.PathLike)):
        raise DataError(f"read_pairs: got {type(path).__name__}, not a path; give a file, a data-set folder or a hub "
                        "name. Pairs already in Python (a list, a DataFrame) go to jaxtune.train as they are")
    path = Path(path)
    cols = dict(instruction_column=instruction_column, response_column=response_column)
    if path.is_dir() and any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise DataError(f"{path} is a model folder (a run's output?), not data; give the pairs as a .jsonl, .json, "
                        ".csv or .parquet file, or a data set")
    if path.is_dir() or (not path.exists() and not path.suffix and not str(path).startswith((".", "/", "~"))):
        pairs = _records_from_datasets(str(path), split, cols, parquet=False)
        if not pairs:
            raise DataError(f"{path}[{split}]: no instruction/response pairs found")
        return pairs
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if split != "train":  # a file is one table: a split it would ignore is refused
        raise DataError(f"--split {split}: {path} is a file, which holds one table of pairs; --split picks a part of "
                        "a Hugging Face data set. Leave it out, or give the held-out file with --validation-data")
    if path.suffix.lower() == ".parquet":
        pairs = _records_from_datasets(str(path), split, cols, parquet=True)
        if not pairs:
            raise DataError(f"{path}: no instruction/response pairs found")
        return pairs
    text = _read_text(path)
    suffix = path.suffix.lower()
    pairs: list[Pair] = []
    if suffix in (".jsonl", ".ndjson"):
        # "\n" alone ends a line: U+2028, U+2029 and \x85 may stand raw inside a JSON string (str.splitlines splits
        # on them); a "\r" before the "\n" is JSON whitespace
        bad = _BadRows(path.name)
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                pairs.append(bad.pair(_jsonl_pair, path, line, n, cols))
        bad.check()
    elif suffix == ".json":
        try:
            records = json.loads(text)
        except RecursionError:
            raise DataError(f"{path}: not valid JSON for pairs (nested too deeply); give a list of objects") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({_json_msg(e)} at line {e.lineno}, column {e.colno})") from None
        if isinstance(records, dict):  # {"data": [...]} or a single list-valued key
            lists = [v for v in records.values() if isinstance(v, list)]
            records = lists[0] if len(lists) == 1 else records
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of objects with instruction and response fields")
        bad = _BadRows(path.name)
        pairs = [bad.pair(record_to_pair, r, f"{path.name} item {n}", **cols, kind="field")
                 for n, r in enumerate(records, start=1)]
        bad.check()
    elif suffix in (".csv", ".tsv"):
        pairs = _csv_pairs(path, text, "\t" if suffix == ".tsv" else _csv_delimiter(text), cols)
    else:
        raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet, or a data set name")
    if not pairs:
        raise DataError(f"{path}: no instruction/response pairs found")
    return pairs


# ---------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # int32 [n], 1 where the token is a target
    truncated: bool


_TEXT_TOKENIZERS = weakref.WeakKeyDictionary()


def _text_tokenizer(tokenizer):
    """A private copy of the tokenizer's backend that reads `<|endoftext|>` in user text as ordinary characters.
    `split_special_tokens=True` on each call would flip a flag on the shared backend, which races with any other
    thread tokenizing at the time (the app trains in one thread while previewing or generating in another)."""
    import tokenizers

    text = _TEXT_TOKENIZERS.get(tokenizer)
    if text is None:
        text = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        text.encode_special_tokens = True
        text.no_truncation()
        text.no_padding()
        _TEXT_TOKENIZERS[tokenizer] = text
    return text


def tokenize_text(tokenizer, texts: list[str]) -> list:
    """Each text's tokens (`.ids`, and character `.offsets`), in one batched call, special tokens' strings read as
    ordinary text: only the EOS jaxtune appends (and padding) carries the EOS id."""
    return _text_tokenizer(tokenizer).encode_batch(list(texts), add_special_tokens=False)


def _encode_batch(tokenizer, pairs, loss_on: str, max_length: int) -> list[Encoded]:
    if loss_on not in ("response", "all", "reference"):
        raise ValueError(f"loss_on={loss_on!r}: choose response, all or reference")
    texts = [format_example(p.instruction, p.response) for p in pairs]
    out, eos = [], tokenizer.eos_token_id
    for p, tokens in zip(pairs, tokenize_text(tokenizer, texts)):
        ids = list(tokens.ids)
        prompt_chars = len(format_prompt(p.instruction))
        in_response = [start >= prompt_chars for start, _ in tokens.offsets]
        if loss_on != "reference":
            ids.append(eos)
            in_response.append(True)
        truncated = len(ids) > max_length
        ids, in_response = ids[:max_length], in_response[:max_length]
        mask = np.asarray(in_response, np.int32) if loss_on == "response" else np.ones(len(ids), np.int32)
        mask[0] = 0  # the first token has no predecessor
        out.append(Encoded(np.asarray(ids, np.int32), mask, truncated))
    return out


def encode(tokenizer, instruction: str, response: str, *, loss_on: str = "response", max_length: int = 256) -> Encoded:
    """Token ids and the loss mask of one pair (`encode_pairs` encodes many at once).

    response: response tokens and the appended EOS carry loss.  all: every token after the first, and the EOS.
    reference: the reference's tokens (no EOS appended); every position carries loss, as in the reference.
    `<|endoftext|>` typed in the instruction or response is text, never the EOS token.
    """
    return _encode_batch(tokenizer, [Pair(instruction, response)], loss_on, max_length)[0]


@dataclass
class EncodedSet:
    """Pairs as the trainer sees them: `examples[k]` encodes `pairs[k]`; rows that would carry no target are left
    out and named in `dropped`. `truncated` counts kept examples cut at max_length."""

    examples: list[Encoded]
    pairs: list[Pair]
    truncated: int
    dropped: list[str]  # `where` of each row left out
    max_length: int

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def warning(self) -> str | None:
        """One line counting the rows left out, or None."""
        if not self.dropped:
            return None
        return (f"{len(self.dropped)} row(s) left out: nothing of the response fits in max_length {self.max_length} "
                f"tokens ({', '.join(self.dropped[:3])}{', ...' if len(self.dropped) > 3 else ''}); raise max length "
                f"or shorten the instructions")


_ENCODE_CHUNK = 1024  # texts per batched tokenizer call: fast, and memory stays small on large files


def _encode_all(tokenizer, pairs: list[Pair], loss_on: str, max_length: int):
    """(pair, Encoded) for every pair, each tokenized once, in batched calls."""
    for start in range(0, len(pairs), _ENCODE_CHUNK):
        chunk = pairs[start:start + _ENCODE_CHUNK]
        yield from zip(chunk, _encode_batch(tokenizer, chunk, loss_on, max_length))


def encode_pairs(tokenizer, pairs: list[Pair], *, loss_on: str = "response", max_length: int = 256) -> EncodedSet:
    """Encode every pair once, in batched tokenizer calls; rows whose loss mask would be empty (the instruction
    fills max_length) are left out and counted. Raises DataError when no row is left."""
    examples, kept, dropped = [], [], []
    for n, (p, e) in enumerate(_encode_all(tokenizer, pairs, loss_on, max_length), start=1):
        if e.loss_mask.any():
            examples.append(e)
            kept.append(p)
        else:
            dropped.append(p.where or f"row {n}")
    if pairs and not kept:
        raise DataError(f"no row keeps any of its response within max_length {max_length} tokens "
                        f"(first: {dropped[0]}); raise max length or shorten the instructions")
    return EncodedSet(examples, kept, sum(e.truncated for e in examples), dropped, max_length)


def bucket_length(n: int, buckets: tuple[int, ...], max_length: int) -> int:
    """The smallest bucket that holds n tokens, capped at max_length: a handful of shapes, so few compilations."""
    for b in buckets:
        if n <= b and b <= max_length:
            return b
    return max_length


def collate(examples: list[Encoded], batch_size: int, length: int, pad_id: int, *, reference: bool = False) -> dict:
    """Right-pad with `pad_id` to [batch_size, length]; missing rows are all padding and carry no loss.

    reference=True reproduces the reference's loss: it pads to the longest example and counts every padded
    position as a target, so here positions up to the longest example carry loss, the rest do not.
    """
    input_ids = np.full((batch_size, length), pad_id, np.int32)
    loss_mask = np.zeros((batch_size, length), np.int32)
    attention_mask = np.zeros((batch_size, length), np.int32)
    longest = max(len(e.input_ids) for e in examples)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = e.input_ids
        attention_mask[row, :n] = 1
        if reference:
            loss_mask[row, 1:longest] = 1
        else:
            loss_mask[row, :n] = e.loss_mask
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}


def pack_rows(lengths, length: int) -> list[list[int]]:
    """Example indices per row of `length` tokens, first-fit decreasing: long examples first, each into the first
    row with room. Rows come out nearly full (about 98% on the example data)."""
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(length - n)
    return rows


def plan_epoch(lengths, *, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
               pack_length: int | None = None) -> list[list[list[int]]]:
    """One epoch's batches, each a list of rows, each row a list of example indices (one, unless packed).

    Unpacked: the data is shuffled, cut into windows of 32 batches, sorted by length inside each window, batched,
    and the batches shuffled again: near-random order, little padding, few distinct lengths.
    Packed: windows of shuffled examples are packed into rows of `pack_length` tokens, and the rows shuffled.
    """
    order = np.arange(len(lengths))
    rng = np.random.default_rng([seed, epoch])
    if shuffle:
        rng.shuffle(order)
    window = batch_size * 32
    if pack_length is not None:
        window *= 8  # a packed row holds several examples; a larger window packs tighter
        rows = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            rows += [[int(chunk[i]) for i in row] for row in pack_rows([lengths[i] for i in chunk], pack_length)]
        if shuffle:
            rng.shuffle(rows)
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [[[int(i)] for i in chunk[j:j + batch_size]] for j in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def targets_size(row_target_counts) -> int:
    """The `targets` size for `collate_packed`: the most targets any row holds, rounded up to a multiple of 16
    (one fixed size for the whole run, so one compiled program)."""
    most = max(row_target_counts, default=1)
    return -(-max(most, 1) // 16) * 16


def collate_packed(rows: list[list[Encoded]], batch_size: int, length: int, pad_id: int, targets: int | None = None) -> dict:
    """Rows of several examples each, with `segment_ids` (1, 2, ... per example, 0 for padding) and `positions`
    that restart at 0 for every example: attention stays inside an example, which sees exactly what it would
    see alone. Each example's loss mask is kept; its first token is never a target, so no example is trained to
    follow the one before it.

    targets: also list, per row, the positions whose next token is a target (`logit_positions`, with
    `logit_targets` and a 0/1 `logit_mask`, padded to this many), so the model computes logits only there.
    """
    batch = {k: np.zeros((batch_size, length), np.int32)
             for k in ("input_ids", "loss_mask", "attention_mask", "segment_ids", "positions")}
    batch["input_ids"][:] = pad_id
    for r, row in enumerate(rows):
        at = 0
        for s, e in enumerate(row, start=1):
            n = len(e.input_ids)
            if at + n > length:
                raise ValueError(f"row {r} holds {at + n} tokens, more than the packed length {length}")
            span = slice(at, at + n)
            batch["input_ids"][r, span], batch["loss_mask"][r, span] = e.input_ids, e.loss_mask
            batch["attention_mask"][r, span], batch["segment_ids"][r, span] = 1, s
            batch["positions"][r, span] = np.arange(n)
            at += n
    if targets is not None:
        for k in ("logit_positions", "logit_targets", "logit_mask"):
            batch[k] = np.zeros((batch_size, targets), np.int32)
        for r in range(batch_size):
            where = np.flatnonzero(batch["loss_mask"][r])
            if len(where) > targets:
                raise ValueError(f"row {r} has {len(where)} targets, more than targets={targets}")
            n = len(where)
            batch["logit_positions"][r, :n] = where - 1  # position t - 1 predicts token t
            batch["logit_targets"][r, :n] = batch["input_ids"][r, where]
            batch["logit_mask"][r, :n] = 1
    return batch


def batch_length(batch, lengths, *, buckets, max_length: int, pack: bool) -> int:
    """The length a planned batch (rows of example indices) is collated to: max_length when packed, else the
    bucket that holds its longest example."""
    return max_length if pack else bucket_length(max(lengths[row[0]] for row in batch), buckets, max_length)


def epoch_batches(examples: list[Encoded], *, batch_size: int, buckets, max_length: int, pad_id: int, seed: int,
                  epoch: int, shuffle: bool = True, reference: bool = False, pack: bool = False, plan=None,
                  targets: int | None = None):
    """One epoch of fixed-shape batches (see `plan_epoch`): bucketed lengths, or packed rows of max_length
    (with `targets`, see `collate_packed`)."""
    if plan is None:
        plan = plan_epoch([len(e.input_ids) for e in examples], batch_size=batch_size, seed=seed, epoch=epoch,
                          shuffle=shuffle, pack_length=max_length if pack else None)
    lengths = [len(e.input_ids) for e in examples]
    for batch in plan:
        rows = [[examples[i] for i in row] for row in batch]
        length = batch_length(batch, lengths, buckets=buckets, max_length=max_length, pack=pack)
        if pack:
            yield collate_packed(rows, batch_size, length, pad_id, targets)
        else:
            yield collate([row[0] for row in rows], batch_size, length, pad_id, reference=reference)


def reference_batch(tokenizer, instructions, responses) -> dict:
    """The reference's `preprocess`: pad (with EOS, on the right) to the longest, truncate to the model's limit.
    Like the reference, it reads `<|endoftext|>` typed in a text as the EOS token (jaxtune's `encode` does not)."""
    texts = [format_example(i, r) for i, r in zip(instructions, responses)]
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32)}


# ---------------------------------------------------------------------------------------------- checks
@dataclass
class DataReport:
    """What a set of rows will look like to the trainer, and what is wrong with it, by row number."""

    pairs: list[Pair]  # the usable rows
    problems: list[str]  # errors: rows that cannot be used (empty cells)
    warnings: list[str]  # usable but suspicious: duplicates, rows that will be truncated; rows left out (no target)
    tokens: int
    truncated: int
    encoded: list[Encoded] = field(default_factory=list)  # encoded[k] is pairs[k], ready for the trainer
    dropped: list[str] = field(default_factory=list)  # rows left out: nothing of the response fits in max_length
    numbers: list[int] = field(default_factory=list)  # numbers[k]: pairs[k]'s place among the rows (from first_row)
    blank: list[int] = field(default_factory=list)  # the places of rows with nothing in them (skipped, not problems)

    def summary(self) -> str:
        n, k = len(self.pairs), len(self.problems)
        return (f"{n:,} pair{'' if n == 1 else 's'}, {self.tokens:,} tokens, {self.truncated} will be truncated"
                + (f", {len(self.dropped)} left out (no room for the response)" if self.dropped else "")
                + (f", {k} problem{'' if k == 1 else 's'}" if k else ""))


def inspect_rows(rows, tokenizer, *, max_length: int = 256, loss_on: str = "response", first_row: int = 1) -> DataReport:
    """Check (instruction, response) rows before training: empty cells are problems (the row is left out),
    duplicates and over-long rows are warnings, and so are rows left out because the instruction fills max_length.
    Row numbers start at `first_row`. The usable rows come back encoded, each once, in batched tokenizer calls."""
    candidates, numbers, blank, problems, duplicate, seen = [], [], [], [], {}, {}
    for n, row in enumerate(rows, start=first_row):
        if isinstance(row, Pair):  # pairs read from a file name their own place ("data.jsonl line 7")
            instruction, response, where = row.instruction, row.response, row.where or f"row {n}"
        else:
            instruction, response = (list(row) + [None, None])[:2]
            where = f"row {n}"
        instruction = "" if instruction is None else str(instruction)
        response = "" if response is None else str(response)
        if not instruction.strip() and not response.strip():
            blank.append(n)  # a blank row is not a problem, just nothing
            continue
        empty = [f for f, v in (("instruction", instruction), ("response", response)) if not v.strip()]
        if empty:
            problems.append(f"{where}: empty {' and '.join(empty)}; fill it in or delete the row")
            continue
        key = (instruction.strip(), response.strip())
        if key in seen:
            duplicate[len(candidates)] = f"{where}: duplicate of {seen[key]}"
        seen.setdefault(key, where)
        candidates.append(Pair(instruction, response, where))
        numbers.append(n)
    report = DataReport([], problems, [], 0, 0, blank=blank)
    for k, (p, e) in enumerate(_encode_all(tokenizer, candidates, loss_on, max_length)):
        if k in duplicate:
            report.warnings.append(duplicate[k])
        if not e.loss_mask.any():
            report.dropped.append(p.where)
            report.warnings.append(f"{p.where}: nothing of the response fits in max_length {max_length} tokens; "
                                   f"the row is left out (raise max length or shorten the instruction)")
            continue
        if e.truncated:
            report.truncated += 1
            report.warnings.append(f"{p.where}: longer than {max_length} tokens; it will be truncated "
                                   f"(raise max length or shorten it)")
        report.tokens += len(e.input_ids)
        report.pairs.append(p)
        report.encoded.append(e)
        report.numbers.append(numbers[k])
    return report
