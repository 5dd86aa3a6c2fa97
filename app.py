"""jaxtune's Gradio app: paste or upload instruction/response pairs, train GPT-2 in JAX, try it, export it.

    python app.py        # http://127.0.0.1:7860 ; on a Hugging Face Space it runs as it is

Only the front end lives here: loading, training, generating and saving are jaxtune's public functions, the
same ones the command line calls. Each browser session has its own data, models and results.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import jax
import numpy as np
import pandas as pd
from flax import nnx

import jaxtune
from jaxtune.checkpoint import EMBEDDED, ModelLoadError, hub_reachable, offline_tokenizer
from jaxtune.config import LOSS_MODES, TrainConfig
from jaxtune.data import (REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES, DataError, encode,
                          inspect_rows, read_pairs)

EXAMPLE_DATA = Path(__file__).parent / "examples" / "customer_service.jsonl"
CONCURRENT_RUNS = int(os.environ.get("JAXTUNE_CONCURRENT_RUNS", "1"))  # training runs at once; others queue
MAX_TRAIN_SECONDS = int(os.environ.get("JAXTUNE_MAX_TRAIN_SECONDS", "3600"))  # a run is stopped after this long
MODEL_CHOICES = ["auto", EMBEDDED, "gpt2", "distilgpt2", "gpt2-medium"]
HEADERS = ["Instruction", "Response"]
TOKENIZER = offline_tokenizer()  # GPT-2's vocabulary, for previews before any model is loaded


_BASES: dict[str, tuple] = {}
_BASES_LOCK = threading.Lock()


def _shared_base(name: str):
    """Base models are read-only (training copies the weights), so all sessions share one copy of each."""
    with _BASES_LOCK:
        if name not in _BASES:
            if len(_BASES) >= 2:  # keep memory bounded on a small Space: drop the oldest
                _BASES.pop(next(iter(_BASES)))
            _BASES[name] = jaxtune.load(name)
        return _BASES[name]


class Session:
    """One browser session's models and results. Deleted (and its run stopped) when the tab closes."""

    def __init__(self):
        self.model_name: str | None = None
        self.base = self.tuned = self.tokenizer = None
        self.stop = threading.Event()
        self.history: list[dict] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="jaxtune-app-"))

    def base_model(self, name: str):
        if self.base is None or self.model_name != name:
            self.base, self.tokenizer = _shared_base(name)
            self.model_name, self.tuned, self.history = name, None, []
        return self.base, self.tokenizer

    def close(self):
        self.stop.set()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _close(session):
    if isinstance(session, Session):
        session.close()


# ---------------------------------------------------------------------------------------------- data
def _rows(table) -> list[list]:
    if table is None:
        return []
    if isinstance(table, pd.DataFrame):
        return table.fillna("").astype(str).values.tolist()
    return [list(r) for r in (table.get("data", []) if isinstance(table, dict) else table)]


def load_example():
    pairs = read_pairs(EXAMPLE_DATA)
    return pd.DataFrame([[p.instruction, p.response] for p in pairs], columns=HEADERS)


def upload_file(file, instruction_column, response_column, table):
    if file is None:
        return table
    path = file if isinstance(file, str) else file.name
    try:
        pairs = read_pairs(path, instruction_column=instruction_column.strip() or None,
                           response_column=response_column.strip() or None)
    except DataError as e:
        raise gr.Error(f"{e}. Your table was left as it was.", title="Could not read the file")
    gr.Info(f"Loaded {len(pairs)} pairs from {Path(path).name}")
    return pd.DataFrame([[p.instruction, p.response] for p in pairs], columns=HEADERS)


def preview(table, row_number, max_length, loss_on):
    """The chosen row as the model sees it, tokens carrying loss highlighted; counts and problems."""
    rows = _rows(table)
    report = inspect_rows(rows, TOKENIZER, max_length=int(max_length), loss_on=loss_on)
    counts = f"**{report.summary()}**"
    issues = [f"- ⛔ {p}" for p in report.problems] + [f"- ⚠️ {w}" for w in report.warnings]
    problems = "\n".join(issues[:20]) + (f"\n- … and {len(issues) - 20} more" if len(issues) > 20 else "")
    if not report.pairs:
        return [("Add at least one row with an instruction and a response.", None)], counts, problems
    index = min(max(int(row_number or 1), 1), len(report.pairs)) - 1
    pair = report.pairs[index]
    e = encode(TOKENIZER, pair.instruction, pair.response, loss_on=loss_on, max_length=int(max_length))
    spans = [(TOKENIZER.decode([t]) if t != TOKENIZER.eos_token_id else "<|endoftext|>", "loss" if m else None)
             for t, m in zip(e.input_ids.tolist(), e.loss_mask.tolist())]
    return spans, counts + f" · showing {pair.where}", problems


# ---------------------------------------------------------------------------------------------- train
def _progress_html(step=0, total=0, eta=None, tps=None, loss=None, note="") -> str:
    pct = 100.0 * step / total if total else 0.0
    bits = [f"step {step}/{total}" if total else "not started", f"{pct:.0f}%"]
    if eta is not None:
        bits.append(f"ETA {int(eta // 60)}m {int(eta % 60):02d}s")
    if tps:
        bits.append(f"{tps:,.0f} tokens/s")
    if loss is not None:
        bits.append(f"loss {loss:.4f}")
    return (f'<div class="jt-progress"><div class="jt-bar" style="width:{pct:.1f}%"></div></div>'
            f'<div class="jt-progress-text">{" · ".join(bits)}{(" — " + note) if note else ""}</div>')


def _plot(history) -> pd.DataFrame:
    rows = [(h["step"], h["loss"], "train") for h in history]
    rows += [(h["step"], h["val_loss"], "validation") for h in history if h.get("val_loss") is not None]
    df = pd.DataFrame(rows, columns=["step", "loss", "split"])  # typed, so the plot's axes are quantitative
    return df.astype({"step": "int64", "loss": "float64", "split": "str"})


def train_run(table, model_name, loss_on, epochs, batch_size, learning_rate, max_length, warmup_steps, seed,
              precision, validation_fraction, pack, session):
    session = session if isinstance(session, Session) else Session()
    report = inspect_rows(_rows(table), TOKENIZER, max_length=int(max_length), loss_on=loss_on)
    if report.problems:
        raise gr.Error("Fix these rows first:\n" + "\n".join(report.problems[:10]), title="Data problems")
    if not report.pairs:
        raise gr.Error("The table has no pairs. Add rows or load the example data.", title="No data")
    log = [f"{report.summary()}"]
    yield _progress_html(note="loading model"), None, "\n".join(log), session
    try:
        base, tokenizer = session.base_model(model_name.strip() or "auto")
    except (ModelLoadError, jaxtune.ConfigError) as e:
        raise gr.Error(str(e), title="Could not load the model")
    log.append(f"model: {getattr(base, 'source', model_name)} ({jaxtune.model.num_params(base) / 1e6:.1f}M parameters)")
    pairs = report.pairs
    val_pairs = None
    if validation_fraction and len(pairs) >= 4:
        order = np.random.default_rng(int(seed)).permutation(len(pairs))
        n_val = max(1, int(round(len(pairs) * validation_fraction)))
        val_pairs = [pairs[i] for i in order[:n_val]]
        pairs = [pairs[i] for i in order[n_val:]]
        log.append(f"validation: {len(val_pairs)} pairs held out")
    try:
        cfg = TrainConfig(epochs=int(epochs), batch_size=int(batch_size), learning_rate=float(learning_rate),
                          max_length=min(int(max_length), base.config.n_positions), loss_on=loss_on, seed=int(seed),
                          warmup_steps=int(warmup_steps), dtype=precision, pack=bool(pack))
        model = nnx.clone(base)
        trainer = jaxtune.Trainer(model, tokenizer, pairs, cfg, validation_pairs=val_pairs)
    except (ValueError, jaxtune.TrainingError) as e:
        raise gr.Error(str(e), title="Cannot train with these settings")
    n = trainer.total_steps
    log.append(f"training {n} step{'s' * (n != 1)} on {jax.default_backend()} (the first compiles); real tokens "
               f"fill {trainer.planned_real_token_share:.0%} of the computed positions{' (packed)' if pack else ''}")
    session.stop.clear()
    session.history = []
    steps: queue.Queue = queue.Queue()
    outcome: dict = {}
    deadline = time.monotonic() + MAX_TRAIN_SECONDS

    def work():
        try:
            outcome["result"] = trainer.run(on_step=steps.put, eval_every=max(1, trainer.total_steps // 10),
                                            should_stop=lambda: session.stop.is_set() or time.monotonic() > deadline)
        except Exception as e:  # noqa: BLE001 - shown in the UI below
            outcome["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    last = None
    try:
        while thread.is_alive() or not steps.empty():
            try:
                last = steps.get(timeout=0.5)
            except queue.Empty:
                continue
            session.history.append(last.to_dict())
            if last.step == 1 or last.step % 10 == 0 or last.val_loss is not None:
                log.append(f"step {last.step}: loss {last.loss:.4f}" +
                           (f", validation {last.val_loss:.4f}" if last.val_loss is not None else ""))
            yield (_progress_html(last.step, last.total_steps, last.eta, last.tokens_per_sec, last.loss),
                   _plot(session.history), "\n".join(log[-12:]), session)
    finally:  # the client went away (tab closed, cancelled): stop the run so it does not hold the machine
        if thread.is_alive():
            session.stop.set()
            thread.join()
    if "error" in outcome:
        raise gr.Error(f"Training failed: {outcome['error']}", title="Training failed")
    result = outcome["result"]
    session.tuned = model
    note = "done"
    if result.diverged:
        note = "stopped: the loss is not a number"
        log.append(f"⛔ {result.stopped}")
        gr.Warning(result.stopped, title="Training stopped")
    elif result.stopped:
        note = f"stopped after step {result.steps}; the model keeps what it learned"
        log.append(note)
    else:
        memory = "" if result.peak_memory is None else f", peak device memory {result.peak_memory / 2**30:.2f} GiB"
        log.append(f"finished {result.steps} step{'s' * (result.steps != 1)} in {result.seconds:.1f}s{memory}")
    total = trainer.total_steps
    yield (_progress_html(result.steps, total, 0 if not result.stopped else None,
                          last.tokens_per_sec if last else None, last.loss if last else None, note),
           _plot(session.history), "\n".join(log[-12:]), session)


def stop_run(session):
    if isinstance(session, Session):
        session.stop.set()
    return "Stopping after the current step…"


# ---------------------------------------------------------------------------------------------- try
def try_models(instruction, temperature, top_p, max_new_tokens, model_name, session):
    session = session if isinstance(session, Session) else Session()
    if not instruction or not instruction.strip():
        raise gr.Error("Type an instruction first.", title="No instruction")
    try:
        base, tokenizer = session.base_model(model_name.strip() or "auto") if session.base is None else (session.base, session.tokenizer)
    except (ModelLoadError, jaxtune.ConfigError) as e:
        raise gr.Error(str(e), title="Could not load the model")
    kw = dict(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens))
    base_text, tuned_text = "", "" if session.tuned is not None else "(train a model in step 2 first)"
    streams = [("base", jaxtune.stream(base, tokenizer, instruction, **kw))]
    if session.tuned is not None:
        streams.append(("tuned", jaxtune.stream(session.tuned, tokenizer, instruction, **kw)))
    while streams:  # alternate between the two models so both answers grow side by side
        for item in list(streams):
            name, it = item
            try:
                text = next(it)
            except StopIteration:
                streams.remove(item)
                continue
            if name == "base":
                base_text = text
            else:
                tuned_text = text
        yield base_text, tuned_text, session
    yield base_text or "(empty response)", tuned_text or "(empty response)", session


# ---------------------------------------------------------------------------------------------- export
def _saved_dir(session) -> Path:
    if not isinstance(session, Session) or session.tuned is None:
        raise gr.Error("There is no tuned model yet: train one in step 2.", title="Nothing to export")
    out = session.workdir / "jaxtune-model"
    jaxtune.save(session.tuned, session.tokenizer, out,
                 extra_files={"metrics.jsonl": "".join(json.dumps(h) + "\n" for h in session.history)})
    return out


def export_zip(session):
    out = _saved_dir(session)
    return gr.File(value=shutil.make_archive(str(session.workdir / "jaxtune-model"), "zip", out), visible=True)


def push_to_hub(repo_id, token, private, session):
    if not repo_id.strip() or "/" not in repo_id:
        raise gr.Error("Give the repository as user/name.", title="Repository name")
    if not token.strip():
        raise gr.Error("Paste a Hugging Face token with write access.", title="Token needed")
    out = _saved_dir(session)
    if not hub_reachable():
        raise gr.Error("The Hugging Face hub cannot be reached from this machine; download the zip instead.",
                       title="No network")
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token.strip())
        api.create_repo(repo_id.strip(), private=bool(private), exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo_id.strip(), commit_message="Upload model tuned with jaxtune")
    except Exception as e:  # noqa: BLE001 - the hub's own message is the useful one
        raise gr.Error(f"Upload failed: {e}", title="Upload failed")
    return f"Uploaded to https://huggingface.co/{repo_id.strip()}"


# ---------------------------------------------------------------------------------------------- page
CSS = """
.jt-progress { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.jt-bar { height: 100%; background: linear-gradient(90deg, #f97316, #fb923c); transition: width .3s; }
.jt-progress-text { font-size: 0.9em; margin-top: 4px; color: var(--body-text-color-subdued); }
.jt-step h2 { margin-bottom: 0; }
"""


def backend_info() -> str:
    devices = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    return f"JAX {jax.__version__} · backend **{jax.default_backend()}** · {jax.device_count()} device(s): {devices}"


def build_app() -> gr.Blocks:
    with gr.Blocks(title="jaxtune: instruction-tune GPT-2 in JAX") as demo:
        session = gr.State(None, time_to_live=4 * 3600, delete_callback=_close)
        gr.Markdown("# jaxtune\nInstruction-tune a GPT-2 model on your own instruction/response pairs, in JAX. "
                    "Work through the four steps from top to bottom.")

        with gr.Column(variant="panel", elem_classes="jt-step"):
            gr.Markdown("## ① Data\nEdit the table, load the example help-desk data, or upload JSONL, JSON or CSV.")
            table = gr.Dataframe(value=pd.DataFrame(list(zip(REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES)), columns=HEADERS),
                                 headers=HEADERS, column_count=(2, "fixed"), row_count=(2, "dynamic"),
                                 datatype=["str", "str"], interactive=True, wrap=True, label="Pairs",
                                 elem_id="pairs-table", max_height=360)
            with gr.Row(equal_height=True):
                with gr.Column(scale=1):
                    example_btn = gr.Button("Load example data", elem_id="load-example")
                    instruction_col = gr.Textbox(label="Instruction column", placeholder="instruction (auto)")
                    response_col = gr.Textbox(label="Response column", placeholder="response / output (auto)")
                upload = gr.File(label="Upload pairs (.jsonl, .json, .csv)", file_types=[".jsonl", ".json", ".csv"],
                                 elem_id="upload", height=190, scale=2)
            with gr.Row():
                with gr.Column(scale=3):
                    highlighted = gr.HighlightedText(label="What the model sees (highlighted tokens carry loss)",
                                                     color_map={"loss": "#fb923c"}, combine_adjacent=False,
                                                     show_legend=True, elem_id="preview")
                with gr.Column(scale=2):
                    preview_row = gr.Number(value=1, precision=0, minimum=1, label="Preview row")
                    counts = gr.Markdown(elem_id="counts")
                    problems = gr.Markdown(elem_id="problems")

        with gr.Column(variant="panel", elem_classes="jt-step"):
            gr.Markdown("## ② Train")
            with gr.Row():
                model_name = gr.Dropdown(MODEL_CHOICES, value="auto", allow_custom_value=True, label="Model",
                                         info="auto: gpt2 if it can be had, else the embedded offline model (untrained)")
                loss_on = gr.Radio(list(LOSS_MODES), value="response", label="Loss on",
                                   info="response: answer + EOS · all: every token · reference: the original recipe")
                precision = gr.Radio(["float32", "bfloat16"], value="float32", label="Precision")
            with gr.Row():
                epochs = gr.Number(value=3, precision=0, minimum=1, label="Epochs")
                batch_size = gr.Number(value=8, precision=0, minimum=1, label="Batch size")
                learning_rate = gr.Number(value=5e-4, minimum=0, label="Learning rate")
                max_length = gr.Number(value=128, precision=0, minimum=8, label="Max length (tokens)")
                warmup = gr.Number(value=10, precision=0, minimum=0, label="Warmup steps")
                seed = gr.Number(value=0, precision=0, label="Seed")
                val_fraction = gr.Slider(0, 0.5, value=0.0, step=0.05, label="Validation fraction")
                pack = gr.Checkbox(value=False, label="Pack examples", elem_id="pack",
                                   info="several examples per row: little padding, fewer and larger steps")
            gr.Markdown(backend_info(), elem_id="backend")
            with gr.Row():
                train_btn = gr.Button("Start training", variant="primary", elem_id="train")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            progress = gr.HTML(_progress_html(), elem_id="progress")
            with gr.Row():
                # starts empty (None): an empty frame would fix the colour scale with no series in it
                plot = gr.LinePlot(None, x="step", y="loss", color="split", label="Loss", height=280,
                                   color_map={"train": "#f97316", "validation": "#2563eb"},
                                   elem_id="loss-plot")
                log = gr.Textbox(label="Log", lines=10, max_lines=12, elem_id="log", autoscroll=True)

        with gr.Column(variant="panel", elem_classes="jt-step"):
            gr.Markdown("## ③ Try")
            with gr.Row():
                instruction = gr.Textbox(label="Instruction", value="Answer politely", scale=4, elem_id="instruction")
                try_btn = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
            with gr.Row():
                temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                max_new = gr.Slider(8, 256, value=64, step=8, label="Max new tokens")
            with gr.Row():
                base_out = gr.Textbox(label="Base model", lines=4, elem_id="base-out")
                tuned_out = gr.Textbox(label="Tuned model", lines=4, elem_id="tuned-out")

        with gr.Column(variant="panel", elem_classes="jt-step"):
            gr.Markdown("## ④ Export\nA zip of the Hugging Face directory: it loads in PyTorch `transformers` as it is.")
            with gr.Row():
                zip_btn = gr.Button("Download model (.zip)", elem_id="export", scale=1)
                zip_file = gr.File(label="Model", elem_id="zip", visible=False, scale=2)
            with gr.Row():
                repo = gr.Textbox(label="Hub repository", placeholder="you/my-helpdesk-gpt2")
                token = gr.Textbox(label="Hugging Face token", type="password")
                private = gr.Checkbox(value=True, label="Private")
                push_btn = gr.Button("Push to hub")
            push_status = gr.Markdown()

        preview_inputs = [table, preview_row, max_length, loss_on]
        preview_outputs = [highlighted, counts, problems]
        demo.load(preview, preview_inputs, preview_outputs, api_name="preview")  # registered first: it owns the name
        example_btn.click(load_example, None, table, api_name="load_example").then(
            preview, preview_inputs, preview_outputs, api_visibility="private")
        upload.upload(upload_file, [upload, instruction_col, response_col, table], table, api_name="upload") \
            .then(preview, preview_inputs, preview_outputs, api_visibility="private")
        for trigger in (table.input, preview_row.change, max_length.change, loss_on.change):
            trigger(preview, preview_inputs, preview_outputs, show_progress="hidden", api_visibility="private")
        train_btn.click(train_run, [table, model_name, loss_on, epochs, batch_size, learning_rate, max_length, warmup,
                                    seed, precision, val_fraction, pack, session], [progress, plot, log, session],
                        api_name="train", concurrency_limit=CONCURRENT_RUNS, concurrency_id="train",
                        show_progress="minimal")
        stop_btn.click(stop_run, session, log, api_name="stop", concurrency_limit=None, queue=False)
        try_btn.click(try_models, [instruction, temperature, top_p, max_new, model_name, session],
                      [base_out, tuned_out, session], api_name="generate", concurrency_limit=2)
        instruction.submit(try_models, [instruction, temperature, top_p, max_new, model_name, session],
                           [base_out, tuned_out, session], api_visibility="private")
        zip_btn.click(export_zip, session, zip_file, api_name="export")
        push_btn.click(push_to_hub, [repo, token, private, session], push_status, api_name="push")
    return demo


demo = build_app()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=4).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        css=CSS, theme=gr.themes.Soft(primary_hue="orange"), show_error=True)
