"""Generation against transformers' generate; streaming, sampling and prompt limits."""

import pytest
import torch

from jaxtune import generate, load, stream
from jaxtune.data import format_prompt
from jaxtune.generate import generate_ids


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
    ids = generate_ids(model, tok, format_prompt("word " * 50), max_new_tokens=100)
    assert 0 < len(ids) <= 64 - len(tok(format_prompt("word " * 50)).input_ids)
