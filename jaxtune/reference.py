"""The reference implementation's API (`CustomerServiceTuner`, `tune_customer_service`), running on JAX.

Code written against the PyTorch reference runs unchanged: the same names, the same formatting and EOS padding,
and `simulate_tune` prints the same `Loss: <float>` (the reference's loss: labels = input ids, pads included).
`tune` goes further and takes real optimisation steps, with the loss on the response and a closing EOS.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxtune.checkpoint import load
from jaxtune.config import TrainConfig
from jaxtune.data import pairs_from_lists, reference_batch
from jaxtune.generate import generate
from jaxtune.train import Trainer, TrainResult, batch_loss


class CustomerServiceTuner:
    """GPT-2 and its tokenizer, with pad token = EOS and right padding, as in the reference."""

    def __init__(self, model_name: str = "auto"):
        # The reference hard-codes "gpt2"; "auto" uses it when cached or reachable, else the embedded model.
        self.model, self.tokenizer = load(model_name)
        self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_token_id = self.tokenizer.pad_token_id

    def preprocess(self, instructions: list, responses: list) -> dict:
        """`Instruction: {i}\\nResponse: {r}`, tokenised, padded to the longest with EOS on the right, truncated."""
        pairs_from_lists(instructions, responses)  # clear errors for empty or mismatched input
        batch = reference_batch(self.tokenizer, instructions, responses)
        return {k: jnp.asarray(v) for k, v in batch.items()}

    def loss(self, instructions: list, responses: list) -> float:
        """The reference's `model(**enc, labels=enc.input_ids).loss`: every position after the first, pads too."""
        enc = self.preprocess(instructions, responses)
        batch = dict(enc, loss_mask=jnp.ones_like(enc["input_ids"]))
        value, _ = batch_loss(self.model, batch, use_attention_mask=True)
        return float(value)

    def simulate_tune(self, instructions: list, responses: list) -> None:
        """Compute and print the loss of one tuning step, exactly as the reference does."""
        print("Loss:", self.loss(instructions, responses))

    def tune(self, instructions: list, responses: list, *, steps: int = 10, learning_rate: float = 1e-3,
             loss_on: str = "response", verbose: bool = True) -> TrainResult:
        """Take `steps` real optimisation steps on the pairs (the whole set as one batch each step)."""
        pairs = pairs_from_lists(instructions, responses)
        cfg = TrainConfig(epochs=steps, batch_size=len(pairs), learning_rate=learning_rate, warmup_steps=0,
                          loss_on=loss_on, dropout=False, max_length=min(256, self.model.config.n_positions))
        on_step = (lambda s: print(f"step {s.step:3d}  Loss: {s.loss:.4f}")) if verbose else None
        return Trainer(self.model, self.tokenizer, pairs, cfg).run(on_step=on_step)

    def respond(self, instruction: str, **kwargs) -> str:
        return generate(self.model, self.tokenizer, instruction, **kwargs)


def tune_customer_service(instructions: list, responses: list, model_name: str = "auto") -> None:
    model = CustomerServiceTuner(model_name)
    model.simulate_tune(instructions, responses)


__all__ = ["CustomerServiceTuner", "tune_customer_service"]
