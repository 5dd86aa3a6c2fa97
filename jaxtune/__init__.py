"""jaxtune: instruction-tune GPT-2 models in JAX."""

import warnings

from jaxtune.launch import quiet_ctrl_c, restart_with_huge_pages

restart_with_huge_pages()  # only jaxtune's own programs, once, before JAX is imported: see jaxtune/launch.py
# `python -m jaxtune.launch` (its check) runs a module this file has just imported, which runpy warns about
warnings.filterwarnings("ignore", "'jaxtune.launch' found in sys.modules", RuntimeWarning)

with quiet_ctrl_c():  # seconds of imports (JAX): in jaxtune's own programs a Ctrl-C ends them with a line
    from jaxtune.checkpoint import EMBEDDED, ModelLoadError, load, offline_tokenizer, save
    from jaxtune.config import HUB_MODELS, LOSS_MODES, PRESETS, ConfigError, GPT2Config, RunConfig, TrainConfig
    from jaxtune.data import DataError, Pair, encode, format_example, format_prompt, pairs_from_lists, read_pairs
    from jaxtune.generate import generate, stream
    from jaxtune.model import GPT2LMHeadModel
    from jaxtune.reference import CustomerServiceTuner, tune_customer_service
    from jaxtune.train import StepMetrics, Trainer, TrainingError, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "load", "save", "offline_tokenizer", "EMBEDDED", "ModelLoadError", "GPT2Config", "TrainConfig", "RunConfig", "ConfigError",
    "PRESETS", "HUB_MODELS", "LOSS_MODES", "DataError", "Pair", "encode", "format_example", "format_prompt",
    "pairs_from_lists", "read_pairs", "generate", "stream", "GPT2LMHeadModel", "CustomerServiceTuner",
    "tune_customer_service", "StepMetrics", "Trainer", "TrainingError", "TrainResult", "train",
]
