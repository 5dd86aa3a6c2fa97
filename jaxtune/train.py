"""The loss, the optimizer, one jitted train step with donated state, and the training loop."""

from __future__ import annotations

import contextlib
import errno
import gc
import math
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtune.config import TrainConfig
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune.data import (EncodedSet, Pair, as_pairs, batch_length, encode_pairs, epoch_batches, plan_epoch,
                          targets_size)
from jaxtune.lora import LoRAParam, adapter_differences, add_lora, has_lora
from jaxtune.quantize import quantize_base
from jaxtune.rundir import verify_checksums, write_checksums
from jaxtune.model import check_model_and_tokenizer
from jaxtune.sharding import batch_sharding, make_mesh, place, place_global, to_host, tree_shardings


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, no usable data)."""


# ---------------------------------------------------------------------------------------------- loss
def masked_loss(logits_BTV, input_ids_BT, loss_mask_BT):
    """Sum of next-token cross-entropies over targets, and their count. Logits are upcast to float32."""
    logits = logits_BTV[:, :-1].astype(jnp.float32)
    targets, mask = input_ids_BT[:, 1:], loss_mask_BT[:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * mask), jnp.sum(mask)


def batch_loss(model, batch: dict, *, dropout_rng=None, use_attention_mask: bool = False):
    """Mean loss over the batch's targets: what `jaxtune` reports and what the reference's `.loss` computes."""
    logits = model(batch["input_ids"], attention_mask_BS=batch["attention_mask"] if use_attention_mask else None,
                   dropout_rng=dropout_rng)
    total, count = masked_loss(logits, batch["input_ids"], batch["loss_mask"])
    return total / jnp.maximum(count, 1.0), count


# ---------------------------------------------------------------------------------------------- optimizer
def make_schedule(cfg: TrainConfig, total_steps: int):
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if not warmup:  # the same values, without optax's warning about a warmup of no steps
        return optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps, 1), alpha=0.1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1),
                                              end_value=cfg.learning_rate * 0.1)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Clipping, then AdamW at a unit learning rate: the train step multiplies the update by the step's rate, an
    argument of the step, so that the compiled step does not depend on the rate, its warmup or the run's length (a
    launch with other epochs or another rate loads the cached program instead of compiling it). adamw's update is
    -lr x (Adam's direction + weight_decay x param), so scaling afterwards is the same update; the unit rate is a
    schedule so that the optimizer state keeps its step count, as checkpoints written before hold it."""
    # Decay matrices only, as GPT-2 trainers do: not biases, LayerNorm scales or position tables... only ndim >= 2.
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    unit_rate = lambda count: jnp.ones((), jnp.float32)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(unit_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


# ---------------------------------------------------------------------------------------------- step
def summed_loss(graphdef, params, batch: dict, cfg: TrainConfig, *, dropout_rng=None, frozen=None):
    """(sum of target losses, target count) of a [batch, length] batch, computed in cfg.dtype from float32 params.
    frozen: the weights that are not trained (a LoRA run's base model), merged in beside `params`."""
    compute_dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    cast = lambda tree: jax.tree.map(lambda p: _as_float(p, compute_dtype), tree)  # noqa: E731
    model = nnx.merge(graphdef, cast(params), *([] if frozen is None else [cast(frozen)]))
    # only the reference mode counts padded positions, so only it needs their attention masked as HF does
    mask = batch["attention_mask"] if cfg.loss_on == "reference" else None
    logits = model(batch["input_ids"], attention_mask_BS=mask, positions_BT=batch.get("positions"),
                   segment_ids_BT=batch.get("segment_ids"), dropout_rng=dropout_rng,
                   logit_positions_BK=batch.get("logit_positions"))
    if "logit_positions" in batch:  # packed: logits only where the next token is a target
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["logit_targets"])
        mask = batch["logit_mask"].astype(jnp.float32)
        return jnp.sum(ce * mask), jnp.sum(mask)
    return masked_loss(logits, batch["input_ids"], batch["loss_mask"])


def _as_float(x, dtype):
    """A float array (or abstract array) in `dtype`; integer arrays (a QLoRA base's codes) as they are."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(dtype)


def split_trainable(model, cfg: TrainConfig):
    """(graphdef, trained state, frozen state or None) of `model` for cfg. Full fine-tuning trains every nnx.Param.
    LoRA (cfg.lora_rank) adds adapters in place and trains only them: the base is frozen, held in bfloat16 when
    the step computes in it (it is only ever read so) and, for QLoRA (cfg.quantize), its projections in int8/nf4."""
    prepare_model(model, cfg)
    if not cfg.lora_rank:
        graphdef, params = nnx.split(model)  # the model holds only nnx.Param state
        return graphdef, params, None
    graphdef, params, frozen = nnx.split(model, LoRAParam, ...)
    if cfg.dtype == "bfloat16":
        frozen = jax.tree.map(lambda p: _as_float(p, jnp.bfloat16), frozen)
    return graphdef, params, frozen


def prepare_model(model, cfg: TrainConfig):
    """What cfg changes in the model itself, in place (once: a prepared model is left as it is): the remat flag, and
    for LoRA the adapters and (QLoRA) the quantized base."""
    if not cfg.lora_rank and has_lora(model):
        raise TrainingError("the model carries LoRA adapters (from a LoRA run, or an adapter folder loaded with its "
                            "base): full fine-tuning would change the base under them, and saving it would write the "
                            "adapters alone. Train a merged model instead (Python: jaxtune.lora.merge(model); a LoRA "
                            "run's merged/ folder, written with --merge), or train the adapters on (lora_rank, "
                            "--lora-rank)")
    model.remat = cfg.remat  # static: part of the graph definition the step is traced from
    if cfg.lora_rank and has_lora(model):  # the adapters it carries train on: they must be the ones cfg asks for
        diff = adapter_differences(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
        if diff:
            raise TrainingError(f"the model carries LoRA adapters with other settings than these ({'; '.join(diff)}): "
                                "training would go on with the ones it has. Give their settings to train them on, or "
                                "start from a model without adapters (jaxtune.load again) for new ones")
    if cfg.lora_rank and not has_lora(model):
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, dropout=cfg.lora_dropout, seed=cfg.seed)
    if cfg.lora_rank and cfg.quantize != "none":
        quantize_base(model, cfg.quantize)


def _movable(x) -> bool:
    """An array that `move_model` moves: a jax array of numbers on one device, or (moving back) a NumPy array."""
    if isinstance(x, np.ndarray):
        return True
    return (isinstance(x, jax.Array) and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
            and len(x.sharding.device_set) == 1)


def move_model(model, put) -> int:
    """Replace each array the model's variables hold by put(array), one variable at a time, so that each old buffer
    is freed (where nothing else holds it) before the next is copied. Returns how many arrays moved."""
    moved = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) and _movable(node.get_value()):
            node.set_value(put(node.get_value()))
            moved += 1
    return moved


def _to_host(x) -> np.ndarray:
    if isinstance(x, np.ndarray):  # already there (a model loaded with host=True)
        return x
    return np.array(x)  # a copy: a CPU array's NumPy view would keep its buffer alive


def offloads_by_default() -> bool:
    """Whether a Trainer keeps the model's own arrays in host memory while it trains, unless told: on a GPU or TPU,
    in one process. Load the model with `load(..., host=True)` there and it never reaches the device whole."""
    return jax.default_backend() != "cpu" and jax.process_count() == 1


def _to_device(x):
    return jnp.asarray(x) if isinstance(x, np.ndarray) else x


def make_train_step(graphdef, optimizer, cfg: TrainConfig, state_shardings=None):
    """jit(step)(params, opt_state, batch, key, go, frozen, learning_rate) -> (params, opt_state, metrics), params and
    opt_state donated.

    `batch` arrays are [grad_accum, batch, length]; micro-batch gradients of summed token losses are added and
    divided by the total target count, so accumulation weighs every token equally. A step whose loss, gradient or
    update is not finite, or that follows such a step (`go` is the previous step's `finite`), leaves the state
    unchanged (the loop then stops and says so). `learning_rate` is this step's rate (the Trainer's host-side
    schedule; cfg.learning_rate when not given, for memory plans and tests); the metrics return it.
    """
    mesh = jax.tree.leaves(state_shardings)[0].mesh if state_shardings is not None else None

    def step(params, opt_state, batch, key, go, frozen=None, learning_rate=cfg.learning_rate):
        with _tracing_mesh(mesh):
            return _step(params, opt_state, batch, key, go, frozen, jnp.asarray(learning_rate, jnp.float32))

    def _step(params, opt_state, batch, key, go, frozen, learning_rate):
        # the step's target count is known from the masks before any forward pass: dividing each micro-batch's
        # summed loss by it gives token-weighted gradients directly, with no pass over them afterwards
        count = jnp.sum(batch["loss_mask"][..., 1:]).astype(jnp.float32)
        denom = jnp.maximum(count, 1.0)

        def micro_loss(params, micro, k):
            total, _ = summed_loss(graphdef, params, micro, cfg, dropout_rng=k if cfg.dropout else None, frozen=frozen)
            return total / denom

        grad_fn = jax.value_and_grad(micro_loss)
        keys = jax.random.split(key, batch["input_ids"].shape[0])
        if batch["input_ids"].shape[0] == 1:
            loss, grads = grad_fn(params, jax.tree.map(lambda a: a[0], batch), keys[0])
        else:
            def accumulate(carry, xs):
                loss, grads = grad_fn(params, *xs)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (batch, keys))
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: (learning_rate * u).astype(u.dtype), updates)  # see make_optimizer
        # the update is checked too (a non-finite learning rate gives finite gradients and NaN weights), and so is
        # the previous step (`go`, still on the device): once one step failed, the steps dispatched after it
        # before the host saw that change nothing, so the state stays that of the last finite step
        finite_update = jnp.all(jnp.stack([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
        ok = go & jnp.isfinite(loss) & jnp.isfinite(grad_norm) & finite_update
        # cond runs only the taken branch (no select over the state)
        params, opt_state = jax.lax.cond(ok, lambda: (optax.apply_updates(params, updates), new_opt_state),
                                         lambda: (params, opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "loss_tokens": count,
                   "tokens": jnp.sum(batch["attention_mask"]), "finite": ok,  # tokens: real ones, not padding
                   "learning_rate": learning_rate}
        return params, opt_state, metrics

    if state_shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(*state_shardings, None))  # keep params where they live


_STEPS: OrderedDict = OrderedDict()  # (graphdef, settings) -> (optimizer, train step, eval step), latest last
_STEPS_LOCK = threading.Lock()


def jitted_steps(graphdef, cfg: TrainConfig, shardings=None, mesh=None):
    """(optimizer, train step, eval step) for a model structure and cfg, shared by the process's Trainers on one
    device: a Trainer built again on the same model and settings (the app's next Start, a sweep over learning rates)
    gets the same jitted functions, so its first step runs the programs jit already traced and compiled instead of
    tracing again and loading them from the persistent cache. The step reads no learning rate, schedule, epoch count,
    step limit or seed (the rate is an argument, the key too), so runs that differ only in those share it; anything
    else in cfg, the model's structure, or the batch shapes (jit's own cache) gives other programs. On a mesh the
    shardings are part of the program: built afresh."""
    if shardings is not None:
        optimizer = make_optimizer(cfg)
        return optimizer, make_train_step(graphdef, optimizer, cfg, shardings), make_eval_step(graphdef, cfg, mesh)
    traced = replace(cfg, learning_rate=1.0, epochs=1, warmup_steps=0, max_steps=None, seed=0)
    key = (graphdef, tuple(sorted(asdict(traced).items())))
    with _STEPS_LOCK:
        if key in _STEPS:
            _STEPS.move_to_end(key)
            return _STEPS[key]
        optimizer = make_optimizer(cfg)
        _STEPS[key] = steps = (optimizer, make_train_step(graphdef, optimizer, cfg), make_eval_step(graphdef, cfg))
        while len(_STEPS) > 8:  # each holds its compiled programs
            _STEPS.popitem(last=False)
        return steps


def make_eval_step(graphdef, cfg: TrainConfig, mesh=None):
    def evaluate(params, batch, frozen=None):
        with _tracing_mesh(mesh):
            return summed_loss(graphdef, params, batch, cfg, frozen=frozen)

    return jax.jit(evaluate)


def _tracing_mesh(mesh):
    """The mesh the model sees while a step is traced (it keeps activations split by rows: `model._rows_split`)."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


# ---------------------------------------------------------------------------------------------- loop
@dataclass
class StepMetrics:
    """What each step reports to the callback (the app's plot, the terminal's progress bar, metrics.jsonl)."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    learning_rate: float
    grad_norm: float
    tokens: int  # real (non-padding) tokens in the step's batch
    loss_tokens: int  # tokens that carried loss
    tokens_per_sec: float
    elapsed: float  # seconds since training started (a resumed run's clock goes on from its checkpoint's)
    eta: float  # seconds left, estimated from the recent pace
    val_loss: float | None = None
    positions: int = 0  # token positions computed (rows x length x micro-batches): tokens / positions is the real share

    @property
    def val_perplexity(self) -> float | None:
        return None if self.val_loss is None else math.exp(min(self.val_loss, 700.0))

    def to_dict(self):
        return {**asdict(self), "val_perplexity": self.val_perplexity}


@dataclass
class TrainResult:
    history: list[StepMetrics] = field(default_factory=list)
    steps: int = 0
    stopped: str | None = None  # None when all steps ran; otherwise why it stopped early
    seconds: float = 0.0
    compiled_programs: int = 0
    truncated: int = 0  # examples cut at max_length
    initial_val_loss: float | None = None  # validation loss before the run's first step (a resume's too)
    diverged: bool = False  # stopped because the loss or gradient was not finite
    tokens: int = 0  # real tokens trained on in this run
    positions: int = 0  # positions computed for them, padding included
    stop_requested: bool = False  # stopped because should_stop() said so
    peak_memory: int | None = None  # the most bytes in use on any of this host's devices (None where not reported: CPU)
    first_step: int = 1  # the first step this call ran (a resumed run starts after its checkpoint's step)
    best_step: int | None = None  # with early stopping: the step whose weights the model keeps (lowest validation loss)
    best_val_loss: float | None = None

    @property
    def real_token_share(self) -> float | None:
        """The share of computed positions that held real tokens (the rest was padding)."""
        return self.tokens / self.positions if self.positions else None

    @property
    def final_loss(self) -> float | None:
        return self.history[-1].loss if self.history else None


def _stack_accum(batches: list[dict]) -> dict:
    """[grad_accum, batch, length]: each array padded to its longest micro-batch (extra columns carry no loss).
    Packed batches' logit_* arrays keep their own, shorter, size: the head runs only at that many positions."""
    def stack(arrays):
        length = max(a.shape[1] for a in arrays)
        return np.stack([np.pad(a, ((0, 0), (0, length - a.shape[1]))) for a in arrays])

    return {k: stack([b[k] for b in batches]) for k in batches[0]}


class Trainer:
    """Trains a model in place. Usable step by step (the app) or through `run` (the command line).

    offload_model (default: on a GPU or TPU, not on a CPU): the trainer keeps its own copies of the weights on the
    device (float32 master weights; for LoRA the frozen base in the step's dtype, or quantized), so the model's own
    arrays wait in host memory until `run` ends, then return to the device holding what was learned. Without it the
    device held the model's float32 weights beside the trainer's for the whole run: 5.8 GiB more than XLA's plan of
    a gpt2-xl step on an H200. A model loaded with `load(..., host=True)` starts in host memory, and only what the run
    trains and reads is copied to the device (QLoRA quantizes the base there one projection at a time)."""

    def __init__(self, model, tokenizer, pairs: list[Pair] | EncodedSet, cfg: TrainConfig, *,
                 validation_pairs: list[Pair] | None = None,
                 devices=None, offload_model: bool | None = None):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg: a {type(cfg).__name__}; give a jaxtune.TrainConfig (TrainConfig(**settings) from a "
                            "dict)")
        check_model_and_tokenizer(model, tokenizer, "Trainer(model, tokenizer, pairs, cfg)")
        if not isinstance(pairs, EncodedSet):  # a list, a generator or a DataFrame: checked once, here
            pairs = as_pairs(pairs)
        if not pairs:
            raise TrainingError("no training pairs")
        if validation_pairs is not None and not isinstance(validation_pairs, EncodedSet):
            validation_pairs = as_pairs(validation_pairs, "validation_pairs")
        if cfg.max_length > model.config.n_positions:
            raise TrainingError(f"max_length={cfg.max_length} exceeds the model's n_positions={model.config.n_positions}")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        encoded = self.encoded(pairs, cfg)
        # rows whose response max_length cuts off entirely carry no target: left out, and named in `dropped`
        self.examples, self.truncated, self.dropped = encoded.examples, encoded.truncated, encoded.dropped
        self.val_examples = (self.encoded(validation_pairs, cfg).examples
                             if isinstance(validation_pairs, EncodedSet) or validation_pairs else [])
        # every epoch's batches are a function of (seed, epoch), planned when the epoch starts, so a resumed run
        # continues with exactly the batches the stopped run would have seen and no run holds more than one
        # epoch's plan (an epoch count of 10**9 costs nothing up front). Unpacked epochs all have the same number
        # of batches; packed ones are counted (and their largest target count taken) epoch by epoch, up to max_steps.
        self._plans: dict[int, list] = {}
        self.epoch_steps, self.targets, rows, self.cut_by_max_steps = self._count_epochs()
        self.total_steps = sum(self.epoch_steps)
        self.val_plan = self._plan(self.val_examples, 0, shuffle=False)  # fixed: evaluated the same way every time
        self.val_targets = self._targets(self.val_examples, [self.val_plan]) if cfg.pack and self.val_examples else None
        lengths = [len(e.input_ids) for e in self.examples]
        if cfg.pack:
            computed = rows * cfg.max_length
            real = sum(lengths) * len(self.epoch_steps)
        else:  # the first epoch's share: later epochs differ only in which examples share a batch
            computed = sum(cfg.batch_size * self.batch_length(batch, lengths) for batch in self.plan(0))
            real = sum(lengths)
        self.planned_real_token_share = real / computed
        if offload_model is None:
            offload_model = offloads_by_default()
        self.offloaded = False  # whether the model's own arrays are in host memory now (until `run` ends)
        self._frozen_given_back = False  # whether `run` gave the device copy of the base back (see `frozen`)
        if offload_model and jax.process_count() == 1:
            prepare_model(model, cfg)  # adapters and quantized base first, in place on the device
            self.offloaded = move_model(model, _to_host) > 0
        self.graphdef, params, frozen = split_trainable(model, cfg)
        self._frozen = None if frozen is None else jax.tree.map(_to_device, frozen)
        # float32 master weights, copied: the step donates them, and the caller's arrays must survive
        self.params = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
        self.opt_state = make_optimizer(cfg).init(self.params)
        self.mesh, self.shardings = _layout(cfg, devices, self.params, self.opt_state)
        self.optimizer, self._step, self._eval = jitted_steps(self.graphdef, cfg, self.shardings, self.mesh)
        if self.mesh is not None:
            self.params, self.opt_state = place(self.params, self.shardings[0]), place(self.opt_state, self.shardings[1])
            self._frozen = self._placed(self._frozen)
        self.schedule = make_schedule(cfg, self.total_steps)
        self._rates: tuple[int, np.ndarray] | None = None  # (chunk, its 1024 rates): see learning_rate
        self._shapes: set[tuple] = set()  # the batch shapes this trainer's steps ran on: one program each
        self._traced: set[tuple] = set()  # the validation batches' shapes, likewise
        self.step = 0
        self.key = jax.random.key(cfg.seed)
        self.initial_val_loss: float | None = None  # before the first step; a checkpoint carries it to a resume
        self.best = None  # early stopping: {"step", "val_loss", "since", "params"}; a checkpoint carries it too
        self.elapsed_before = 0.0  # training seconds of the steps a resume took from its checkpoint

    def _placed(self, frozen):
        """The frozen base laid out on the mesh: replicated, or split like any parameter under fsdp."""
        if frozen is None or self.mesh is None:
            return frozen
        return place(frozen, tree_shardings(self.mesh, frozen))

    @property
    def frozen(self):
        """The frozen base the step reads (None: full fine-tuning). When `run` ends, an offloaded trainer gives its
        device copy back as the model's own base returns to the device, and builds it again from the model if asked."""
        if self._frozen is None and self._frozen_given_back:
            self._frozen, self._frozen_given_back = self._placed(split_trainable(self.model, self.cfg)[2]), False
        return self._frozen

    def learning_rate(self, step: int) -> np.float32:
        """The schedule's rate for the step after `step` finished ones, evaluated 1024 steps at a time on the host
        side of the loop (one small device computation per 1024 steps, not one per step behind the step in flight)."""
        chunk, i = divmod(step, 1024)
        if self._rates is None or self._rates[0] != chunk:
            steps = jnp.arange(chunk * 1024, (chunk + 1) * 1024)
            self._rates = chunk, np.asarray(jax.vmap(self.schedule)(steps), np.float32)
        return self._rates[1][i]

    def _step_args(self, batch, key, go) -> tuple:
        return (self.params, self.opt_state, batch, key, go, self.frozen,
                jnp.asarray(self.learning_rate(self.step), jnp.float32))

    def lower_step(self, batch=None):
        """The train step lowered with its arguments typed exactly as `run` passes them, so that `.compile()` gives
        the program `run` executes (from jit's cache once it ran) and `.as_text()` the program it traced. batch:
        the first of the run's batches when not given."""
        batch = next(iter(self._batches()))[1] if batch is None else batch
        return self._step.lower(*self._step_args(batch, jax.random.key(0), jnp.asarray(True)))

    def encoded(self, pairs, cfg: TrainConfig) -> EncodedSet:
        """Pairs (checked by `__init__` with `data.as_pairs`) tokenized once (`data.encode_pairs`); an EncodedSet
        (e.g. from `inspect_rows`) is taken as it is."""
        if isinstance(pairs, EncodedSet):
            if pairs.max_length != cfg.max_length:
                raise TrainingError(f"the pairs were encoded for max_length={pairs.max_length}, not {cfg.max_length}")
            return pairs
        return encode_pairs(self.tokenizer, pairs, loss_on=cfg.loss_on, max_length=cfg.max_length)

    def plan(self, epoch: int) -> list:
        """Epoch `epoch`'s batches (rows of example indices); the last two planned are kept."""
        if epoch not in self._plans:
            while len(self._plans) >= 2:
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = self._plan(self.examples, epoch)
        return self._plans[epoch]

    def _count_epochs(self) -> tuple[list[int], int | None, int, bool]:
        """(optimizer steps of each epoch that runs, packed target size, packed rows computed, whether max_steps
        ends the run before its epochs do), stopping at max_steps."""
        cfg = self.cfg
        steps, total, counts, most, rows = [], 0, None, 0, 0
        per_epoch = math.ceil(math.ceil(len(self.examples) / cfg.batch_size) / cfg.grad_accum)
        if cfg.pack:
            counts = [int(e.loss_mask.sum()) for e in self.examples]
        for epoch in range(cfg.epochs):
            if cfg.max_steps is not None and total >= cfg.max_steps:
                break
            if cfg.pack:
                plan = self.plan(epoch)
                per_epoch = math.ceil(len(plan) / cfg.grad_accum)
                rows += len(plan) * cfg.batch_size  # a batch has batch_size rows, empty ones included
                most = max([most] + [sum(counts[i] for i in row) for batch in plan for row in batch])
            elif cfg.max_steps is None:  # every epoch alike: no need to count them one by one
                steps = [per_epoch] * cfg.epochs
                break
            steps.append(min(per_epoch, cfg.max_steps - total) if cfg.max_steps is not None else per_epoch)
            total += steps[-1]
        cut = cfg.max_steps is not None and bool(steps) and (len(steps) < cfg.epochs or steps[-1] < per_epoch)
        return steps, (targets_size([most]) if cfg.pack else None), rows, cut

    def _plan(self, examples, epoch: int, shuffle: bool = True):
        cfg = self.cfg
        return plan_epoch([len(e.input_ids) for e in examples], batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                          shuffle=shuffle, pack_length=cfg.max_length if cfg.pack else None)

    def batch_length(self, batch, lengths) -> int:
        """The length a planned batch of these examples is collated to (see `data.batch_length`)."""
        cfg = self.cfg
        return batch_length(batch, lengths, buckets=cfg.buckets, max_length=cfg.max_length, pack=cfg.pack)

    @staticmethod
    def _targets(examples, plans) -> int:
        counts = [int(e.loss_mask.sum()) for e in examples]
        return targets_size(sum(counts[i] for i in row) for plan in plans for batch in plan for row in batch)

    def _epoch(self, examples, plan, targets=None):
        cfg = self.cfg
        return epoch_batches(examples, batch_size=cfg.batch_size, buckets=cfg.buckets, max_length=cfg.max_length,
                             pad_id=self.tokenizer.pad_token_id, seed=cfg.seed, epoch=0, pack=cfg.pack, plan=plan,
                             reference=cfg.loss_on == "reference", targets=targets or self.targets)

    def _batches(self, start: int = 0):
        """(epoch, [grad_accum, batch, length] arrays) from optimizer step `start` on; the steps before it are
        skipped in the plans, without collating them."""
        cfg = self.cfg
        for epoch, n in enumerate(self.epoch_steps):
            if start >= n:
                start -= n
                continue
            plan, start = self.plan(epoch)[start * cfg.grad_accum:n * cfg.grad_accum], 0
            pending = []
            for batch in self._epoch(self.examples, plan):
                pending.append(batch)
                if len(pending) == cfg.grad_accum:
                    yield epoch, _stack_accum(pending)
                    pending = []
            if pending:
                yield epoch, _stack_accum(pending + [_empty_like(pending[0])] * (cfg.grad_accum - len(pending)))

    def validation_loss(self) -> float | None:
        if not self.val_examples:
            return None
        total, count = 0.0, 0.0
        for batch in self._epoch(self.val_examples, self.val_plan, self.val_targets):
            if self.mesh is not None:
                batch = jax.tree.map(lambda a: place_global(a, NamedSharding(self.mesh, P(("data", "fsdp")))), batch)
            shape = ("eval",) + tuple(sorted((k, a.shape) for k, a in batch.items()))
            with _gc_paused(shape not in self._traced):
                t, c = self._eval(self.params, batch, self.frozen)
            self._traced.add(shape)
            total, count = total + float(t), count + float(c)
        return total / max(count, 1.0)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory, *, keep: int = 3, history: list[StepMetrics] | None = None,
                        extra: dict | None = None):
        """Parameters, optimizer state, step, RNG key and the step history, with orbax (written atomically;
        the newest `keep` are kept), then the list of its files with their checksums (see `rundir`). The data
        order needs no saving: it is a function of (seed, epoch, step)."""
        import orbax.checkpoint as ocp

        directory = Path(directory).absolute()
        if (directory / str(self.step)).exists():  # this step was saved already (a stop right after a periodic save)
            if jax.process_count() > 1 or verify_checksums(directory / str(self.step)) is None:
                return
            shutil.rmtree(directory / str(self.step))  # a partial one, from a run that died while writing it
        leaves = jax.tree.leaves((self.params, self.opt_state))
        if jax.process_count() == 1:  # refuse up front what cannot fit: orbax's writers fail noisily on a full disk
            need, existing = sum(x.nbytes for x in leaves) + 2**20, next(p for p in (directory, *directory.parents) if p.exists())
            free = shutil.disk_usage(existing).free
            if free < need:
                raise OSError(errno.ENOSPC, f"No space left on device: a checkpoint needs about {need / 2**20:,.0f} MiB "
                                            f"and {free / 2**20:,.0f} MiB are free")
        state = {"leaves": {str(i): leaf for i, leaf in enumerate(leaves)},
                 "key": np.asarray(jax.random.key_data(self.key))}  # the same on every host
        meta = {"step": self.step, "history": [h.to_dict() for h in (history or [])], "extra": extra or {},
                "initial_val_loss": self.initial_val_loss,
                "best": None if self.best is None else {k: v for k, v in self.best.items() if k != "params"},
                "train_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()},
                "shapes": _leaf_shapes((self.params, self.opt_state))}
        with _quiet_orbax(), ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep)) as m:
            items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
            if self.best is not None:  # the weights early stopping keeps, as they were at the best step
                items["best"] = ocp.args.StandardSave({str(i): x for i, x in enumerate(jax.tree.leaves(self.best["params"]))})
            m.save(self.step, args=ocp.args.Composite(**items), force=True)
            m.wait_until_finished()
        if jax.process_count() == 1:  # several hosts may not share a file system: each sees only its own files
            write_checksums(directory / str(self.step))

    def restore_checkpoint(self, directory, *, warn: Callable[[str], None] | None = None) -> list[StepMetrics]:
        """Continue from the newest usable checkpoint in `directory`; returns the step history saved with it.

        Each checkpoint's files are checked against the sizes and checksums recorded when it was written; a
        damaged or partial one is skipped (`warn` is told which and why) for the one before it. The extras saved
        with the checkpoint used are left in `self.checkpoint_extra`."""
        import orbax.checkpoint as ocp

        directory = Path(directory).absolute()
        template, treedef = jax.tree.flatten((self.params, self.opt_state))
        # restore straight into this run's layout: each host reads the shards its devices hold
        target = {"leaves": {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                             for i, x in enumerate(template)}, "key": np.asarray(jax.random.key_data(self.key))}
        if not directory.is_dir():
            raise TrainingError(f"{directory}: no checkpoint to resume from (no such folder)")
        problems = []
        with _quiet_orbax(), ocp.CheckpointManager(directory) as m:
            steps = sorted(m.all_steps(), reverse=True)
            if not steps:
                raise TrainingError(f"{directory}: no checkpoint to resume from")
            for step in steps:
                problem = verify_checksums(directory / str(step)) if jax.process_count() == 1 else None
                if problem is None:
                    try:
                        meta = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
                        problem = f"its metadata cannot be read ({str(e).splitlines()[0][:200]})"
                if problem is None:
                    mismatch = _shape_mismatch(meta.get("shapes"), (self.params, self.opt_state))
                    if mismatch:
                        raise TrainingError(f"{directory / str(step)}: the checkpoint holds a model or optimizer of "
                                            f"another shape ({mismatch}); resume with the --model it was trained with")
                    try:
                        state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
                        best = None
                        if meta.get("best") is not None:
                            best_target = {str(i): target["leaves"][str(i)]  # the parameters come first
                                           for i in range(len(jax.tree.leaves(self.params)))}
                            best = m.restore(step, args=ocp.args.Composite(best=ocp.args.StandardRestore(best_target)))["best"]
                    except Exception as e:  # noqa: BLE001
                        problem = f"its arrays cannot be read ({str(e).splitlines()[0][:200]})"
                if problem is None:
                    break
                problems.append(f"step {step}: {problem}")
                if warn:
                    warn(f"checkpoint {directory / str(step)} is not usable: {problem}; "
                         + ("trying the one before it" if step != steps[-1] else "it was the oldest"))
            else:
                raise TrainingError(f"{directory}: no usable checkpoint ({'; '.join(problems)}). Start the run again "
                                    "without --resume")
        self.params, self.opt_state = jax.tree.unflatten(treedef, [state["leaves"][str(i)] for i in range(len(template))])
        self.key = jax.random.wrap_key_data(jnp.asarray(state["key"]))
        self.step = int(meta["step"])
        self.checkpoint_extra = meta.get("extra") or {}
        self.initial_val_loss = meta.get("initial_val_loss")
        self.best = None
        if best is not None:
            params_def = jax.tree.structure(self.params)
            self.best = {**meta["best"], "params": jax.tree.unflatten(params_def, [best[str(i)] for i in range(len(best))])}
        history = [StepMetrics(**{k: v for k, v in h.items() if k != "val_perplexity"}) for h in meta["history"]]
        self.elapsed_before = history[-1].elapsed if history else 0.0  # the steps' clock goes on from there
        return history

    def _agreed(self, should_stop) -> bool:
        """should_stop(), and on several hosts process 0's answer, every 10 steps, so that all stop together."""
        if jax.process_count() == 1:
            return should_stop()
        if self.step % 10:
            return False
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(np.asarray(should_stop())))

    def compiled_programs(self) -> int:
        """The step programs this trainer ran: one per batch shape (jit's cache, shared with other Trainers of the
        same model and settings, may hold more)."""
        return len(self._shapes)

    def sync_model(self):
        """Write the trained parameters back into the model object (on several hosts: a full local copy on each)."""
        nnx.update(self.model, jax.tree.map(jnp.asarray, to_host(self.params)) if jax.process_count() > 1 else self.params)
        if not self.cfg.lora_rank and self.step > 0 and hasattr(self.model, "origin"):
            # the weights are no longer those where load found them: a LoRA run on this model saves its base beside
            # the adapters (`save`) instead of naming a folder or hub id that holds other weights
            del self.model.origin
        self.restore_model()

    def restore_model(self):
        """An offloaded model's arrays back on the device. The device copy of a LoRA base goes first, so that the
        device never holds both (`frozen` builds it again if asked)."""
        if not self.offloaded:
            return
        if self._frozen is not None:
            self._frozen, self._frozen_given_back = None, True
        move_model(self.model, _to_device)
        self.offloaded = False

    def run(self, on_step: Callable[[StepMetrics], None] | None = None, should_stop: Callable[[], bool] | None = None,
            eval_every: int | None = None, save_every: int | None = None,
            checkpoint: Callable[[list[StepMetrics]], None] | None = None,
            early_stopping: int | None = None) -> TrainResult:
        """Train for the configured steps. Metrics of step N are read after step N+1 is dispatched, so the host
        never waits on the device; `should_stop` is checked between steps and the model keeps what it learned.
        Should the run fail, the model keeps the weights it had (back on the device if they were offloaded).

        early_stopping=N: the run stops once the validation loss (every `eval_every` steps, default a tenth of the
        run) has not fallen below its lowest for N evaluations in a row, and the model keeps the weights of the step
        with the lowest one (the starting weights count, at step 0), however the run ends (a divergence too). Only
        the scheduled evaluations and the last planned step's count: a stop by hand changes nothing, so a resumed
        run stops where the run left alone would have."""
        if early_stopping and not self.val_examples:
            raise TrainingError("early stopping watches the validation loss, and this run holds no pairs out: give "
                                "validation data (--validation-data or --validation-fraction)")
        if early_stopping and not eval_every:
            eval_every = self.default_eval_every()
        try:
            return self._run(on_step, should_stop, eval_every, save_every, checkpoint, early_stopping)
        except BaseException:
            self.restore_model()
            raise

    def finished_early(self, early_stopping: int | None) -> bool:
        """Whether early stopping ended this run already (a resume of it trains nothing)."""
        return bool(early_stopping and self.best is not None and self.best["since"] >= early_stopping)

    def default_eval_every(self) -> int:
        """Early stopping's evaluation spacing when none is given: a tenth of the run."""
        return max(1, self.total_steps // 10)

    def _improved(self, val_loss: float | None, patience: int | None) -> bool:
        """Early stopping's bookkeeping after an evaluation of the current weights: False once the validation loss
        has not fallen below its lowest for `patience` evaluations in a row."""
        if not patience or val_loss is None:
            return True
        if self.best is None or val_loss < self.best["val_loss"]:
            params = (jax.device_get(self.params) if jax.process_count() == 1  # a host copy: no device memory
                      else jax.tree.map(jnp.copy, self.params))  # several hosts: each keeps its own shards
            self.best = {"step": self.step, "val_loss": float(val_loss), "since": 0, "params": params}
            return True
        self.best["since"] += 1
        return self.best["since"] < patience

    def _early_stop_reason(self) -> str:
        n = self.best["since"]
        return (f"the validation loss had not fallen below {self.best['val_loss']:.4f} (step {self.best['step']}) for "
                f"{n} evaluation{'s' if n != 1 else ''} by step {self.step}")

    def _run(self, on_step, should_stop, eval_every, save_every, checkpoint, early_stopping) -> TrainResult:
        result = TrainResult(truncated=self.truncated, first_step=self.step + 1)
        if self.step == 0 or not early_stopping:  # a resume may turn early stopping off, or on (no best yet then)
            self.best = None
        if self.step == 0:
            self.initial_val_loss = self.validation_loss()
            self._improved(self.initial_val_loss, early_stopping)  # the starting weights are a candidate too
        result.initial_val_loss = self.initial_val_loss
        if self.finished_early(early_stopping):
            result.stopped = self._early_stop_reason()  # a resume of a run early stopping ended: nothing to train
        start = time.perf_counter()
        last_time, pending = start, None
        recent: list[float] = []
        divergence = None  # (step, what became non-finite): said once the loop is over, with the weights kept

        def report(item, val_loss=None):
            nonlocal last_time, divergence
            step, epoch, metrics, positions = item
            m = jax.device_get(metrics)
            now = time.perf_counter()
            dt = now - last_time
            last_time = now
            recent.append(dt)
            paced = recent[1:][-10:] or recent  # the first step also waited for the compiler: not a step's pace
            pace = sum(paced) / len(paced)
            if not m["finite"]:
                # this step and any dispatched after it changed nothing (see make_train_step): the state is step - 1's
                self.step = step - 1
                result.diverged = True
                what = next((f"{name} became {float(m[name])}" for name in ("loss", "grad_norm")
                             if not np.isfinite(float(m[name]))), "the update was not finite")
                divergence = (step, what.replace("grad_norm", "the gradient norm").replace("loss", "the loss", 1))
                return
            sm = StepMetrics(step=step, total_steps=self.total_steps, epoch=epoch, loss=float(m["loss"]),
                             learning_rate=float(m["learning_rate"]), grad_norm=float(m["grad_norm"]),
                             tokens=int(m["tokens"]), positions=positions, loss_tokens=int(m["loss_tokens"]),
                             tokens_per_sec=float(m["tokens"]) / max(dt, 1e-9), elapsed=self.elapsed_before + now - start,
                             eta=pace * (self.total_steps - step), val_loss=val_loss)
            result.history.append(sm)
            result.tokens, result.positions = result.tokens + sm.tokens, result.positions + positions
            if on_step:
                on_step(sm)

        go = jnp.asarray(True)  # the previous step's `finite`, passed on without waiting for it
        if self.mesh is not None:  # laid out as the step returns it: the second step would compile the step again
            go = place_global(np.asarray(True), NamedSharding(self.mesh, P()))
        batches = self._batches(self.step) if not result.stopped else ()  # resumed: from the step after its checkpoint's
        for epoch, batch in batches:
            if self.step >= self.total_steps or result.stopped or result.diverged:
                break
            if should_stop and self._agreed(should_stop):
                result.stopped, result.stop_requested = f"stopped by request after step {self.step}", True
                break
            self.key, step_key = jax.random.split(self.key)
            if self.mesh is not None:
                batch = jax.tree.map(lambda a: place_global(a, batch_sharding(self.mesh)), batch)
            shape = tuple(sorted((k, a.shape) for k, a in batch.items()))
            with _gc_paused(shape not in self._shapes):  # a new shape: jit traces and compiles (or loads) first
                self.params, self.opt_state, metrics = self._step(*self._step_args(batch, step_key, go))
            self._shapes.add(shape)
            go = metrics["finite"]
            self.step += 1
            if pending:
                report(pending)
            pending = (self.step, epoch, metrics, batch["input_ids"].size)
            evaluate = bool(eval_every and self.val_examples and self.step % eval_every == 0)
            save = bool(save_every and checkpoint and self.step % save_every == 0)
            if (evaluate or save) and self.step < self.total_steps:  # sync here: metrics, then state, line up
                val_loss = self.validation_loss() if evaluate else None
                report(pending, val_loss)
                pending = None
                improving = result.diverged or self._improved(val_loss, early_stopping)
                if save and not result.diverged:
                    checkpoint(result.history)
                if not improving:
                    result.stopped = self._early_stop_reason()
                    break
        if pending and not result.diverged:  # the step in flight when the loop ended (a requested stop included)
            val_loss = self.validation_loss() if self.val_examples else None
            report(pending, val_loss)
            if not result.diverged and self.step == self.total_steps:  # the plan's last step counts; a stop's not
                self._improved(val_loss, early_stopping)
        self.sync_model()
        keeps_best = bool(early_stopping and self.best is not None)
        if divergence:
            step, what = divergence
            kept = (f"{self.best['step']}, the lowest validation loss (early stopping)" if keeps_best else
                    f"{step - 1}, the last step whose loss and update were finite"
                    f"{' (the starting weights)' if step == 1 else ''}")
            result.stopped = (f"training diverged at step {step}: {what}. The model keeps the weights of step {kept}. "
                              "Lower the learning rate or check the data.")
        if keeps_best:  # the model keeps the best weights
            result.best_step, result.best_val_loss = self.best["step"], self.best["val_loss"]
            if self.best["step"] != self.step or result.diverged:
                best = self.best["params"] if jax.process_count() == 1 else to_host(self.best["params"])
                nnx.update(self.model, jax.tree.map(jnp.asarray, best))
        result.steps, result.seconds = self.step, time.perf_counter() - start
        result.compiled_programs = self.compiled_programs()
        result.peak_memory = peak_device_memory()
        return result


@contextlib.contextmanager
def _gc_paused(paused: bool = True):
    """Python's cyclic garbage collector off while jit traces and compiles (or loads) a program: tracing a GPT-2
    step makes enough objects to set off several collections, each of which walks every live object (a fifth of a
    124M step's 1.2 s of tracing and lowering on a 2-core CPU). Nothing is lost: the next collection runs after."""
    if not paused or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _leaf_shapes(tree) -> dict[str, list[int]]:
    return {jax.tree_util.keystr(path): list(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape_mismatch(saved: dict | None, tree) -> str | None:
    """The first leaf whose saved shape differs from this run's, in words (None: they agree, or none were saved)."""
    if saved is None:
        return None
    now = _leaf_shapes(tree)
    if set(saved) != set(now):
        return f"{len(saved)} arrays saved, {len(now)} here"
    for name, shape in now.items():
        if list(saved[name]) != shape:
            return f"{name} is {tuple(saved[name])} there and {tuple(shape)} here"
    return None


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs every save and restore through absl at INFO; keep the terminal to what jaxtune says."""
    import logging

    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def peak_device_memory() -> int | None:
    """Peak bytes in use on this host's busiest device since the process started (GPU and TPU report it)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    return max((p for p in peaks if p is not None), default=None)


def _layout(cfg: TrainConfig, devices, params, opt_state):
    """(mesh, (param shardings, optimizer-state shardings)) over several devices or with fsdp, else (None, None):
    one mesh over all devices, batch rows split, parameters and optimizer state replicated or sharded."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) == 1 and not cfg.fsdp:
        return None, None
    if cfg.batch_size % len(devices):
        raise TrainingError(f"batch_size={cfg.batch_size} must be a multiple of the {len(devices)} devices "
                            "(each device takes an equal share of the rows)")
    mesh = make_mesh(fsdp=cfg.fsdp, devices=devices)
    return mesh, (tree_shardings(mesh, params), tree_shardings(mesh, opt_state))


def plan_step_memory(config, cfg: TrainConfig, *, targets: int | None = None, devices=None) -> dict:
    """XLA's memory plan for one train step of this architecture, per device, compiled on abstract shapes, so
    nothing is allocated: whether a run fits, before loading any weights.

    The batch is cfg.grad_accum x cfg.batch_size rows of cfg.max_length tokens (packed: with `targets` logit
    positions a row, default max_length). Returns bytes per device: arguments (parameters, optimizer state,
    batch), outputs, temporaries (activations, gradients, workspace), aliased (outputs written over donated
    arguments) and peak = arguments + outputs + temporaries - aliased; plus the compile time.
    """
    from jaxtune.model import abstract

    graphdef, params, frozen = split_trainable(abstract(config), cfg)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), params)
    optimizer = make_optimizer(cfg)
    opt_state = jax.eval_shape(optimizer.init, params)
    mesh, shardings = _layout(cfg, devices, params, opt_state)
    shape = (cfg.grad_accum, cfg.batch_size, cfg.max_length)
    keys = ("input_ids", "loss_mask", "attention_mask") + (("segment_ids", "positions") if cfg.pack else ())
    batch = {k: shape for k in keys}
    if cfg.pack:
        batch.update({k: shape[:2] + (targets or cfg.max_length,) for k in ("logit_positions", "logit_targets", "logit_mask")})
    key = jax.random.key(0)
    if mesh is not None:
        with_sharding = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
        params, opt_state = jax.tree.map(with_sharding, params, shardings[0]), jax.tree.map(with_sharding, opt_state, shardings[1])
        batch = {k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=batch_sharding(mesh)) for k, v in batch.items()}
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
        if frozen is not None:
            frozen = jax.tree.map(with_sharding, frozen, tree_shardings(mesh, frozen))
    else:
        batch = {k: jax.ShapeDtypeStruct(v, jnp.int32) for k, v in batch.items()}
    start = time.perf_counter()
    go = jax.ShapeDtypeStruct((), jnp.bool_)
    compiled = make_train_step(graphdef, optimizer, cfg, shardings).lower(params, opt_state, batch, key, go, frozen).compile()
    return {**memory_plan(compiled), "compile_s": time.perf_counter() - start}


def memory_plan(compiled) -> dict:
    """Bytes per device that XLA planned for a compiled program: arguments, outputs, temporaries, aliased (outputs
    written over donated arguments) and peak = arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "aliased": m.alias_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def _empty_like(batch: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in batch.items()}


def train(model, tokenizer, pairs: list[Pair], cfg: TrainConfig | None = None, *, validation_pairs=None,
          on_step=None, should_stop=None, eval_every=None, early_stopping=None) -> TrainResult:
    """Instruction-tune `model` in place on `pairs`; returns the step history (see Trainer.run for early_stopping)."""
    trainer = Trainer(model, tokenizer, pairs, cfg or TrainConfig(), validation_pairs=validation_pairs)
    return trainer.run(on_step=on_step, should_stop=should_stop, eval_every=eval_every, early_stopping=early_stopping)
