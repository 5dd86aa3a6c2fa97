"""Run by tests/test_sharding.py in a process with 8 simulated CPU devices: the same training steps on 1 device,
data-parallel over 8, and FSDP over 8. Prints one JSON line with the losses and the largest parameter differences."""

import json

import jax
import numpy as np
from flax import nnx

from jaxtune import Pair, TrainConfig, Trainer
from jaxtune.checkpoint import offline_tokenizer
from jaxtune.config import GPT2Config
from jaxtune.lora import LoRAParam
from jaxtune.model import build
from jaxtune.train import plan_step_memory

assert jax.device_count() == 8, jax.devices()
tok = offline_tokenizer()
pairs = [Pair(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a in range(4) for b in range(4)]
config = GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4)


def run(devices, fsdp):
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=3e-3, max_length=32, seed=1, fsdp=fsdp, grad_accum=2)
    model = build(config, seed=0)
    trainer = Trainer(model, tok, pairs, cfg, devices=devices)
    result = trainer.run()
    params = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}
    kernel = trainer.params["h"][0]["mlp"]["c_fc"]["kernel"].get_value()
    compiles.append(trainer._step._cache_size())  # programs jit made for the train step over the whole run
    return [s.loss for s in result.history], params, str(getattr(kernel.sharding, "spec", "")), len(kernel.sharding.device_set)


def run_lora(devices, fsdp, quantize="none"):
    """The same steps training LoRA adapters: the frozen base is replicated, or split under fsdp (QLoRA: its
    4-bit codes are)."""
    cfg = TrainConfig(epochs=2, batch_size=8, learning_rate=3e-3, max_length=32, seed=1, fsdp=fsdp, grad_accum=2,
                      lora_rank=4, lora_targets=("c_attn", "c_fc"), quantize=quantize)
    model = build(config, seed=0)
    trainer = Trainer(model, tok, pairs, cfg, devices=devices)
    result = trainer.run()
    adapters = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}
    fc = trainer.frozen["h"][0]["mlp"]["c_fc"]
    kernel = (fc["kernel"] if quantize == "none" else fc["kernel_codes"]).get_value()
    compiles.append(trainer._step._cache_size())
    return [s.loss for s in result.history], adapters, str(getattr(kernel.sharding, "spec", ""))


def plan(fsdp, config=config, length=32):
    return plan_step_memory(config, TrainConfig(batch_size=8, max_length=length, fsdp=fsdp), devices=jax.devices())


compiles = []
wider = GPT2Config(n_positions=256, n_embd=128, n_layer=2, n_head=4)  # activations outweigh the state


one, p1, _, _ = run(jax.devices()[:1], False)
data, p8, data_spec, data_devices = run(jax.devices(), False)
fsdp, pf, fsdp_spec, fsdp_devices = run(jax.devices(), True)
lora_one, l1, _ = run_lora(jax.devices()[:1], False)
lora_data, l8, _ = run_lora(jax.devices(), False)
lora_fsdp, lf, lora_base_spec = run_lora(jax.devices(), True)
qlora_one, q1, _ = run_lora(jax.devices()[:1], False, "nf4")
qlora_data, q8, _ = run_lora(jax.devices(), False, "nf4")
qlora_fsdp, qf, qlora_codes_spec = run_lora(jax.devices(), True, "nf4")
print(json.dumps({
    "qlora_one": qlora_one, "qlora_data": qlora_data, "qlora_fsdp": qlora_fsdp, "qlora_codes_spec": qlora_codes_spec,
    "qlora_data_max_diff": max(float(np.abs(q1[k] - q8[k]).max()) for k in q1),
    "qlora_fsdp_max_diff": max(float(np.abs(q1[k] - qf[k]).max()) for k in q1),
    "one": one, "data": data, "fsdp": fsdp,
    "data_max_diff": max(float(np.abs(p1[k] - p8[k]).max()) for k in p1),
    "fsdp_max_diff": max(float(np.abs(p1[k] - pf[k]).max()) for k in p1),
    "plan_replicated": plan(False), "plan_fsdp": plan(True),
    "plan_wider_replicated": plan(False, wider, 256), "plan_wider_fsdp": plan(True, wider, 256),
    "lora_one": lora_one, "lora_data": lora_data, "lora_fsdp": lora_fsdp, "lora_base_spec": lora_base_spec,
    "lora_data_max_diff": max(float(np.abs(l1[k] - l8[k]).max()) for k in l1),
    "lora_fsdp_max_diff": max(float(np.abs(l1[k] - lf[k]).max()) for k in l1),
    "step_programs": compiles,
    "data_spec": data_spec, "fsdp_spec": fsdp_spec, "data_devices": data_devices, "fsdp_devices": fsdp_devices,
}))
