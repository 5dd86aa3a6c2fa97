"""The loss and the train step against PyTorch; training a tiny model until it answers and stops."""

import dataclasses
import gc
import importlib
import math
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxtune import CustomerServiceTuner, Pair, TrainConfig, Trainer, generate, load, read_pairs
from jaxtune.checkpoint import hf_name
from jaxtune.config import GPT2Config
from jaxtune.data import (REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES, collate, collate_packed, encode, format_prompt,
                          pack_rows, reference_batch)
from jaxtune.generate import generate_ids
from jaxtune.model import build, num_params
from jaxtune.train import batch_loss, make_schedule, plan_step_memory, summed_loss

jaxtune_train = importlib.import_module("jaxtune.train")  # the module (jaxtune.train is also the function)


def reference_loss_and_grads(torch_model, tokenizer):
    """The reference's step, verbatim: model(**enc, labels=enc.input_ids)."""
    texts = [f"Instruction: {i}\nResponse: {r}" for i, r in zip(REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
    torch_model.zero_grad()
    loss = torch_model(**enc, labels=enc.input_ids).loss
    loss.backward()
    grads = {n.removeprefix("transformer."): p.grad.numpy().copy() for n, p in torch_model.named_parameters()}
    return loss.item(), grads


def test_reference_loss_and_gradients_match_pytorch(hf_dir, torch_model, tokenizer):
    ref_loss, ref_grads = reference_loss_and_grads(torch_model, tokenizer)
    model, tok = load(str(hf_dir))
    batch = {k: jnp.asarray(v) for k, v in reference_batch(tok, REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES).items()}
    batch["loss_mask"] = jnp.ones_like(batch["input_ids"])
    graphdef, params = nnx.split(model)

    def loss_fn(p):
        return batch_loss(nnx.merge(graphdef, p), batch, use_attention_mask=True)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert abs(float(loss) - ref_loss) < 1e-5
    ours = {hf_name(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    assert set(ours) == set(ref_grads)
    for name, g in ref_grads.items():
        assert np.abs(ours[name] - g).max() < 1e-5 * max(1.0, np.abs(g).max()), name


def test_customer_service_tuner_prints_the_reference_loss(hf_dir, torch_model, tokenizer, capsys):
    ref_loss, _ = reference_loss_and_grads(torch_model, tokenizer)
    tuner = CustomerServiceTuner(str(hf_dir))
    tuner.simulate_tune(REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES)
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("Loss: ") and abs(float(printed.split()[1]) - ref_loss) < 1e-5
    assert tuner.preprocess(REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES)["input_ids"].shape == (2, 17)


def test_trainer_reference_mode_reports_the_reference_loss(hf_dir, torch_model, tokenizer):
    """Bucketed padding (to 32, not 17) still reproduces the reference's loss on the first step."""
    ref_loss, _ = reference_loss_and_grads(torch_model, tokenizer)
    model, tok = load(str(hf_dir))
    pairs = [Pair(i, r) for i, r in zip(REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES)]
    cfg = TrainConfig(epochs=1, batch_size=2, loss_on="reference", dropout=False, max_length=64, buckets=(32, 64))
    result = Trainer(model, tok, pairs, cfg).run()
    assert abs(result.history[0].loss - ref_loss) < 1e-5


def test_one_step_matches_pytorch_adamw(hf_dir, tokenizer):
    """The optimizer update equals torch.optim.AdamW's (no warmup, no clipping, no decay)."""
    import transformers

    pt = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    opt = torch.optim.AdamW(pt.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    reference_loss_and_grads(pt, tokenizer)
    opt.step()
    model, tok = load(str(hf_dir))
    pairs = [Pair(i, r) for i, r in zip(REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES)]
    cfg = TrainConfig(epochs=1, batch_size=2, loss_on="reference", dropout=False, max_length=64, warmup_steps=0,
                      learning_rate=1e-3, weight_decay=0.0, grad_clip=1e9)
    Trainer(model, tok, pairs, cfg).run()
    w_pt = pt.transformer.h[0].attn.c_attn.weight.detach().numpy()
    w_ours = np.asarray(model.h[0].attn.c_attn.kernel.get_value())
    w_before = np.asarray(load(str(hf_dir))[0].h[0].attn.c_attn.kernel.get_value())
    assert np.abs(w_ours - w_before).mean() > 5e-4  # the step moved the weights by about lr
    assert np.abs(w_ours - w_pt).max() < 5e-6  # and exactly as torch did (Adam's first step is ~lr * sign(g))


QA = [Pair(f"What is the status of order {n}?", f"Order {n} shipped on Monday and arrives in {n % 5 + 2} days.")
      for n in range(100, 124)] + [
    Pair("How do I reset my password?", "Click Forgot password on the sign-in page and follow the email link."),
    Pair("Can I return shoes?", "Yes, within 30 days, unworn, with the receipt."),
]


@pytest.fixture(scope="module")
def trained():
    model = build(GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4), seed=0)
    tok = load("tiny")[1]
    cfg = TrainConfig(epochs=40, batch_size=8, learning_rate=3e-3, warmup_steps=10, max_length=64, dropout=False,
                      buckets=(16, 32, 64))
    trainer = Trainer(model, tok, QA, cfg)
    steps = []
    result = trainer.run(on_step=steps.append)
    return model, tok, trainer, result, steps


def test_training_drives_the_response_loss_down(trained):
    _, _, _, result, steps = trained
    assert result.stopped is None and result.steps == len(steps) == 160
    assert steps[0].loss > 9.0 and np.mean([s.loss for s in steps[-8:]]) < 0.6
    assert all(s.tokens > 0 and s.tokens_per_sec > 0 and np.isfinite(s.grad_norm) for s in steps)
    assert steps[0].learning_rate < steps[9].learning_rate  # warmup
    # reported from the device (no host-side schedule call queued behind the next step): step n used schedule(n - 1)
    schedule = make_schedule(trained[2].cfg, len(steps))
    np.testing.assert_allclose([s.learning_rate for s in steps], [float(schedule(n)) for n in range(len(steps))],
                               rtol=1e-6)


def test_the_eta_leaves_out_the_first_steps_wait_for_the_compiler(trained):
    """The ETA is the pace of the last 10 steps times the steps left; the first step's time is mostly compiling, so
    it is left out once another step is timed (the app's first ETAs said 13 minutes for runs of about one)."""
    steps = trained[4]
    times = np.diff([s.elapsed for s in steps])  # steps 2, 3, ...: each one's time
    for k in (2, 5, 11, 40):
        assert steps[k - 1].eta == pytest.approx(times[:k - 1][-10:].mean() * (len(steps) - k), rel=1e-6, abs=1e-9)


def test_bucketing_compiles_a_handful_of_programs(trained):
    _, _, trainer, result, _ = trained
    assert 1 <= result.compiled_programs <= 3  # lengths 16/32/64 over 40 epochs of mixed lengths


def test_tuned_model_answers_and_stops(trained):
    model, tok, _, _, _ = trained
    for pair in (QA[-1], QA[-2]):
        assert generate(model, tok, pair.instruction, max_new_tokens=40) == pair.response
    for pair in QA[:4]:  # order numbers are hard for a 2-layer model; the shape and the stop are not
        ids = generate_ids(model, tok, format_prompt(pair.instruction), max_new_tokens=40)
        assert ids[-1] == tok.eos_token_id and len(ids) < 40
        assert tok.decode(ids[:-1]).strip().startswith("Order 1") and tok.decode(ids).endswith("days.<|endoftext|>")


def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(hf_dir):
    """Examples packed into rows of 64 (segment ids, restarted positions, logits only at the targets) against each
    example alone: the summed loss, the target count and every gradient agree, so packing changes the cost, not the
    training."""
    model, tok = load(str(hf_dir))
    graphdef, params = nnx.split(model)
    cfg = TrainConfig(max_length=64, dropout=False)
    pairs = [QA[0], QA[-1], QA[-2], Pair("Hi", "Hello!"), Pair("Provide price", "The price is $99.")]
    examples = [encode(tok, p.instruction, p.response, max_length=64) for p in pairs]
    rows = [[examples[i] for i in row] for row in pack_rows([len(e.input_ids) for e in examples], 64)]
    assert len(rows) == 2 and max(len(row) for row in rows) >= 3
    grad = jax.jit(jax.value_and_grad(lambda p, b: summed_loss(graphdef, p, b, cfg), has_aux=True))

    (packed_total, packed_count), packed_grads = grad(params, collate_packed(rows, 2, 64, tok.eos_token_id, targets=48))
    # each example alone in a row of its own (right-padded to 64, which a causal model's real tokens never see)
    alone = [grad(params, collate([e], 1, 64, tok.eos_token_id)) for e in examples]
    assert float(packed_count) == sum(float(c) for (_, c), _ in alone) == sum(int(e.loss_mask.sum()) for e in examples)
    np.testing.assert_allclose(float(packed_total), sum(float(t) for (t, _), _ in alone), rtol=1e-5)
    summed_grads = jax.tree.map(lambda *g: sum(g), *[g for _, g in alone])
    for (path, a), (_, b) in zip(nnx.to_flat_state(packed_grads), nnx.to_flat_state(summed_grads)):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max()), path


def test_packed_training_learns_with_one_program_and_little_padding():
    model, tok = build(GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4), seed=0), load("tiny")[1]
    cfg = TrainConfig(epochs=40, batch_size=2, learning_rate=3e-3, warmup_steps=5, max_length=128, dropout=False,
                      pack=True)
    trainer = Trainer(model, tok, QA, cfg)
    assert trainer.total_steps < 40 * len(QA) / 2 / 3  # three or more examples a row: a third of the steps
    shapes = {k: v.shape for k, v in next(trainer._batches())[1].items()}
    assert shapes["input_ids"] == (1, 2, 128) and shapes["logit_positions"] == (1, 2, trainer.targets)
    assert trainer.targets < 128  # the head runs at the target positions only, not at every position
    programs = {}
    result = trainer.run(on_step=lambda s: programs.setdefault(s.epoch, trainer.compiled_programs()))
    assert result.compiled_programs == programs[1] == 1  # one shape, never recompiled after the first epoch
    real = sum(len(e.input_ids) for e in trainer.examples)
    assert (result.tokens, result.positions) == (40 * real, result.steps * 2 * 128)  # the real-token share's parts
    assert result.history[0].loss > 9.0 and np.mean([s.loss for s in result.history[-5:]]) < 1.0
    assert generate(model, tok, QA[-1].instruction, max_new_tokens=40) == QA[-1].response  # and it stops


def test_stop_between_steps_keeps_progress():
    model, tok = load("tiny")
    before = np.asarray(model.wte.embedding.get_value()).copy()
    calls = []
    result = Trainer(model, tok, QA, TrainConfig(epochs=5, batch_size=4, max_length=64)).run(
        on_step=calls.append, should_stop=lambda: len(calls) >= 2)
    assert result.steps == 3 and "stopped by request" in result.stopped  # step 3 was in flight when asked
    assert np.abs(np.asarray(model.wte.embedding.get_value()) - before).max() > 0


def test_gradient_accumulation_weights_tokens_equally():
    """Two micro-batches of 2 give the same update as one batch of 4 (token-weighted, not batch-averaged)."""
    tok = load("tiny")[1]
    pairs = [QA[0], QA[-1], QA[-2], Pair("Hi", "Hello, how can I help you today with your order?")]
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model = build(GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0)
        cfg = TrainConfig(epochs=1, batch_size=batch_size, grad_accum=accum, dropout=False, max_length=64,
                          warmup_steps=0, learning_rate=1e-2, buckets=(64,))
        trainer = Trainer(model, tok, pairs, cfg)
        results.append((trainer.run(), np.asarray(model.h[0].mlp.c_fc.kernel.get_value())))
    (r1, w1), (r2, w2) = results
    assert r1.steps == r2.steps == 1
    assert abs(r1.history[0].loss - r2.history[0].loss) < 1e-5
    np.testing.assert_allclose(w1, w2, atol=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_finite_weights():
    """A rate of 1e30 makes the weights huge after step 1 and the loss non-finite soon after. The steps dispatched
    after the first non-finite one change nothing either, so the model holds exactly the last finite step's weights:
    those of the same run stopped (max_steps) just before it."""
    cfg = dict(epochs=1, batch_size=2, max_length=64, learning_rate=1e30, warmup_steps=0, grad_clip=1e38, dropout=False)
    model, tok = load("tiny")
    result = Trainer(model, tok, QA, TrainConfig(**cfg)).run()
    assert result.diverged and result.stopped.startswith("training diverged at step")
    bad = int(result.stopped.split("step ")[1].split(":")[0])
    assert 1 < bad < len(QA) // 2 and result.steps == bad - 1 and len(result.history) == bad - 1
    assert f"keeps the weights of step {bad - 1}" in result.stopped
    weights = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}
    assert all(np.isfinite(w).all() for w in weights.values())
    last_good, _ = load("tiny")
    Trainer(last_good, tok, QA, TrainConfig(**cfg, max_steps=bad - 1)).run()
    for k, v in nnx.to_flat_state(nnx.state(last_good)):
        np.testing.assert_array_equal(weights[k], np.asarray(v.get_value()), err_msg=str(k))


def test_non_finite_learning_rate_is_refused():
    for rate in (float("nan"), float("inf"), 0.0, -1e-3):
        with pytest.raises(ValueError, match="learning_rate=.* must be a finite number above 0"):
            TrainConfig(learning_rate=rate)


def test_epochs_are_planned_lazily():
    """10**5 epochs (the most allowed) of 32 pairs: counted, not planned, so setting up takes no time or memory."""
    model, tok = load("tiny")
    trainer = Trainer(model, tok, QA, TrainConfig(epochs=100_000, batch_size=4, max_length=64))
    assert trainer.total_steps == 100_000 * math.ceil(len(QA) / 4) and len(trainer._plans) <= 2
    packed = Trainer(model, tok, QA, TrainConfig(epochs=100_000, batch_size=2, max_length=64, pack=True, max_steps=7))
    assert packed.total_steps == 7 and len(packed._plans) <= 2 and packed.cut_by_max_steps
    assert not trainer.cut_by_max_steps
    for epochs, max_steps, cut in ((3, 21, False), (3, 22, False), (3, 20, True), (3, 14, True), (1, 7, False)):
        t = Trainer(model, tok, QA, TrainConfig(epochs=epochs, batch_size=4, max_length=64, max_steps=max_steps))
        assert t.cut_by_max_steps is cut, (epochs, max_steps)  # 7 steps an epoch: what the card says of max steps
    with pytest.raises(ValueError, match="epochs=1,000,000,000 is out of range"):
        TrainConfig(epochs=10**9)


def _dot_dtypes(closed_jaxpr) -> list[tuple[str, ...]]:
    """The input dtypes of every matrix multiply in a jaxpr, nested calls included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_matrix_multiply_runs_in_the_compute_dtype(dtype):
    """Forward and backward, with dropout and packing: no product is silently upcast (nnx.Embed's call, for one,
    casts a bfloat16 table back to float32, which made every later product float32)."""
    model = build(GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4), seed=0)
    trainer = Trainer(model, load("tiny")[1], QA, TrainConfig(batch_size=2, max_length=64, pack=True, dtype=dtype))
    batch = next(trainer._batches())[1]
    jaxpr = jax.make_jaxpr(trainer._step)(trainer.params, trainer.opt_state, batch, jax.random.key(0), jnp.asarray(True))
    dots = _dot_dtypes(jaxpr)
    assert len(dots) > 2 * 6 * 3 and set(dots) == {(dtype, dtype)}  # 6 products a layer, forward and backward


def test_bfloat16_training_still_learns():
    model = build(GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4), seed=0)
    tok = load("tiny")[1]
    cfg = TrainConfig(epochs=10, batch_size=8, learning_rate=3e-3, max_length=64, dtype="bfloat16", dropout=False)
    result = Trainer(model, tok, QA, cfg).run()
    assert result.history[0].loss - result.history[-1].loss > 3.0
    assert model.wte.embedding.get_value().dtype == jnp.float32  # float32 master weights


def test_stopped_and_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    """Stop at step 6, checkpoint, restore into a fresh trainer: every later loss equals the uninterrupted run's
    (dropout on, so the RNG key and the data order are restored too)."""
    tok = load("tiny")[1]
    pairs = [Pair(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(5) for b in range(4)]
    cfg = TrainConfig(epochs=3, batch_size=4, learning_rate=3e-3, max_length=32, seed=3)

    def fresh():
        return Trainer(build(GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0), tok, pairs, cfg,
                       validation_pairs=pairs[:4])

    full = [s.loss for s in fresh().run().history]
    first = fresh()
    before = first.run(should_stop=lambda: first.step >= 6).history
    assert [s.step for s in before] == list(range(1, 7))
    first.save_checkpoint(tmp_path / "ck", history=before)
    second = fresh()
    restored = second.restore_checkpoint(tmp_path / "ck")
    assert second.step == 6 and [s.loss for s in restored] == [s.loss for s in before]
    result = second.run()
    after = result.history
    assert [s.step for s in after] == list(range(7, 16))
    assert [s.loss for s in before + after] == full
    # what the model card reports of the whole run: the validation loss before step 1, the training time of both parts
    assert result.initial_val_loss == first.initial_val_loss > 0
    assert second.elapsed_before == before[-1].elapsed and after[0].elapsed > before[-1].elapsed


def test_checkpoints_keep_the_last_k(tmp_path):
    tok = load("tiny")[1]
    trainer = Trainer(build(GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0), tok, QA,
                      TrainConfig(epochs=2, batch_size=4, max_length=64))
    trainer.run(save_every=2, checkpoint=lambda h: trainer.save_checkpoint(tmp_path, keep=2, history=h))
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [10, 12]
    with pytest.raises(Exception, match="no checkpoint"):
        trainer.restore_checkpoint(tmp_path / "empty")


def test_memory_plan_counts_the_state_and_grows_with_the_batch():
    """plan_step_memory compiles the step on abstract shapes: its arguments are exactly the float32 parameters, the
    two AdamW moments, the optimizer's step counters and the batch; its temporaries grow with the batch."""
    config = GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4)
    n = num_params(build(config))
    plans = [plan_step_memory(config, TrainConfig(batch_size=b, max_length=64, pack=True)) for b in (2, 8)]
    for b, plan in zip((2, 8), plans):
        batch_bytes = 4 * b * 64 * 5 + 4 * b * 64 * 3  # five [b, 64] int32 arrays and three of logit positions
        assert 3 * 4 * n + batch_bytes <= plan["arguments"] <= 3 * 4 * n + batch_bytes + 64  # + step counters, key
        assert 3 * 4 * n <= plan["aliased"] <= plan["outputs"] < plan["aliased"] + 1024  # donated state in place, metrics
        assert plan["peak"] == plan["arguments"] + plan["outputs"] + plan["temporaries"] - plan["aliased"]
    assert plans[1]["temporaries"] > 2 * plans[0]["temporaries"]


@pytest.mark.parametrize("pack", [False, True])
def test_bfloat16_loss_and_every_gradient_track_float32(pack):
    """The bf16 step's loss and each parameter's gradient, against float32 on the same weights and batch. bf16 keeps
    8 bits of mantissa (relative rounding ~0.4% per operation), so a gradient may differ by a few percent in norm but
    must point the same way: cosine > 0.99 and a norm within 5% on every leaf. A backward pass that dropped an
    input gradient (leaving only the tied embedding to learn) fails on every other leaf."""
    model, tok = load("tiny")
    cfg32 = TrainConfig(batch_size=4, max_length=64, dropout=False, pack=pack)
    trainer = Trainer(model, tok, QA, cfg32)
    batch = next(iter(trainer._batches()))[1]
    batch = jax.tree.map(lambda a: jnp.asarray(a[0]), batch)
    graphdef, params = nnx.split(model)

    def grads(dtype):
        cfg = TrainConfig(batch_size=4, max_length=64, dropout=False, pack=pack, dtype=dtype)
        fn = lambda p: summed_loss(graphdef, p, batch, cfg)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(fn))(params)  # compiled, as the train step is

    (l32, g32), (l16, g16) = grads("float32"), grads("bfloat16")
    assert abs(float(l16) - float(l32)) < 0.01 * abs(float(l32))
    for (path, a), (_, b) in zip(nnx.to_flat_state(g32), nnx.to_flat_state(g16)):
        a, b = np.asarray(a.get_value(), np.float64).ravel(), np.asarray(b.get_value(), np.float64).ravel()
        if not np.any(a):
            continue  # e.g. position rows no token reached
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
        assert cosine > 0.99 and abs(np.linalg.norm(b) / np.linalg.norm(a) - 1) < 0.05, (path, cosine)


def test_bfloat16_loss_and_every_gradient_track_pytorch_autocast(hf_dir, torch_model, tokenizer):
    """The bf16 step against PyTorch's bf16 autocast on the same weights and batch (the reference's loss). Both
    round every product's inputs to bf16, in different places, so they are held to the float32 test's bounds:
    loss within 1%, and every gradient with cosine > 0.99 and a norm within 5%. PyTorch autocast against PyTorch
    float32 stays inside the same bounds, so they are not loose enough to pass a wrong gradient."""
    texts = [f"Instruction: {i}\nResponse: {r}" for i, r in zip(REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)

    def torch_grads(autocast):
        torch_model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch_model(**enc, labels=enc.input_ids).loss
        loss.backward()
        return loss.item(), {n.removeprefix("transformer."): p.grad.numpy().astype(np.float64).ravel()
                             for n, p in torch_model.named_parameters()}

    model, tok = load(str(hf_dir))
    batch = {k: jnp.asarray(v) for k, v in reference_batch(tok, REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES).items()}
    batch["loss_mask"] = jnp.ones_like(batch["input_ids"])
    graphdef, params = nnx.split(model)
    cfg = TrainConfig(max_length=64, dropout=False, loss_on="reference", dtype="bfloat16")

    def mean_loss(p):
        total, count = summed_loss(graphdef, p, batch, cfg)
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    ours = {hf_name(path): np.asarray(v.get_value(), np.float64).ravel() for path, v in nnx.to_flat_state(grads)}

    def close(a_loss, a, b_loss, b):
        assert abs(a_loss - b_loss) < 0.01 * abs(b_loss)
        for name in b:
            cosine = a[name] @ b[name] / (np.linalg.norm(a[name]) * np.linalg.norm(b[name]) + 1e-30)
            assert cosine > 0.99 and abs(np.linalg.norm(a[name]) / np.linalg.norm(b[name]) - 1) < 0.05, (name, cosine)

    (auto_loss, auto), (f32_loss, f32) = torch_grads(True), torch_grads(False)
    assert set(ours) == set(auto)
    close(float(loss), ours, auto_loss, auto)
    close(auto_loss, auto, f32_loss, f32)


def test_remat_recomputes_each_block_and_changes_nothing_else():
    """--remat keeps only each block's input for the backward pass: the loss and every gradient are those of the
    plain step, for full fine-tuning and for QLoRA, and XLA's memory plan of a LoRA step shrinks on this CPU (with
    jax.checkpoint it did not: XLA's CPU compiler merged the recomputation back into the forward pass)."""
    model, tok = load("tiny")
    batch = None
    results = {}
    for remat, extra in ((False, {}), (True, {}), (False, dict(lora_rank=4, quantize="nf4")),
                         (True, dict(lora_rank=4, quantize="nf4"))):
        trainer = Trainer(nnx.clone(model), tok, QA, TrainConfig(batch_size=4, max_length=64, remat=remat, **extra))
        batch = batch or next(iter(trainer._batches()))[1]
        args = (trainer.params, trainer.opt_state, batch, jax.random.key(0), jnp.asarray(True), trainer.frozen)
        params, _, metrics = trainer._step(*args)
        results[remat, bool(extra)] = (float(metrics["loss"]), jax.tree.leaves(params))
    for lora in (False, True):
        assert results[True, lora][0] == pytest.approx(results[False, lora][0], rel=1e-6)
        for a, b in zip(results[False, lora][1], results[True, lora][1]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    config = dataclasses.replace(model.config, n_layer=6, n_embd=256, n_head=4, vocab_size=512)
    plans = [plan_step_memory(config, TrainConfig(batch_size=2, max_length=256, buckets=(256,), lora_rank=8,
                                                  dropout=False, remat=remat))["temporaries"] for remat in (False, True)]
    assert plans[1] < 0.6 * plans[0], plans


def test_the_compiled_step_does_not_depend_on_the_rate_or_the_run_length():
    """The step takes its learning rate as an argument: runs that differ in rate, warmup and epochs lower to the same
    program, so the persistent compilation cache serves a second launch with other settings."""
    model, tok = load("tiny")
    texts = []
    for lr, warmup, epochs in ((3e-3, 0, 1), (5e-5, 7, 9)):
        cfg = TrainConfig(batch_size=4, max_length=64, learning_rate=lr, warmup_steps=warmup, epochs=epochs)
        jaxtune_train._STEPS.clear()  # each trainer traces its own step (not the one the process keeps: see below)
        trainer = Trainer(nnx.clone(model), tok, QA, cfg)
        texts.append(trainer.lower_step().as_text())
        assert trainer.learning_rate(0) == pytest.approx(float(trainer.schedule(0)))
    assert texts[0] == texts[1]


def test_a_trainer_on_the_same_model_and_settings_reuses_the_compiled_step():
    """The app's next Start: a Trainer built again on the same model structure and settings, with another rate, run
    length and seed, runs the step program the first one compiled (no tracing, no compiling, no cache load), and
    learns exactly what a trainer with a step of its own learns. A setting the step reads gives another step."""
    model, tok = load("tiny")
    base = dict(batch_size=4, max_length=64, dropout=False, warmup_steps=0, buckets=(64,))
    first = Trainer(nnx.clone(model), tok, QA, TrainConfig(**base, learning_rate=3e-3, epochs=1))
    first.run()
    programs = first._step._cache_size()
    cfg = TrainConfig(**{**base, "warmup_steps": 3}, learning_rate=1e-3, epochs=2, seed=5)
    runs = []
    for fresh in (False, True):
        if fresh:
            jaxtune_train._STEPS.clear()
        trainer = Trainer(m := nnx.clone(model), tok, QA, cfg)
        assert (trainer._step is first._step) == (not fresh) and (trainer._eval is first._eval) == (not fresh)
        result = trainer.run()
        assert result.compiled_programs == 1 and result.steps == 2 * math.ceil(len(QA) / 4)
        runs.append(([s.loss for s in result.history], _model_arrays(m)))
    assert first._step._cache_size() == programs  # the second run added no program: it ran the first one's
    assert runs[0][0] == runs[1][0]  # the same losses, bit for bit, and the same weights
    for path, value in runs[0][1].items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(runs[1][1][path]), err_msg=str(path))
    reused = Trainer(nnx.clone(model), tok, QA, cfg)._step
    for other in (dict(dropout=True), dict(dtype="bfloat16"), dict(loss_on="all"), dict(grad_clip=0.5)):
        assert Trainer(nnx.clone(model), tok, QA, dataclasses.replace(cfg, **other))._step is not reused, other


def test_the_garbage_collector_waits_while_a_new_program_is_traced():
    """Tracing a step sets off Python's cyclic collections, each walking every live object: the trainer pauses the
    collector while jit traces a new program (train and validation steps) and turns it back on after."""
    model, tok = load("tiny")
    seen, active = [], [True]

    def on_duration(event, secs, **kw):
        if active[0] and event == "/jax/core/compile/jaxpr_trace_duration" and kw.get("fun_name") in ("step", "evaluate"):
            seen.append((kw["fun_name"], gc.isenabled()))

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        cfg = TrainConfig(batch_size=3, max_length=40, dropout=False, warmup_steps=0, epochs=1, buckets=(40,),
                          grad_clip=0.7)  # settings no other test uses: a step of its own, traced here
        result = Trainer(model, tok, QA[:6], cfg, validation_pairs=QA[6:9]).run()
    finally:
        active[0] = False
    assert result.steps == 2 and result.initial_val_loss is not None
    assert sorted(seen) == [("evaluate", False), ("step", False)]  # each traced once, with the collector off
    assert gc.isenabled()


def _model_arrays(model) -> dict:
    return {path: node.get_value() for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Variable)}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_an_offloaded_model_waits_in_host_memory_and_returns_with_what_it_learned(hf_dir, method):
    """On a GPU or TPU the trainer's copies are the only weights on the device during a run (`offload_model`; forced
    on here, on a CPU, where jax's live arrays stand for the device's memory). While it trains, no jax array holds
    the model's own weights: the device holds exactly their size less than without offloading. The run learns
    exactly what a run without offloading learns, and afterwards the model holds it on the device again, a LoRA base
    bit for bit as it was; the trainer's frozen base is built again when asked."""
    import gc

    extra = {"full": {}, "lora": dict(lora_rank=4, dtype="bfloat16"),
             "qlora": dict(lora_rank=4, quantize="nf4", dtype="bfloat16")}[method]
    cfg = TrainConfig(epochs=2, batch_size=4, max_length=48, learning_rate=1e-2, dropout=False, **extra)
    pairs = [Pair(f"Where is order {n}?", f"Order {n} is on its way.") for n in range(16)]
    runs = {}
    for offload in (False, True):
        gc.collect()
        model, tok = load(str(hf_dir))
        trainer = Trainer(model, tok, pairs, cfg, offload_model=offload)
        assert trainer.offloaded == offload
        before = {k: np.array(v) for k, v in _model_arrays(model).items()}
        frozen_before = jax.tree.map(np.array, trainer.frozen)
        model_bytes = sum(v.nbytes for v in before.values())
        live, held = [], []

        def on_step(s):
            live.append(sum(a.nbytes for a in jax.live_arrays()))
            held.append({type(v).__name__ for v in _model_arrays(model).values()})

        result = trainer.run(on_step=on_step)
        after = _model_arrays(model)
        assert all(isinstance(v, jax.Array) for v in after.values())  # back on the device
        assert held == [{"ndarray"} if offload else {"ArrayImpl"}] * len(held)
        runs[offload] = dict(live=max(live), bytes=model_bytes, losses=[h.loss for h in result.history],
                             after={k: np.array(v) for k, v in after.items()}, before=before)  # copies: a view keeps a buffer
        if method != "full":
            base = [k for k in before if "lora_" not in str(k)]
            assert all(np.array_equal(before[k], runs[offload]["after"][k]) for k in base)
            jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trainer.frozen), frozen_before)
        del model, trainer, result, after
    kept, offloaded = runs[False], runs[True]
    assert kept["losses"] == offloaded["losses"]
    for k in kept["after"]:
        np.testing.assert_array_equal(kept["after"][k], offloaded["after"][k])
    assert kept["live"] - offloaded["live"] == pytest.approx(offloaded["bytes"], rel=0.02)


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_a_model_loaded_into_host_memory_never_reaches_the_device_whole(hf_dir, monkeypatch, method):
    """`load(..., host=True)` (what the command line and the app do where the trainer offloads: GPU, TPU) builds the
    model in host memory, so the device never holds its float32 weights: QLoRA quantizes the base one projection at
    a time. Loaded onto the device, the same run held the whole model there while it quantized (a QLoRA gpt2-xl run
    peaked at the 5.8 GiB of its float32 weights). Both learn the same values, bit for bit, and end on the device."""
    import gc

    import jaxtune.quantize as quantize

    extra = dict(lora_rank=4, quantize="nf4", dtype="bfloat16") if method == "qlora" else {}
    cfg = TrainConfig(epochs=1, batch_size=4, max_length=48, learning_rate=1e-2, dropout=False, **extra)
    pairs = [Pair(f"Where is order {n}?", f"Order {n} is on its way.") for n in range(8)]
    original = quantize.quantize_array
    seen = []  # device bytes in use as projections are quantized (jax's live arrays stand for the device)

    def watched(kernel, kind):  # runs as jit traces it (the caches are cleared before each run)
        seen.append(sum(a.nbytes for a in jax.live_arrays()))
        return original(kernel, kind)

    monkeypatch.setattr(quantize, "quantize_array", watched)
    tiny, _ = load("tiny", host=True)  # the embedded model too (built, then copied to the host)
    assert {type(v).__name__ for v in _model_arrays(tiny).values()} == {"ndarray"}
    runs = {}
    for host in (False, True):
        gc.collect()
        jax.clear_caches()
        seen.clear()
        idle = sum(a.nbytes for a in jax.live_arrays())
        model, tok = load(str(hf_dir), host=host)
        arrays = _model_arrays(model)
        model_bytes = sum(v.nbytes for v in arrays.values())
        assert {type(v).__name__ for v in arrays.values()} == ({"ndarray"} if host else {"ArrayImpl"})
        loaded = sum(a.nbytes for a in jax.live_arrays()) - idle
        assert loaded == (0 if host else model_bytes)
        trainer = Trainer(model, tok, pairs, cfg, offload_model=True)
        if method == "qlora":
            assert len(seen) >= 2  # at least the first block's c_attn and c_proj, the LoRA targets
            peak = max(seen) - idle
            assert (peak < model_bytes / 2) if host else (peak >= model_bytes)
        result = trainer.run()
        after = _model_arrays(model)
        assert all(isinstance(v, jax.Array) for v in after.values())  # on the device once the run ends
        runs[host] = [h.loss for h in result.history], {k: np.array(v) for k, v in after.items()}
        del model, trainer, result, after, arrays
    assert runs[False][0] == runs[True][0]
    for k, v in runs[False][1].items():
        np.testing.assert_array_equal(v, runs[True][1][k], err_msg=str(k))


def test_an_offloaded_model_keeps_its_weights_when_the_run_fails(hf_dir):
    model, tok = load(str(hf_dir))
    trainer = Trainer(model, tok, [Pair("Hi?", "Hello.")] * 8, TrainConfig(epochs=1, batch_size=4, max_length=32),
                      offload_model=True)
    before = {k: np.array(v) for k, v in _model_arrays(model).items()}
    with pytest.raises(ZeroDivisionError):
        trainer.run(should_stop=lambda: 1 / 0)
    after = _model_arrays(model)
    assert all(isinstance(v, jax.Array) for v in after.values()) and not trainer.offloaded
    assert all(np.array_equal(before[k], np.asarray(after[k])) for k in before)


def test_early_stopping_ends_the_run_and_keeps_the_best_weights_through_a_resume(tmp_path):
    """Validation answers that contradict the training answers: the validation loss falls while the model learns
    the format, then rises as it learns the training answers. The run stops after 2 evaluations without a new
    lowest, its model holds the weights of the lowest (those of a run stopped at that step, bit for bit), and a
    checkpoint carries that best to a resume, which has nothing left to train. A run stopped by hand between two
    evaluations and resumed stops where the run left alone did; a run that diverges keeps the lowest's weights."""
    tok = load("tiny")[1]
    pairs = [Pair(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(5) for b in range(4)]
    wrong = [Pair(p.instruction, p.response.replace(" is ", " is not ")) for p in pairs[:4]]
    cfg = TrainConfig(epochs=20, batch_size=4, learning_rate=1e-2, max_length=32, seed=3, warmup_steps=2)

    def fresh():
        return Trainer(build(GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0), tok, pairs, cfg,
                       validation_pairs=wrong)

    trainer = fresh()
    result = trainer.run(eval_every=2, early_stopping=2, save_every=1000,
                         checkpoint=lambda h: None)
    vals = [(0, result.initial_val_loss)] + [(s.step, s.val_loss) for s in result.history if s.val_loss is not None]
    best_step, best = min(vals, key=lambda v: v[1])
    assert result.stopped and "had not fallen below" in result.stopped, vals
    assert result.steps < trainer.total_steps and vals[-1][0] == result.steps
    assert (result.best_step, result.best_val_loss) == (best_step, best) and 0 < best_step < result.steps
    assert [s for s, _ in vals][-3] == best_step  # stopped at the second evaluation after the lowest
    kept = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(trainer.model, nnx.Param))}
    other = fresh()
    other.run(should_stop=lambda: other.step >= best_step)
    assert other.step == best_step
    for k, v in nnx.to_flat_state(nnx.state(other.model, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(v), kept[k], err_msg=str(k))
    assert other.validation_loss() == pytest.approx(best, rel=1e-6)  # the weights kept are the lowest's
    trainer.save_checkpoint(tmp_path / "ck", history=result.history)  # the final state, and the best beside it
    resumed = fresh()
    resumed.restore_checkpoint(tmp_path / "ck")
    assert resumed.step == result.steps and resumed.best["step"] == best_step and resumed.best["since"] == 2
    for a, b in zip(jax.tree.leaves(resumed.best["params"]), jax.tree.leaves(trainer.best["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = resumed.run(eval_every=2, early_stopping=2)  # early stopping ended it: no step is left
    assert again.history == [] and again.stopped == result.stopped and again.best_step == best_step

    cut = fresh()  # stopped by hand one step after the lowest, between two evaluations, then resumed
    cut.run(eval_every=2, early_stopping=2, should_stop=lambda: cut.step >= best_step + 1,
            checkpoint=lambda h: None)
    assert cut.step == best_step + 1
    cut.save_checkpoint(tmp_path / "cut")
    went_on = fresh()
    went_on.restore_checkpoint(tmp_path / "cut")
    rest = went_on.run(eval_every=2, early_stopping=2)
    assert (rest.steps, rest.best_step, rest.stopped) == (result.steps, best_step, result.stopped)

    blown = Trainer(build(GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0), tok, pairs,
                    dataclasses.replace(cfg, learning_rate=1e6, warmup_steps=0), validation_pairs=wrong)
    start = [np.asarray(x) for x in jax.tree.leaves(nnx.state(blown.model, nnx.Param))]
    diverged = blown.run(eval_every=1, early_stopping=5)
    assert diverged.diverged and diverged.best_step == 0  # the update of step 1 already wrecked it (NaN loss)
    assert "The model keeps the weights of step 0, the lowest validation loss (early stopping)" in diverged.stopped
    for a, b in zip(start, jax.tree.leaves(nnx.state(blown.model, nnx.Param))):
        np.testing.assert_array_equal(a, np.asarray(b))
    with pytest.raises(jaxtune_train.TrainingError, match="holds no pairs out"):
        Trainer(build(GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0), tok, pairs, cfg
                ).run(early_stopping=2)


def test_a_command_line_run_early_stopping_ended_resumes_to_nothing_and_says_so(tmp_path):
    """`train --resume` of a run that early stopping ended (runs.execute, in this process): nothing trains, the log
    says to raise --early-stopping, and the model card records no resume (nothing was resumed)."""
    import json

    from jaxtune import RunConfig
    from jaxtune.checkpoint import save
    from jaxtune.runs import execute

    tok = load("tiny")[1]
    save(build(GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0), tok, tmp_path / "base")
    pairs = [{"instruction": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
             for a in range(5) for b in range(4)]
    wrong = [{**p, "response": p["response"].replace(" is ", " is not ")} for p in pairs[:4]]
    for name, rows in (("data", pairs), ("val", wrong)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig.from_dict(dict(
        model=str(tmp_path / "base"), data=str(tmp_path / "data.jsonl"), validation_data=str(tmp_path / "val.jsonl"),
        output=str(tmp_path / "run"), eval_every=2, early_stopping=2, save_every=1000, samples=0,
        train=dict(epochs=20, batch_size=4, learning_rate=1e-2, max_length=32, seed=3, warmup_steps=2)))
    first = execute(cfg, log=lambda m: None)
    assert first.result.stopped and "had not fallen below" in first.result.stopped
    again = execute(cfg, resume=tmp_path / "run", log=lambda m: None)
    assert again.result.history[-1].step == first.result.steps and again.result.best_step == first.result.best_step
    assert "no step left to run" in again.summary and "raise --early-stopping" in again.summary, again.summary
    card = (tmp_path / "run" / "README.md").read_text()
    assert "| resumed |" not in card and "was resumed" not in card, card


def test_pairs_given_in_python_are_checked_like_a_files_rows(tmp_path):
    """The Python API takes pairs as Pair objects, dicts or tuples (the same examples either way), and refuses what
    a data file's rows would be refused for, or a path or a text in place of the list, saying what to call."""
    from pathlib import Path

    from jaxtune.data import DataError, pairs_from_lists

    tok = load("tiny")[1]
    cfg = TrainConfig(max_steps=1, batch_size=2, max_length=32)
    model = build(GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0)
    as_objects = Trainer(model, tok, [Pair("Hi?", "Hello."), Pair("Bye?", "Goodbye.")], cfg).examples
    import pandas as pd

    frame = pd.DataFrame({"question": ["Hi?", "Bye?"], "answer": ["Hello.", "Goodbye."]})
    for given in ([{"instruction": "Hi?", "response": "Hello."}, ("Bye?", "Goodbye.")],
                  (p for p in [("Hi?", "Hello."), ["Bye?", "Goodbye."]]),
                  [{"prompt": "Hi?", "output": "Hello."}, {"instruction": "Bye?", "input": "", "response": "Goodbye."}],
                  frame, pairs_from_lists(frame["question"], frame["answer"])):  # a file's column names; a DataFrame
        examples = Trainer(model, tok, given, cfg).examples
        assert [e.input_ids.tolist() for e in examples] == [e.input_ids.tolist() for e in as_objects]
    refused = [([Pair("   ", "x")], r"pairs\[0\]: field 'instruction' is empty"),
               ([Pair("a", "")], r"pairs\[0\]: field 'response' is empty"),
               ([("a", "b"), Pair("a", 5)], r"pairs\[1\]: field 'response' must be text, got int"),
               ([{"instruction": "a"}], r"pairs\[0\]: no response key; expected one of response, .*rename yours "
                                        "to 'response'"),
               (["just a text"], r"pairs\[0\]: 'just a text' \(str\) is not a pair; give jaxtune.Pair"),
               (Path("data.jsonl"), r"not a list of pairs; read a file with jaxtune.read_pairs\(path\)"),
               ("data.jsonl", r"read a file with jaxtune.read_pairs")]
    for pairs, said in refused:
        with pytest.raises(DataError, match=said):
            Trainer(model, tok, pairs, cfg)
    with pytest.raises(jaxtune_train.TrainingError, match="no training pairs"):  # it was a ZeroDivisionError
        Trainer(model, tok, (p for p in []), cfg)
    joined = Trainer(model, tok, [{"instruction": "Hi?", "input": "ctx", "response": "Hello."}], cfg).examples[0]
    assert tok.decode(joined.input_ids).startswith("Instruction: Hi?\n\nctx\nResponse:")  # Alpaca's input, as in a file
    with pytest.raises(DataError, match="read_pairs: got DataFrame, not a path"):
        read_pairs(frame)
    for args, said in (((load("tiny"), frame), "got tuple and DataFrame; jaxtune.load returns both"),
                       ((tok, model, frame), "got GPT2Tokenizer and GPT2LMHeadModel")):  # unpacked; swapped
        with pytest.raises(TypeError, match="give the model, then its tokenizer.*" + said):
            jaxtune_train.train(*args, cfg)
    with pytest.raises(DataError, match=r"validation_pairs\[0\]: field 'response' is empty"):
        Trainer(model, tok, [("a", "b")], cfg, validation_pairs=[("c", " ")])
    with pytest.raises(TypeError, match=r"cfg: a dict; give a jaxtune.TrainConfig"):
        jaxtune_train.train(model, tok, [("a", "b")], {"epochs": 1})
    with pytest.raises(DataError, match="instructions: one text"):
        pairs_from_lists("ab", "cd")
    for bad, said in ((None, "give one text .* not NoneType"), (5, "not int"),
                      (["ok", 7], r"instruction 2 of 2 is not text: 7 \(int\)")):
        with pytest.raises(ValueError, match=said):
            generate(model, tok, bad, max_new_tokens=1)


def test_full_fine_tuning_refuses_a_model_that_carries_adapters():
    """A LoRA run leaves its adapters in the model: full fine-tuning it afterwards changed the base under them and
    `save` wrote the adapters alone, losing the full fine-tune. It is refused, saying what to do; the merged model
    trains."""
    from jaxtune.lora import has_lora, merge

    tok = load("tiny")[1]
    model = build(GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0)
    pairs = [Pair("Hi?", "Hello."), Pair("Bye?", "Goodbye.")]
    jaxtune_train.train(model, tok, pairs, TrainConfig(max_steps=1, batch_size=2, max_length=32, lora_rank=2))
    assert has_lora(model)
    with pytest.raises(jaxtune_train.TrainingError, match=r"carries LoRA adapters.*jaxtune.lora.merge\(model\)"):
        Trainer(model, tok, pairs, TrainConfig(max_steps=1, batch_size=2, max_length=32))
    merged = merge(model)
    assert not has_lora(merged)
    Trainer(merged, tok, pairs, TrainConfig(max_steps=1, batch_size=2, max_length=32)).run()
