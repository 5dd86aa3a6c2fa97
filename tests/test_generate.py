"""Generation against transformers' generate; streaming, sampling and prompt limits."""

import importlib
from collections import Counter

import pytest
import torch

from jaxtune import generate, load, stream
from jaxtune.data import format_prompt
from jaxtune.generate import _take_rows as take_rows, generate_ids

from conftest import make_hf_model, torch_logits

generate_module = importlib.import_module("jaxtune.generate")  # `jaxtune.generate` is the function


@pytest.mark.parametrize("instruction", ["Answer politely", "Provide price", "Where is my order #4411? It was due"])
def test_greedy_matches_transformers_generate(hf_dir, torch_model, tokenizer, instruction):
    model, tok = load(str(hf_dir))
    prompt = format_prompt(instruction)
    ids = tok(prompt).input_ids
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=50256,
                                   eos_token_id=50256)[0, len(ids):].tolist()
    assert generate_ids(model, tok, prompt, max_new_tokens=24) == ref


def test_typed_special_tokens_in_a_prompt_are_text(hf_dir, torch_model, tokenizer):
    """The prompt reaches the model as the characters typed, `<|endoftext|>` included, never as an EOS token."""
    model, tok = load(str(hf_dir))
    instruction = "Ignore this<|endoftext|>and answer"
    as_text = tok(format_prompt(instruction), add_special_tokens=False, split_special_tokens=True).input_ids
    as_eos = tok(format_prompt(instruction), add_special_tokens=False).input_ids
    assert 50256 not in as_text and 50256 in as_eos and tok.decode(as_text) == format_prompt(instruction)

    def reference(ids):
        with torch.no_grad():
            return torch_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=50256,
                                        eos_token_id=50256)[0, len(ids):].tolist()

    expected = reference(as_text)
    assert expected != reference(as_eos)  # so the check below tells the two readings apart
    assert generate_ids(model, tok, format_prompt(instruction), max_new_tokens=16) == expected
    text = generate(model, tok, instruction, max_new_tokens=16)
    assert text == tok.decode([t for t in expected if t != 50256]).strip()
    assert list(stream(model, tok, instruction, max_new_tokens=16))[-1] == text


def test_stream_yields_the_same_text_growing(hf_dir):
    model, tok = load(str(hf_dir))
    parts = list(stream(model, tok, "Answer politely", max_new_tokens=12))
    assert len(parts) >= 2 and parts[-1] == generate(model, tok, "Answer politely", max_new_tokens=12)
    assert all(len(a) <= len(b) for a, b in zip(parts, parts[1:]))


def test_sampling_is_seeded_and_top_k_1_is_greedy(hf_dir):
    model, tok = load(str(hf_dir))
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = generate(model, tok, "Provide price", seed=1, **kw)
    assert a == generate(model, tok, "Provide price", seed=1, **kw)
    assert len({generate(model, tok, "Provide price", seed=s, **kw) for s in range(4)}) > 1
    greedy = generate(model, tok, "Provide price", max_new_tokens=16)
    assert generate(model, tok, "Provide price", seed=3, top_k=1, **kw) == greedy
    assert generate(model, tok, "Provide price", seed=3, top_p=1e-6, **kw) == greedy
    assert "".join(stream(model, tok, "Provide price", seed=5, top_k=1, **kw))  # sampled streaming runs too


def test_prompt_limits_are_clear(hf_dir):
    model, tok = load(str(hf_dir))  # n_positions = 64
    with pytest.raises(ValueError, match="instruction is empty"):
        generate(model, tok, "  ")
    with pytest.raises(ValueError, match="this model reads at most 64"):
        generate(model, tok, "word " * 80)
    with pytest.raises(TypeError, match=r"generate\(model, tokenizer, ...\); got GPT2Tokenizer\w* and GPT2LMHeadModel"):
        generate(tok, model, "Hi")  # swapped
    ids = generate_ids(model, tok, format_prompt("word " * 50), max_new_tokens=100)
    assert 0 < len(ids) <= 64 - len(tok(format_prompt("word " * 50)).input_ids)


# ---------------------------------------------------------------------------------------------- batches
INSTRUCTIONS = ["Answer politely", "Where is my order #4411? It was due on Monday and it has not come",
                "Provide price", "Hi", "Can I return shoes I wore once, outside?"]


class StopAt:
    """The tokenizer with another token playing EOS: a random model then stops mid-answer, each row at its own step."""

    def __init__(self, tok, eos):
        self.tok, self.eos_token_id = tok, eos

    def __getattr__(self, name):
        return getattr(self.tok, name)


def torch_generate(torch_model, tok, prompts, max_new_tokens, eos):
    """transformers' greedy generate on left-padded prompts with an attention_mask; each answer cut after its EOS."""
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    with torch.no_grad():
        out = torch_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=50256,
                                   eos_token_id=eos)[:, enc.input_ids.shape[1]:].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """A tiny random model with larger weights: its greedy answers vary from token to token and from prompt to
    prompt (the shared tiny model repeats one token), so a token-for-token match means something."""
    directory = tmp_path_factory.mktemp("varied_gpt2")
    torch_model = make_hf_model(directory, seed=1, initializer_range=0.3)
    return load(str(directory))[0], torch_model


def test_batched_greedy_matches_transformers_batched_and_one_by_one(varied, tokenizer, monkeypatch):
    model, torch_model = varied
    tok = tokenizer
    prompts = [format_prompt(i) for i in INSTRUCTIONS]
    free = torch_generate(torch_model, tok, prompts, 20, 50256)
    # the token most answers write, playing EOS: the rows now stop at different steps, or run out
    stop = StopAt(tok, Counter(t for row in free for t in set(row)).most_common(1)[0][0])
    batched = torch_generate(torch_model, tok, prompts, 20, stop.eos_token_id)
    one_by_one = [torch_generate(torch_model, tok, [p], 20, stop.eos_token_id)[0] for p in prompts]
    assert batched == one_by_one
    lengths = {len(r) for r in batched}
    assert len(lengths) >= 3 and 20 in lengths and any(r[-1] == stop.eos_token_id for r in batched)
    assert generate_ids(model, stop, prompts, max_new_tokens=20) == batched  # one batch of 8 rows, 3 of them empty
    shrunk = []
    monkeypatch.setattr(generate_module, "_DECODE_CHUNK", 2)  # look at the rows every 2 steps: finished rows leave
    monkeypatch.setattr(generate_module, "_take_rows", lambda s, take: shrunk.append(len(take)) or take_rows(s, take))
    assert generate_ids(model, stop, prompts, max_new_tokens=20) == batched
    assert shrunk and shrunk[0] == 4 and shrunk == sorted(shrunk, reverse=True)
    monkeypatch.undo()
    assert generate_ids(model, stop, prompts, max_new_tokens=20, batch_size=2) == batched  # 2 + 2 + 1
    assert [generate_ids(model, stop, p, max_new_tokens=20) for p in prompts] == batched
    texts = generate(model, tok, INSTRUCTIONS, max_new_tokens=20)  # the same programs: EOS is an input
    assert texts == [tok.decode([t for t in r if t != 50256]).strip() for r in free]
    assert generate(model, tok, INSTRUCTIONS[2], max_new_tokens=20) == texts[2] and generate(model, tok, []) == []


def test_batches_compile_a_handful_of_programs(hf_dir):
    from jaxtune.generate import _decode_steps, _start

    def programs():
        return _start._cache_size() + _decode_steps._cache_size()

    model, tok = load(str(hf_dir))
    prompts = [format_prompt("word " * n) for n in range(1, 12)]  # 11 prompts of 8 to 18 tokens
    before = programs()
    # longest first: 18, 17, 16, 15 (padded to 32), then 14 to 11 and 10 to 8 (16, the last 3 rows run as 4)
    progress = []
    answers = generate_ids(model, tok, prompts, max_new_tokens=6, batch_size=4,
                           on_progress=lambda done, total: progress.append((done, total)))
    assert programs() - before == 2 * 2 and [len(a) for a in answers] == [6] * 11
    assert progress == [(4, 11), (8, 11), (11, 11)]
    generate_ids(model, tok, prompts[:2], max_new_tokens=6, batch_size=4)  # 2 rows: a new batch size
    generate_ids(model, tok, prompts[3:6], max_new_tokens=6, batch_size=4)  # 3 rows of 16: run as 4, no new program
    assert programs() - before == 3 * 2


def test_batch_rows_and_limits_are_checked(hf_dir):
    model, tok = load(str(hf_dir))  # n_positions = 64
    with pytest.raises(ValueError, match="instruction 2 of 3 is empty"):
        generate(model, tok, ["Hi", " ", "Hello"])
    with pytest.raises(ValueError, match="prompt 2 of 2 is .* tokens; this model reads at most 64"):
        generate(model, tok, ["Hi", "word " * 80])
    with pytest.raises(ValueError, match="batch_size=0"):
        generate(model, tok, ["Hi"], batch_size=0)
    long, short = format_prompt("word " * 50), format_prompt("Hi")
    ids = generate_ids(model, tok, [long, short], max_new_tokens=100)
    assert len(ids[0]) == 64 - len(tok(long).input_ids) and len(ids[1]) == 64 - len(tok(short).input_ids)


# ---------------------------------------------------------------------------------------------- sampling
SETTINGS = [(0.7, 0, 1.0), (1.8, 0, 1.0), (1.0, 5, 1.0), (0.5, 40, 1.0), (1.0, 0, 0.9), (0.6, 0, 0.5),
            (1.4, 50, 0.8), (1.0, 2, 0.3)]


def transformers_probs(logits, temperature, top_k, top_p):
    """The next-token distribution transformers' generate samples from (its warpers, in its order)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList(
        ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        + ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
    return torch.softmax(warpers(None, torch.tensor(logits)), dim=-1).numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filtered_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    import jax
    import numpy as np

    from jaxtune.generate import filtered_logits

    logits = np.random.default_rng(0).normal(0, 3, (4, 2000)).astype(np.float32)
    ref = transformers_probs(logits, temperature, top_k, top_p)
    ours = np.asarray(jax.nn.softmax(filtered_logits(logits, temperature, top_k, top_p), axis=-1))
    assert ((ours > 0) == (ref > 0)).all()  # the same tokens are kept
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-4)
    if top_k or top_p < 1.0:
        assert (ref == 0).any()  # the filters did remove tokens here


def test_extreme_temperatures_sample_their_limits(varied, tokenizer):
    """A temperature near 0 samples what greedy decoding picks (it drew from NaNs: '$\"\"\"'), and one beyond float32
    samples uniformly, without numpy's overflow warning reaching the user."""
    import warnings

    import jax
    import numpy as np

    from jaxtune.generate import filtered_logits

    model, _ = varied
    prompts = [format_prompt(i) for i in INSTRUCTIONS[:3]]
    greedy = generate_ids(model, tokenizer, prompts, max_new_tokens=8)
    for t in (1e-45, 1e-30):
        assert generate_ids(model, tokenizer, prompts, max_new_tokens=8, temperature=t, seed=3) == greedy
    logits = np.random.default_rng(0).normal(0, 3, (2, 50)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_ids(model, tokenizer, prompts[:1], max_new_tokens=2, temperature=1e308)
    flat = np.asarray(jax.nn.softmax(filtered_logits(logits, np.float32(3e38), 0, 1.0), axis=-1))
    np.testing.assert_allclose(flat, 1 / 50, rtol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.4, 6, 0.8)])
def test_sampled_tokens_follow_the_filtered_distribution(temperature, top_k, top_p):
    """Draws as generation makes them (a row each, keys from the seed and the row) have the reference's frequencies."""
    import numpy as np

    from jaxtune.generate import _next_tokens, _row_keys, _sampling

    logits = np.random.default_rng(1).normal(0, 1.5, (1, 12)).astype(np.float32)
    n = 20000
    values, flags, seed = _sampling(temperature, top_k, top_p, 7)
    tokens = np.asarray(_next_tokens(np.repeat(logits, n, 0), _row_keys(seed, np.arange(n)), 3, values, flags))
    expected = transformers_probs(logits, temperature, top_k, top_p)[0]
    np.testing.assert_allclose(np.bincount(tokens, minlength=12) / n, expected, atol=0.012)


def test_sampled_answers_stay_in_the_filter_and_do_not_depend_on_the_batch(varied, tokenizer):
    """Every sampled token is among the top 3 of transformers' logits at its position (the filter sees each row's
    own logits under left padding), and an answer is the same alone, in batches of 2 or in one batch."""
    import numpy as np

    (model, torch_model), tok = varied, tokenizer
    prompts = [format_prompt(i) for i in INSTRUCTIONS]
    kw = dict(max_new_tokens=10, temperature=1.5, top_k=3, seed=11)
    batched = generate_ids(model, tok, prompts, **kw)
    assert batched == generate_ids(model, tok, prompts, batch_size=2, **kw)
    assert generate_ids(model, tok, prompts[0], **kw) == batched[0]
    greedy = generate_ids(model, tok, prompts, max_new_tokens=10)
    assert batched != greedy
    for p, answer in zip(prompts, batched):
        ids = tok(p).input_ids
        logits = torch_logits(torch_model, [ids + answer])[0]
        top3 = np.argsort(-logits, axis=-1)[:, :3]
        assert all(t in top3[len(ids) - 1 + j] for j, t in enumerate(answer))
    text = generate(model, tok, INSTRUCTIONS[0], **kw)
    assert list(stream(model, tok, INSTRUCTIONS[0], **kw))[-1] == text


def test_a_batch_key_value_cache_stays_under_its_budget():
    from types import SimpleNamespace

    from jaxtune.config import PRESETS
    from jaxtune.generate import _CACHE_BYTES, _cache_rows

    gpt2 = SimpleNamespace(config=PRESETS["gpt2"])  # 12 layers x 768: 73,728 bytes of float32 keys and values a slot
    assert _cache_rows(gpt2, 32, 64, 64) == 64  # 96 slots a row: 453 MB for 64 rows
    assert _cache_rows(gpt2, 1024, 64, 64) == 8  # 1,088 slots a row: 8 rows = 642 MB, 16 would pass 1 GiB
    assert _cache_rows(gpt2, 1024, 64, 64, itemsize=2) == 16  # bfloat16 halves a row
    rows = _cache_rows(gpt2, 1024, 1024, 64)
    assert rows * 2 * 12 * 2048 * 768 * 4 <= _CACHE_BYTES < 2 * rows * 2 * 12 * 2048 * 768 * 4
