"""The reference's example on JAX: print its loss, then take real optimisation steps and answer an instruction.

    python examples/quickstart.py            # gpt2 if cached or reachable, else the embedded offline model
    python examples/quickstart.py --model distilgpt2
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone: the jaxtune beside it
from jaxtune import CustomerServiceTuner, tune_customer_service  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="auto", help="hub id, local directory, 'tiny' or 'auto' (default)")
parser.add_argument("--steps", type=int, default=30)
args = parser.parse_args()

# The reference's example usage, unchanged.
instructions = ["Answer politely", "Provide price"]
responses = ["Of course, how may I assist you?", "The price is $99."]
tune_customer_service(instructions, responses, model_name=args.model)

# Beyond the reference: real steps, with the loss on the responses and a closing EOS so the model learns to stop.
tuner = CustomerServiceTuner(args.model)
print(f"model: {tuner.model.source}")
tuner.tune(instructions, responses, steps=args.steps, learning_rate=3e-3 if "embedded" in tuner.model.source else 1e-4)
for instruction in instructions:
    print(f"{instruction!r} -> {tuner.respond(instruction)!r}")
