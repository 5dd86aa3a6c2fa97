"""The Gradio app, started as `python app.py` on a loopback port: through its API and in a real browser.

Screenshots of each browser step land in the test's temporary directory (and in $JAXTUNE_SCREENSHOTS if set).
"""

import concurrent.futures
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
import torch
import transformers
import yaml
from gradio_client import Client
from gradio_client.exceptions import AppError

from jaxtune.data import read_pairs

from conftest import start_app

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def app_tmp(tmp_path_factory):
    """The app's TMPDIR: its session folders (jaxtune-app-*) and Gradio's cache."""
    return tmp_path_factory.mktemp("app-tmp")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """The app's JAXTUNE_RUNS_DIR: every run the module's app trains lands here."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def app_log(tmp_path_factory):
    return tmp_path_factory.mktemp("app") / "app.log"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, app_tmp, runs_dir, app_log):
    proc, url = start_app(app_log, drop=["JAXTUNE_CONCURRENT_RUNS"],  # one run trains at a time, the next waits
                          TMPDIR=str(app_tmp), JAXTUNE_RUNS_DIR=str(runs_dir),
                          GRADIO_HEARTBEAT_INTERVAL="1")  # a closed tab is noticed within a second
    yield url
    proc.terminate()
    proc.wait(timeout=30)


TRAIN_ARGS = dict(model_name="tiny", loss_on="response", epochs=4, batch_size=4, learning_rate=3e-3, max_length=64,
                  warmup_steps=2, seed=0, precision="float32", validation_fraction=0.25, pack=False,
                  method="Full fine-tuning", lora_rank=16, keep_best=False)


def _runs(client) -> dict:
    return {r["id"]: r for r in client.predict(api_name="/runs")}


def test_api_end_to_end(app_url, runs_dir, tmp_path, stop_all):
    """Load data, train (the API's /train follows the server's run), stop, generate, export; the zip loads in PyTorch
    transformers, and the run's folder holds the command line's layout."""
    client = Client(app_url, verbose=False)
    table = client.predict(api_name="/load_example")
    example = read_pairs(ROOT / "examples" / "customer_service.jsonl")
    assert len(example) > 200 and table["headers"] == ["Instruction", "Response"]
    assert table["data"] == [[p.instruction, p.response] for p in example[:200]]  # the page gets the first 200
    spans, counts, problems = client.predict(table, 1, 128, "response", api_name="/preview")
    assert f"{len(example)} pairs" in counts and "0 will be truncated" in counts and not problems  # all of them
    _, counts, problems = client.predict(table, 1, 64, "response", api_name="/preview")
    assert "1 will be truncated" in counts and "longer than 64 tokens" in problems
    job = client.submit(table, *TRAIN_ARGS.values(), api_name="/train")
    stopping = False
    for progress, plot, log in job:
        step = re.search(r"step (\d+)/", progress)
        if step and int(step.group(1)) >= 25 and not stopping:
            stopping = True
            assert "Stopping" in client.predict(api_name="/stop")
    progress, plot, log = job.result(timeout=120)
    assert "stopped by request after step" in progress and "keeps what it learned" in progress
    steps = [row[0] for row in plot["data"] if row[2] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and 25 <= len(steps) < 4 * 58
    assert any(row[2] == "validation" and row[1] is not None for row in plot["data"])
    # the whole log: the data summary and the model stay at its top, past the 12 lines the page used to keep
    lines = log.splitlines()
    assert len(lines) > 12 and f"{len(example)} pairs" in lines[0] and any("model: tiny" in x for x in lines[:6])
    [run] = [r for r in _runs(client).values() if r["status"] == "stopped" and r["pairs"] == len(example)]
    folder = Path(run["dir"])
    assert folder.parent == runs_dir and {"config.yaml", "metrics.jsonl", "train.log", "run.json", "data.jsonl",
                                          "model.safetensors", "checkpoints"} <= {p.name for p in folder.iterdir()}
    assert (folder / "train.log").read_text().splitlines() == lines  # the page shows the file, every line of it
    base, tuned, other = client.predict("Where is my order?", 0.0, 0.95, 16, "tiny", api_name="/generate")
    assert base and tuned and "train a model" not in tuned and other == ""
    zip_path = client.predict(api_name="/export")
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
        z.extractall(tmp_path / "model")
    assert not any(n.startswith("checkpoints") or n in ("run.json", "data.jsonl", "train.log") for n in names)
    pt = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tok("Hello world").input_ids == [15496, 995] and pt.config.n_layer == 2
    metrics = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == steps
    with torch.no_grad():
        assert torch.isfinite(pt(torch.tensor([[15496, 995]])).logits).all()


ONE_ROW = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"]]}


def test_bad_input_gets_clear_messages(app_url, app_log, tmp_path):
    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="no pairs"):
        client.predict({"headers": ["Instruction", "Response"], "data": [["", ""]]}, *TRAIN_ARGS.values(),
                       api_name="/train")
    with pytest.raises(AppError, match=r"row 2: empty response"):
        client.predict({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", " "]]},
                       *TRAIN_ARGS.values(), api_name="/train")
    def raw(api, *data):  # a lone surrogate: JSON can carry it (escaped), UTF-8 cannot, so no client library sends it
        event = requests.post(f"{app_url.rstrip('/')}/gradio_api/call/{api}", data=json.dumps({"data": list(data)}),
                              headers={"Content-Type": "application/json"}, timeout=60).json()["event_id"]
        return requests.get(f"{app_url.rstrip('/')}/gradio_api/call/{api}/{event}", timeout=120).text

    rows = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Go\ud800"]]}
    assert "Row 2's response holds a character that is not valid text at position 3" in raw("train", rows,
                                                                                              *TRAIN_ARGS.values())
    assert "Instruction holds a character that is not valid text at position 1" in raw("generate", "\udfff", 0.0, 0.95,
                                                                                          8, "tiny", None, None)
    said = raw("train", "A" * 100_000, "tiny")  # too few values, one of them large: one line in the log, not the request
    assert "This request does not fit /train: it takes 16 values and the request gave 2. The page's 'Use via API' " \
        "link" in said
    assert "train refused before it ran" in app_log.read_text() and "A" * 1000 not in app_log.read_text()
    args = dict(TRAIN_ARGS, model_name="nobody/no-such-model")
    with pytest.raises(AppError, match="not in the local Hugging Face cache"):
        client.predict({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"]]}, *args.values(),
                       api_name="/train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{oops\n')
    from gradio_client import handle_file

    with pytest.raises(AppError, match=r"line 2: not valid JSON.*left as it was"):
        client.predict(handle_file(str(bad)), "", "", ONE_ROW, api_name="/upload")
    bad.write_text('{"instruction": "a", "response": "b"}\n' + "".join(f'{{"instruction": "q{n}", "response": ""}}\n'
                                                                      for n in range(7)))  # 7 bad rows: a list
    with pytest.raises(AppError) as listed:
        client.predict(handle_file(str(bad)), "", "", ONE_ROW, api_name="/upload")
    lines = str(listed.value).splitlines()  # the closing sentence was the last item's: "- and 2 more. Your table ..."
    assert lines[-3:-1] == ["- and 2 more", ""] and lines[-1].startswith("Your table was left as it was"), lines
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Translate", "input": "chat", "output": "cat"}]))
    table, note = client.predict(handle_file(str(alpaca)), "", "", ONE_ROW, api_name="/upload")
    assert table["data"] == [["Translate\n\nchat", "cat"]] and note == ""  # all shown: nothing to say
    with pytest.raises(AppError, match="no tuned model yet"):
        Client(app_url, verbose=False).predict(api_name="/export")
    with pytest.raises(AppError, match=r"There is no run 'gone' here \(deleted\?\)\. Pick a run to export"):
        Client(app_url, verbose=False).predict("gone", api_name="/export")
    long_instruction = {"headers": ["Instruction", "Response"], "data": [["word " * 80, "Hello"]]}
    with pytest.raises(AppError, match=r"No row can train: row 1: nothing of the response fits in max_length 64"):
        client.predict(long_instruction, *TRAIN_ARGS.values(), api_name="/train")


def test_desktop_loads_local_model_directories(app_url, hf_dir):
    """Not public: the model field also takes a directory on this machine."""
    base, tuned, _ = Client(app_url, verbose=False).predict("Hi", 0.0, 0.95, 8, str(hf_dir), api_name="/generate")
    assert base and "train a model" in tuned


def test_two_runs_are_both_kept_listed_and_compared(app_url, runs_dir):
    """A second Start discards nothing: both runs are listed, both folders hold a model, and Try answers with both
    beside the base. Another session's Try has no run of its own to default to."""
    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    rows = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]}
    _, _, log = first.predict(rows, *dict(TRAIN_ARGS, epochs=1, validation_fraction=0, pack=True).values(),
                              api_name="/train")
    assert "; 1 step on cpu" in log and "(packed)" in log  # both pairs in one packed row
    _, _, log = first.predict(rows, *dict(TRAIN_ARGS, epochs=30, validation_fraction=0).values(), api_name="/train")
    assert "; 30 steps on cpu" in log
    mine = [r for r in _runs(first).values() if r["pairs"] == 2 and r["status"] == "finished"][:2]
    assert [r["total_steps"] for r in mine] == [30, 1]  # newest first
    for run in mine:
        folder = Path(run["dir"])
        assert folder.parent == runs_dir and (folder / "model.safetensors").exists()
        assert json.loads((folder / "run.json").read_text())["status"] == "finished"
    base, a, b = first.predict("Hi", 0.0, 0.95, 8, "tiny", mine[0]["id"], mine[1]["id"], api_name="/generate")
    assert a.startswith("Hello") and b and b != a and base != a  # 30 steps learned the pair, 1 step did not
    assert first.predict(api_name="/export").endswith(".zip")
    _, tuned, _ = second.predict("Hi", 0.0, 0.95, 8, "tiny", api_name="/generate")
    assert "train a model" in tuned


IDS = [[15496, 995, 11, 314, 716, 257, 1332]]


@pytest.mark.parametrize("method, label, flags", [("LoRA", "LoRA r4", " --lora-rank 4"),
                                                  ("QLoRA", "QLoRA r4", " --lora-rank 4 --quantize nf4")])
def test_lora_run_tries_and_exports_its_adapter_and_its_merged_model(app_url, tmp_path, monkeypatch, method, label,
                                                                     flags):
    """Method LoRA or QLoRA (rank 4) on the embedded model: the runs list says so, Show command passes its flags, Try
    answers with the adapter, the adapter zip (with the embedded base beside it) loads in PyTorch PEFT and the merged
    zip in transformers, both with jaxtune's logits to 1e-4."""
    import jax.numpy as jnp
    from peft import PeftModel

    import jaxtune

    client = Client(app_url, verbose=False)
    args = dict(TRAIN_ARGS, epochs=40, learning_rate=1e-2, validation_fraction=0, method=method, lora_rank=4)
    _, _, log = client.predict(TWO_ROWS, **args, api_name="/train")
    assert "LoRA: rank 4 on c_attn" in log and "the base is frozen" in log and ("held in nf4" in log) == (
        method == "QLoRA")
    run = next(r for r in client.predict(api_name="/runs") if r["pairs"] == 2)  # newest first
    folder = Path(run["dir"])
    assert run["status"] == "finished" and run["method"] == label
    assert (folder / "adapter_model.safetensors").exists() and not (folder / "model.safetensors").exists()
    command, _ = client.predict(api_name="/command")
    command = command["value"] if isinstance(command, dict) else command
    assert command.endswith(flags)
    ours_model, tok = jaxtune.load(str(folder))
    ours = np.asarray(ours_model(jnp.asarray(IDS)))
    _, answer, _ = client.predict("Hi", 0.0, 0.95, 8, "tiny", run["id"], api_name="/generate")
    assert answer == jaxtune.generate(ours_model, tok, "Hi", max_new_tokens=8)  # Try answers with the adapter

    with zipfile.ZipFile(client.predict(run["id"], "adapter", api_name="/export")) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer_config.json",
            "base/model.safetensors", "base/config.json"} <= names
    assert "model.safetensors" not in names and not any(n.startswith(("checkpoints", "merged")) for n in names)
    adapter_bytes = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir() if f.is_file())
    assert adapter_bytes < 5 * 2**20  # the adapter and its files; the 27 MB base is beside them
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "adapter" / "base")
    peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        peft_logits = peft(torch.tensor(IDS)).logits.numpy()
    assert np.abs(peft_logits - ours).max() < 1e-4
    plain = np.asarray(jaxtune.load(str(folder / "base"))[0](jnp.asarray(IDS)))
    assert np.abs(plain - ours).max() > 1e-3  # the adapter changed the model
    card = (tmp_path / "adapter" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", str(tmp_path / "adapter"))
    monkeypatch.chdir(tmp_path)  # the card's code, run from outside the folder: it finds the base beside the adapter
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {})
    said = printed.getvalue().strip()
    if method == "LoRA":  # QLoRA's 4-bit base answers apart from PEFT's float32 one; the logits above hold both
        assert said == jaxtune.generate(ours_model, tok, "Where is my order?", max_new_tokens=64)
    assert "output" not in yaml.safe_load((tmp_path / "adapter" / "config.yaml").read_text())

    fresh = Client(app_url, verbose=False)  # a client with no session yet: its export by id still arrives
    with zipfile.ZipFile(fresh.predict(run["id"], "merged", api_name="/export")) as z:
        z.extractall(tmp_path / "merged")
    merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert np.abs(merged(torch.tensor(IDS)).logits.numpy() - ours).max() < 1e-4
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "library_name: transformers" in card and "| steps | 40 |" in card
    shipped = yaml.safe_load((tmp_path / "merged" / "config.yaml").read_text())  # the card's config, as it says
    assert shipped == yaml.safe_load(card.split("```yaml\n")[1].split("```")[0]) and "output" not in shipped
    with pytest.raises(AppError, match=r"Export must be one of adapter, merged; got 'weights'"):
        client.predict(run["id"], "weights", api_name="/export")
    with pytest.raises(AppError, match=r"LoRA rank must be a whole number from 1 to 256; got 0\. Pick a rank"):
        client.predict(TWO_ROWS, **dict(args, lora_rank=0), api_name="/train")
    with pytest.raises(AppError, match=r"Method must be one of Full fine-tuning, LoRA, QLoRA; got 'lora'"):
        client.predict(TWO_ROWS, **dict(args, method="lora"), api_name="/train")


def test_the_command_line_repeats_an_app_run_exactly(app_url, tmp_path):
    """Show command's config.yaml, given to `python -m jaxtune train`, reproduces the app run's losses."""
    client = Client(app_url, verbose=False)
    rows = {"headers": ["Instruction", "Response"],
            "data": [[f"Question {i}?", f"Answer number {i}."] for i in range(8)]}
    client.predict(rows, *dict(TRAIN_ARGS, epochs=3, batch_size=2).values(), api_name="/train")
    command, text = (x["value"] if isinstance(x, dict) else x for x in client.predict(api_name="/command"))
    assert command.startswith("python -m jaxtune train --config ") and " --output " in command  # one line, to copy
    assert "\n" not in command
    config = Path(command.split("--config ")[1].split(" --output")[0])
    assert yaml.safe_load(text) == yaml.safe_load(config.read_text())  # and the config, to copy on its own
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "jaxtune", "train", "--config", str(config), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-2000:]

    def losses(folder):
        return [(m["step"], m["loss"], m.get("val_loss")) for m in map(json.loads, (folder / "metrics.jsonl").open())]

    app_losses = losses(config.parent)
    assert len(app_losses) == 9 and any(v is not None for _, _, v in app_losses)
    assert losses(out) == app_losses  # to the bit: same seed, same data, the same `execute`


def test_no_pytorch_warning_at_start(tmp_path):
    """On a Space torch is not installed: transformers' "PyTorch was not found" must not reach the app's output."""
    hide_torch = ("import importlib.machinery as m, runpy, sys\n"
                  "find = m.PathFinder.find_spec\n"
                  "m.PathFinder.find_spec = staticmethod(lambda n, p=None, t=None: None if n.split('.')[0] == 'torch' "
                  "else find(n, p, t))\n"
                  "sys.argv = ['app.py']\n"
                  "import app\n"
                  "assert 'torch' not in sys.modules\n"
                  "print('imported', app.backend_info())\n")
    done = subprocess.run([sys.executable, "-c", hide_torch], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
                                   JAXTUNE_RUNS_DIR=str(tmp_path / "runs")))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imported JAX" in done.stdout and "backend **cpu**" in done.stdout
    assert "PyTorch" not in done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _shot(page, tmp_path, name):
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("JAXTUNE_SCREENSHOTS"):
        Path(os.environ["JAXTUNE_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["JAXTUNE_SCREENSHOTS"]) / path.name)
    assert path.stat().st_size > 10_000


def _progress_text(page):
    return page.locator("#progress .jt-progress-text").inner_text()


PROGRESS_JS = "(document.querySelector('#progress .jt-progress-text') || {innerText: ''}).innerText"


def _wait_progress(page, regex, timeout=120_000):
    page.wait_for_function(f"() => /{regex}/.test({PROGRESS_JS})", timeout=timeout)
    return _progress_text(page)


def _step(page) -> int:
    return int(_progress_text(page).split("step ")[1].split("/")[0])


def _pick_model(page, name):
    """Pick a model and wait for its defaults to land (they would overwrite values typed before)."""
    model = page.get_by_role("combobox", name="Model")
    model.click()
    model.fill(name)
    page.keyboard.press("Enter")
    page.wait_for_function("n => document.querySelector('#defaults-note').innerText.startsWith(n + ' ')", arg=name)


def _open(browser, app_url, context=None):
    page = context.new_page() if context else browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    page.wait_for_function("() => document.querySelector('#counts') && document.querySelector('#counts').innerText.includes('pairs')")
    return page


CLIPPED_JS = """() => [...document.querySelectorAll(['#train-step', '#eval-step'].flatMap(s =>
    [s + ' label', s + ' [data-testid="block-info"]', s + ' span']).join(', '))]
    .filter(e => e.offsetParent && e.innerText.trim() && e.children.length === 0 && e.scrollWidth > e.clientWidth + 1)
    .map(e => e.innerText)"""


def test_browser_layout_at_1280_px_clips_no_label(app_url, browser):
    """At 1280 px every label of the training and evaluation settings is whole, with LoRA's rank shown too, and the
    validation slider shows its maximum."""
    page = _open(browser, app_url)
    assert page.evaluate(CLIPPED_JS) == [] and not page.locator("#lora-rank").is_visible()
    for method in ("LoRA", "QLoRA"):
        page.locator("#method").get_by_label(method, exact=True).check()
        page.locator("#lora-rank").wait_for(state="visible")
        assert page.get_by_label("LoRA rank").input_value() == "16" and page.evaluate(CLIPPED_JS) == []
        # the model is auto, which is the untrained embedded model here: the page says what adapters on it give
        page.wait_for_function("() => document.body.innerText.includes('adapters on a frozen random model learn')")
    page.locator("#method").get_by_label("Full fine-tuning").check()
    page.locator("#lora-rank").wait_for(state="hidden")
    pack = page.locator("#pack label").first.bounding_box()
    text = page.get_by_text("Pack examples", exact=True).bounding_box()
    assert text["x"] >= pack["x"] and text["x"] + text["width"] <= pack["x"] + pack["width"] + 1
    assert page.locator("#val-fraction .max_value").inner_text() == "0.5"
    box = page.locator("#val-fraction .max_value").bounding_box()
    slider = page.locator("#val-fraction").bounding_box()
    assert box["width"] > 10 and box["x"] + box["width"] <= slider["x"] + slider["width"]
    page.close()


def test_browser_on_a_390_px_phone_the_page_fits_and_the_table_headers_stay_whole(app_url, browser):
    """The pairs table's header read 'Instructio' over 'n' on a phone."""
    page = _open(browser, app_url, browser.new_context(viewport={"width": 390, "height": 844}))
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # nothing runs off the side
    heights = page.evaluate("""() => [...document.querySelectorAll('#pairs-table thead th')].map(th => {
        const r = document.createRange(); r.selectNodeContents(th);
        return [th.innerText.trim(), r.getClientRects().length > 0 ? r.getBoundingClientRect().height : 0,
                ]; })""")
    assert [h[0] for h in heights][-2:] == ["Instruction", "Response"], heights
    assert heights[-2][1] == heights[-1][1] > 0, heights  # 'Instruction' on one line, as 'Response' (wider) is
    page.context.close()


def test_browser_defaults_follow_the_model(app_url, browser):
    page = _open(browser, app_url)
    _pick_model(page, "tiny")
    page.wait_for_function("() => document.querySelector('#defaults-note').innerText.includes('random weights')")
    assert page.get_by_label("Learning rate").input_value() == "0.005" and page.get_by_label("Epochs").input_value() == "20"
    assert page.get_by_label("Learning rate").evaluate("e => e.validity.valid")  # its step fits small rates
    _pick_model(page, "gpt2")
    page.wait_for_function("() => document.querySelector('#defaults-note').innerText.includes('pretrained')")
    assert page.get_by_label("Learning rate").input_value() == "0.00005" and page.get_by_label("Epochs").input_value() == "3"
    page.get_by_label("Epochs").fill("7")  # the user's own value stays; the line says what the default would be
    page.get_by_label("Epochs").blur()
    _pick_model(page, "tiny")
    page.wait_for_function("() => document.querySelector('#defaults-note').innerText.includes('were kept')")
    assert page.get_by_label("Epochs").input_value() == "7"  # and only it: the others take tiny's defaults
    assert page.get_by_label("Learning rate").input_value() == "0.005"
    assert "Your own values were kept: epochs 7 (default 20)." in page.locator("#defaults-note").inner_text()
    page.get_by_label("Epochs").fill("6")  # typed again: the line names the value now in the field, not the 7
    page.wait_for_function("() => document.querySelector('#defaults-note').innerText.includes('epochs 6 (default 20)')")
    page.get_by_label("Epochs").fill("20")  # the default itself: nothing of the user's to name
    page.wait_for_function("() => !document.querySelector('#defaults-note').innerText.includes('were kept')")
    assert "random weights" in page.locator("#defaults-note").inner_text()
    page.get_by_label("Warmup steps").fill("99999999")  # out of range: said by Start in the app's words, not as
    page.get_by_label("Warmup steps").blur()  # Gradio's bare "Value 99999999 is greater than maximum value" on typing
    page.wait_for_function("() => document.querySelector('#defaults-note').innerText.includes('warmup steps 99,999,999 (default 20)')")
    page.wait_for_timeout(1000)
    assert "greater than maximum" not in page.locator("body").inner_text()
    page.close()


def _edit_table(page, rows):
    cells = page.locator('#pairs-table [data-testid^="cell-"]:visible')

    def edit(index, text):  # wait for the cell's editor to have focus before replacing its text
        cells.nth(index).dblclick()
        page.wait_for_function("() => { const e = document.activeElement; return e && e.closest('#pairs-table') "
                               "&& ['TEXTAREA', 'INPUT'].includes(e.tagName); }", timeout=10_000)
        page.locator("#pairs-table textarea:focus, #pairs-table input:focus").fill(text)
        page.keyboard.press("Enter")
        page.wait_for_function("([i, t]) => document.querySelectorAll('#pairs-table [data-testid^=\"cell-\"]')[i]"
                               ".innerText.trim().startsWith(t)", arg=[index, text], timeout=10_000)

    for r, (instruction, response) in enumerate(rows):
        edit(2 * r, instruction)
        edit(2 * r + 1, response)
    return cells


def test_browser_train_reload_stop_try_export(app_url, app_tmp, browser, tmp_path, stop_all):
    """Start a run, reload the page mid-run (the step count goes on, the plot and the whole log come back, both loss
    series in their colours), stop it, try it beside the base, download it in one click."""
    for left_open in browser.contexts:  # an earlier test's open page would pick this run and make its own zip folder
        left_open.close()
    others = set(app_tmp.glob("jaxtune-app-*"))  # earlier tests' sessions: not this page's to remove
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = _open(browser, app_url, context)
    rows = [("Where is my parcel?", "It ships tomorrow and arrives on Friday."),
            ("Can I pay by card?", "Yes, we accept Visa and Mastercard.")]
    cells = _edit_table(page, rows)
    page.wait_for_function("() => document.querySelector('#preview').innerText.includes('parcel')")
    assert [cells.nth(i).inner_text().replace("\u22ee", "").strip() for i in range(4)] == [t for row in rows for t in row]
    assert "2 pairs" in page.locator("#counts").inner_text()
    assert page.locator("#preview").inner_text().count("<|endoftext|>") == 1
    _shot(page, tmp_path, "1-data")

    _pick_model(page, "tiny")
    page.wait_for_function("() => document.querySelector('#defaults-note').innerText.includes('random weights')")
    page.get_by_label("Epochs").fill("300")
    page.get_by_label("Batch size").fill("1")  # 2 pairs: with a batch of 1, a validation fraction holds one out
    page.get_by_label("Learning rate").fill("0.003")
    page.get_by_label("Warmup steps").fill("2")
    page.locator("#train").click()
    _wait_progress(page, r"step [3-9]\d*\/")
    assert "ETA" in _progress_text(page) and "tokens/s" in _progress_text(page)
    assert page.locator("#progress .jt-bar").evaluate("e => parseFloat(e.style.width)") > 0
    page.wait_for_function("() => document.querySelectorAll('#loss-plot [aria-roledescription=\"point\"]').length >= 3")
    points = page.locator('#loss-plot [aria-roledescription="point"]').evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    losses = [float(p.split("loss: ")[1].split(";")[0]) for p in points if "split: train" in p]
    assert len(losses) >= 3 and all(np.isfinite(losses))
    _shot(page, tmp_path, "2-training")

    before = _step(page)
    page.reload()  # the run is the server's: the page finds it again, and it has gone on meanwhile
    _wait_progress(page, r"step \d+\/", timeout=30_000)
    after = _step(page)
    page.wait_for_function(f"() => {{ const m = {PROGRESS_JS}.match(/step (\\d+)\\//); return m && +m[1] > {after}; }}",
                           timeout=30_000)
    assert after >= before
    log = page.locator("#log textarea").input_value()
    assert "2 pairs" in log.splitlines()[0] and "model: tiny" in log
    page.wait_for_function("() => document.querySelectorAll('#loss-plot [aria-roledescription=\"point\"]').length >= 3")

    _wait_progress(page, r"step ([2-9]\d|\d\d\d+)\/", timeout=120_000)
    page.locator("#stop").click()
    _wait_progress(page, "stopped", timeout=60_000)
    stopped_at = _step(page)
    assert 20 <= stopped_at < 300 and "keeps what it learned" in _progress_text(page)
    page.wait_for_function("() => document.querySelector('#log textarea').value.includes('keeps what it learned')")
    page.wait_for_function("() => { const t = document.querySelector('#log textarea'); return t.scrollHeight > "
                           "t.clientHeight && t.scrollTop + t.clientHeight >= t.scrollHeight - 8; }")  # at its end
    _shot(page, tmp_path, "3-stopped")
    page.reload()  # a run that has ended: its whole curve comes back (the plot dropped data sent before it mounted)
    _wait_progress(page, "stopped", timeout=30_000)
    page.wait_for_function("n => [...document.querySelectorAll('#loss-plot [aria-roledescription=\"point\"]')]"
                           ".filter(e => e.getAttribute('aria-label').includes('split: train')).length == n",
                           arg=stopped_at, timeout=30_000)

    page.wait_for_function("() => document.querySelector('#export button, button#export') && "
                           "!(document.querySelector('#export button, button#export').disabled)", timeout=30_000)
    page.locator("#instruction textarea").fill("Where is my parcel?")
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#tuned-out textarea').value.length > 0", timeout=60_000)
    page.wait_for_function("() => document.querySelector('#base-out textarea').value.length > 0", timeout=60_000)
    # streamed: a few dozen steps on two pairs already shape the tuned answer
    page.wait_for_function("() => document.querySelector('#tuned-out textarea').value.startsWith('It ships')",
                           timeout=60_000)
    shown = page.locator("#run-pick input").input_value().split(" · ")[0]  # the run just trained: Try's run A
    assert f"Run A: {shown}" in page.locator("#tuned-out").inner_text()  # each answer is headed by its model's name
    assert "Base model: tiny" in page.locator("#base-out").inner_text()
    _shot(page, tmp_path, "4-try")

    with page.expect_download(timeout=30_000) as download:
        page.locator("#export").click()  # one click: the zip was made when the run was picked
    saved = tmp_path / "model.zip"
    download.value.save_as(saved)
    with zipfile.ZipFile(saved) as z:
        assert "model.safetensors" in z.namelist() and not any(n.startswith("checkpoints") for n in z.namelist())
    _shot(page, tmp_path, "5-export")
    # Delete takes two presses: the first says what would go, and the run stays until the second
    name = page.locator("#run-pick input").input_value().split(" · ")[0]  # "name · status"
    assert name and name in page.locator("#runs").inner_text()
    page.locator("#delete").click()
    page.wait_for_function("() => document.querySelector('#run-action').innerText.includes('Press Delete again')")
    assert name in page.locator("#run-action").inner_text() and name in page.locator("#runs").inner_text()
    page.locator("#delete").click()
    page.wait_for_function("n => document.querySelector('#run-action').innerText.includes(`Deleted ${n}`)", arg=name)
    page.wait_for_function("n => !document.querySelector('#runs').innerText.includes(n)", arg=name)
    mine = set(app_tmp.glob("jaxtune-app-*")) - others
    assert mine, "the export left no session folder to check"
    page.close()  # the session ends: its folders go (Gradio itself would call the state's callback an hour later)
    context.close()
    deadline = time.time() + 30
    while any(f.exists() for f in mine):
        assert time.time() < deadline, "the closed session's folder was not removed"
        time.sleep(0.5)


def test_browser_exports_a_lora_run_as_adapter_or_merged_model(app_url, browser, tmp_path):
    """Picking a LoRA run in the runs table shows the adapter/merged choice; each downloads in one click."""
    client = Client(app_url, verbose=False)
    client.predict(TWO_ROWS, **dict(TRAIN_ARGS, epochs=1, validation_fraction=0), api_name="/train")
    full = next(r for r in client.predict(api_name="/runs") if r["pairs"] == 2)
    client.predict(TWO_ROWS, **dict(TRAIN_ARGS, model_name="auto", epochs=3, validation_fraction=0, method="LoRA",
                                    lora_rank=2), api_name="/train")
    run = next(r for r in client.predict(api_name="/runs") if r["pairs"] == 2)
    assert run["model"] == "tiny"  # auto, resolved when the run starts: the adapter names the model it was trained on
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = _open(browser, app_url, context)
    page.locator("#runs [role=gridcell]", has_text=run["name"]).first.click()
    page.locator("#export-kind").wait_for(state="visible")
    button = page.locator("#export")
    page.wait_for_function("n => document.querySelector('#export').innerText.includes(n + ': adapter + its embedded "
                           "base')", arg=run["name"])
    for kind, label, wanted in [("adapter", "Adapter (PEFT's files)", "adapter_model.safetensors"),
                                ("merged", "Merged full model", "model.safetensors")]:
        if kind == "merged":  # picked, then Download pressed at once, as a user would: the button waits for its zip
            page.locator("#export-kind").get_by_label(label).check()  # (it held the adapter's until the merged was made)
            page.wait_for_timeout(300)
        with page.expect_download(timeout=30_000) as download:
            button.click()  # (Playwright waits while the button is disabled)
        download.value.save_as(tmp_path / f"{kind}.zip")
        with zipfile.ZipFile(tmp_path / f"{kind}.zip") as z:
            assert wanted in z.namelist() and ("adapter_config.json" in z.namelist()) == (kind == "adapter")
            assert {"metrics.jsonl", "samples.jsonl", "config.yaml", "README.md"} <= set(z.namelist())  # both kinds
    page.locator("#runs [role=gridcell]", has_text=full["name"]).first.click()  # a full fine-tune: nothing to pick
    page.locator("#export-kind").wait_for(state="hidden")
    context.close()


EVAL_TEXTS_JS = """() => { window.evalTexts = []; const box = document.querySelector('#eval-progress');
    new MutationObserver(() => window.evalTexts.push(box.innerText)).observe(box, {subtree: true, childList: true,
    characterData: true}); }"""


def _table_rows(page, elem_id):
    """A Gradio 6 dataframe's rows as the page shows them (rows and cells are ARIA grid elements)."""
    return page.evaluate(f"""() => [...document.querySelectorAll('#{elem_id} [role=row][data-index]')]
        .map(r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.replace('\u22ee', '').trim()))""")


def test_browser_evaluate_compares_the_base_and_a_run(app_url, browser, tmp_path):
    """A run trained on two pairs and its base answer an uploaded file of them: progress while they answer, then
    both rows with their numbers (the run exact, the base not) and every answer side by side."""
    client = Client(app_url, verbose=False)
    client.predict(TWO_ROWS, **dict(TRAIN_ARGS, epochs=60, validation_fraction=0), api_name="/train")
    run = next(r for r in client.predict(api_name="/runs") if r["pairs"] == 2)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"instruction": i, "response": r}) + "\n" for i, r in TWO_ROWS["data"]))
    page = _open(browser, app_url)
    page.wait_for_function("n => document.querySelector('#eval-runs').innerText.includes(n)", arg=run["name"])
    page.locator("#eval-source").get_by_label("Upload", exact=True).check()
    page.locator("#eval-upload input[type=file]").set_input_files(str(held))
    page.wait_for_function("() => document.querySelector('#eval-upload').innerText.includes('held.jsonl')")
    page.evaluate(EVAL_TEXTS_JS)
    page.locator("#evaluate").click()
    page.wait_for_function("() => document.querySelectorAll('#eval-summary [role=row][data-index]').length == 2",
                           timeout=120_000)
    texts = page.evaluate("() => window.evalTexts")
    assert any(re.search(r"\(1 of 2\): answered \d of 2", t) for t in texts) or \
        any("(1 of 2): validation loss" in t for t in texts), texts
    assert "2 models answered 2 pairs" in page.locator("#eval-progress").inner_text()
    summary = _table_rows(page, "eval-summary")
    assert [row[0] for row in summary] == ["base: tiny", run["name"]]
    for row in summary:
        assert len(row) == 7 and all(np.isfinite(float(c.replace(",", ""))) for c in row[1:])
    base, tuned = ({"loss": float(r[1]), "rouge": float(r[3]), "exact": float(r[4]), "stop": float(r[5])}
                   for r in summary)
    assert tuned["loss"] < base["loss"] and tuned["rouge"] > base["rouge"] and base["exact"] == 0
    examples = _table_rows(page, "eval-examples")
    assert [row[:2] for row in examples] == TWO_ROWS["data"] and all(len(row) == 4 for row in examples)
    assert [row[3].startswith(row[1]) for row in examples] == [True, True]  # the run answers with the references
    assert tuned["exact"] == sum(row[3] == row[1] for row in examples) / 2  # the score is the table's answers'
    page.wait_for_function("() => document.querySelector('#eval-files').innerText.includes('eval.md')")
    assert all(name in page.locator("#eval-files").inner_text() for name in ("eval.json", "eval.jsonl"))
    _shot(page, tmp_path, "6-evaluate")
    page.close()


def test_browser_runs_picked_for_evaluate_stay_picked_when_a_new_run_appears(app_url, browser):
    """The user adds an older run to Evaluate's picker; a run that then finishes changes the picker's choices and
    leaves the picks as they were (the poll sends the choices alone: Gradio keeps the value it does not send)."""
    client = Client(app_url, verbose=False)
    names = []
    for _ in range(2):
        client.predict(TWO_ROWS, **dict(TRAIN_ARGS, epochs=1, validation_fraction=0), api_name="/train")
        names.append(client.predict(api_name="/runs")[0]["name"])
    older, newer = names
    page = _open(browser, app_url)
    picker = page.locator("#eval-runs")
    tokens = "() => [...document.querySelectorAll('#eval-runs .token')].map(t => t.innerText.split(' · ')[0].trim())"
    page.wait_for_function(f"n => ({tokens})().includes(n)", arg=newer)  # the page's own choice: the newest
    picker.locator("input").click()
    picker.get_by_role("option", name=re.compile(re.escape(older + " ·"))).click()
    page.keyboard.press("Escape")
    page.evaluate("() => document.activeElement.blur()")
    page.wait_for_function(f"n => ({tokens})().includes(n)", arg=older)
    client.predict(TWO_ROWS, **dict(TRAIN_ARGS, epochs=1, validation_fraction=0), api_name="/train")
    third = client.predict(api_name="/runs")[0]["name"]
    page.evaluate("() => document.activeElement.blur()")
    picker.locator("input").click()
    picker.get_by_role("option", name=re.compile(re.escape(third + " ·"))).wait_for()  # the new choices arrived
    page.keyboard.press("Escape")
    time.sleep(2)  # two more polls
    assert sorted(page.evaluate(tokens)) == sorted([newer, older])
    page.close()


EIGHT = {"headers": ["Instruction", "Response"], "data": [[f"Question {i}?", f"Answer number {i}."] for i in range(8)]}
EVAL_ARGS = dict(source="split", file=None, instruction_column="", response_column="", table=EIGHT,
                 validation_fraction=0.25, seed=3, max_length=64, loss_on="response", include_base=True, run_ids=[],
                 max_new_tokens=16, model_name="tiny")


def test_evaluate_holds_out_the_split_a_run_holds_out_and_refuses_bad_values(app_url, tmp_path):
    """The validation split is the one `python -m jaxtune train` holds out with the same fraction and seed; the
    reports are written; bad values are refused with what, where and what to do."""
    from jaxtune.data import pairs_from_lists
    from jaxtune.runs import split_validation

    client = Client(app_url, verbose=False)
    progress, summary, examples = client.predict(**EVAL_ARGS, api_name="/evaluate")
    files = client.predict(api_name="/eval_reports")
    examples = examples.get("value", examples)  # sent as an update: the answers' columns get their widths
    pairs = pairs_from_lists(*zip(*EIGHT["data"]))
    held = split_validation(pairs, 0.25, 3)[1]
    assert [row[:2] for row in examples["data"]] == [[p.instruction, p.response] for p in held]
    assert examples["headers"] == ["Instruction", "Reference", "base: tiny"] and len(summary["data"]) == 1
    assert "1 model answered 2 pairs" in progress and "the validation split: 2 of 8 pairs (fraction 0.25, seed 3)" \
        in progress and "at most 16 new tokens" in progress
    report = json.loads(Path(next(f for f in files if f.endswith("eval.json"))).read_text())
    assert report["examples"] == 2 and report["max_new_tokens"] == 16
    assert [float(x) for x in summary["data"][0][1:3]] == pytest.approx(
        [report["models"][0]["val_loss"], report["models"][0]["perplexity"]], rel=1e-3)
    job = client.submit(**dict(EVAL_ARGS, source="held-out", max_new_tokens=64), api_name="/evaluate")
    n = len(read_pairs(ROOT / "examples" / "customer_service_val.jsonl"))
    assert f"1 model answered {n} pairs" in job.result(timeout=300)[0]
    said = [out[0] for out in job.outputs()]
    assert any(re.search(rf"base: tiny \(1 of 1\): answered (16|32|48) of {n} ", text) for text in said), said
    for args, message in [
        (dict(validation_fraction=0), r"The validation fraction in step ② is 0, so the data has no validation split"),
        (dict(table=TWO_ROWS), r"A validation split needs at least 4 pairs; the data has 2"),
        (dict(include_base=False), r"Pick the base model, a finished run, or both"),
        (dict(run_ids=["nope"]), r"Run 'nope' is not one of the runs listed here; pick finished runs in the list"),
        (dict(run_ids=[f"r{i}" for i in range(5)]), r"5 runs were picked; Evaluate compares at most 4"),
        (dict(max_new_tokens=1000), r"Max new tokens must be a multiple of 8 from 8 to 256; got 1,000"),
        (dict(source="everything"), r"Held-out pairs must be one of split, held-out, upload; got 'everything'"),
        (dict(source="upload"), r"Upload a file of held-out pairs first"),
    ]:
        with pytest.raises(AppError, match=message):
            client.predict(**dict(EVAL_ARGS, **args), api_name="/evaluate")
    from gradio_client import handle_file

    bad = tmp_path / "held.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{oops\n')
    with pytest.raises(AppError, match=r"held\.jsonl line 2: not valid JSON.*Pick another file"):
        client.predict(**dict(EVAL_ARGS, source="upload", file=handle_file(str(bad))), api_name="/evaluate")


def test_browser_plot_draws_both_series_in_their_colours(app_url, browser, tmp_path):
    """The validation points come after the first train points (every tenth of the run): the validation line still
    has its colour, because both series are in the plot from its first value."""
    page = _open(browser, app_url)
    empty = page.locator("#loss-plot svg text").evaluate_all("els => els.map(e => e.textContent)")
    assert "step" in empty and not any("." in text for text in empty), empty  # an empty plot used to say 0.000000
    pairs = tmp_path / "eight.jsonl"
    pairs.write_text("".join(json.dumps({"instruction": f"Question {i}?", "response": f"Answer {i}."}) + "\n"
                             for i in range(8)))
    page.locator("#upload input[type=file]").set_input_files(str(pairs))
    page.wait_for_function("() => document.querySelector('#counts').innerText.includes('8 pairs')")
    _pick_model(page, "tiny")
    page.wait_for_function("() => document.querySelector('#defaults-note').innerText.includes('random weights')")
    page.get_by_label("Epochs").fill("10")
    page.get_by_label("Batch size").fill("1")
    page.locator("#val-fraction input[type=number]").fill("0.5")
    page.locator("#val-fraction input[type=number]").press("Enter")
    page.locator("#train").click()
    _wait_progress(page, "finished", timeout=120_000)
    page.wait_for_function("() => [...document.querySelectorAll('#loss-plot path[aria-roledescription=\"line mark\"]')]"
                           ".filter(e => (e.getAttribute('d') || '').length > 20).length == 2", timeout=30_000)
    strokes = page.locator('#loss-plot path[aria-roledescription="line mark"]').evaluate_all(
        "els => els.filter(e => (e.getAttribute('d') || '').length > 20).map(e => e.getAttribute('stroke'))")
    assert sorted(strokes) == ["#2563eb", "#f97316"]
    points = page.locator('#loss-plot [aria-roledescription="point"]').evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    assert sum("split: validation" in p for p in points) >= 5
    # no label falls below the plot's box (a legend under the x axis used to be pushed out of it)
    box = page.locator("#loss-plot").bounding_box()
    labels = page.locator("#loss-plot svg text").evaluate_all(
        "els => els.filter(e => e.textContent.trim()).map(e => [e.textContent, e.getBoundingClientRect().bottom])")
    assert any(text == "step" for text, _ in labels)
    assert [text for text, bottom in labels if bottom > box["y"] + box["height"]] == []
    # nor out of its left edge: the loss ticks and title used to keep the space the empty plot gave them ('10.85'
    # drawn as '0.85'); the plot's limits are whole numbers around the data and the steps up to the run's total
    cut = page.locator("#loss-plot svg text").evaluate_all(
        "els => els.filter(e => e.textContent.trim() && e.getBoundingClientRect().left"
        " < e.ownerSVGElement.getBoundingClientRect().left).map(e => e.textContent)")
    assert cut == []
    ticks = page.locator("#loss-plot svg text").evaluate_all("els => els.map(e => e.textContent)")
    assert "loss" in ticks and "0" in ticks and "40" in ticks  # 10 epochs of 4 pairs: 40 steps, the axis's end
    page.close()


def test_browser_reload_brings_back_the_table_and_the_model(app_url, browser, tmp_path):
    """The table, the model field and the training settings are kept in the browser: a reload shows them again;
    pairs that were kept on the server beyond the table's 200 rows are not, and the page says so."""
    page = _open(browser, app_url)
    pairs = tmp_path / "three.jsonl"
    pairs.write_text("".join(json.dumps({"instruction": f"Where is parcel {i}?", "response": f"Parcel {i} left."})
                             + "\n" for i in range(3)))
    page.locator("#upload input[type=file]").set_input_files(str(pairs))
    page.wait_for_function("() => document.querySelector('#counts').innerText.includes('3 pairs')")
    _pick_model(page, "tiny")
    page.get_by_label("Epochs").fill("3")
    page.get_by_label("Epochs").press("Tab")
    page.locator("#val-fraction input[type=number]").fill("0.15")
    page.locator("#val-fraction input[type=number]").press("Tab")
    page.get_by_label("bfloat16").check()
    page.locator("#temperature input[type=number]").fill("0.7")
    page.locator("#temperature input[type=number]").press("Tab")
    page.locator("#eval-source").get_by_label("Upload", exact=True).check()
    page.locator("#eval-base input").uncheck()
    page.locator("#eval-step").get_by_label("Max new tokens").fill("24")
    page.locator("#eval-step").get_by_label("Max new tokens").press("Tab")
    page.wait_for_timeout(1500)  # the browser stores the page's state after each change
    page.reload()
    page.wait_for_function("() => document.querySelector('#counts') && "
                           "document.querySelector('#counts').innerText.includes('3 pairs')", timeout=30_000)
    assert page.get_by_role("combobox", name="Model").input_value() == "tiny"
    # the training settings came back too: a Start after a reload trains what was set, not the defaults
    page.wait_for_function("() => document.querySelector('#val-fraction input[type=number]').value === '0.15'")
    assert page.get_by_label("Epochs").input_value() == "3" and page.get_by_label("bfloat16").is_checked()
    assert page.locator("#temperature input[type=number]").input_value() == "0.7"  # Try's settings too
    page.locator("#eval-upload").wait_for(state="visible")  # Evaluate's settings: the upload box shows again
    assert page.locator("#eval-source").get_by_label("Upload", exact=True).is_checked()
    assert not page.locator("#eval-base input").is_checked()
    assert page.locator("#eval-step").get_by_label("Max new tokens").input_value() == "24"
    assert page.get_by_label("Learning rate").input_value() == "0.005"  # tiny's default, as it was
    assert "Parcel 2 left." in page.locator("#pairs-table").inner_text()
    assert "reloaded" not in page.locator("#data-note").inner_text()
    n = len(read_pairs(ROOT / "examples" / "customer_service.jsonl"))
    page.locator("#load-example").click()  # over the user's own rows: the first press asks, the second replaces
    page.wait_for_function("() => document.querySelector('#data-note').innerText.includes('3 rows with the example')")
    assert "Parcel 2 left." in page.locator("#pairs-table").inner_text() and "3 pairs" in page.locator("#counts").inner_text()
    for _ in range(2):  # the second time loads the same first 200 rows (the table sees no change): said again
        page.locator("#load-example").click()
        page.wait_for_function("n => document.querySelector('#counts').innerText.includes(`${n} pairs`)", arg=n)
        page.wait_for_timeout(1500)
        page.reload()
        page.wait_for_function("() => (document.querySelector('#data-note') || {innerText: ''}).innerText"
                               ".includes('The page was reloaded')", timeout=30_000)
        assert f"the other {n - 200} pairs loaded from customer_service.jsonl stayed with the old page" in \
            page.locator("#data-note").inner_text()
        page.wait_for_function("() => document.querySelector('#counts').innerText.includes('200 pairs')")
    page.close()


DROP_JS = """([name, text]) => {
    const moved = new DataTransfer();
    moved.items.add(new File([text], name, {type: "text/csv"}));
    const cell = document.querySelector("#pairs-table .body-cell") || document.querySelector("#pairs-table");
    for (const type of ["dragenter", "dragover", "drop"])
        cell.dispatchEvent(new DragEvent(type, {dataTransfer: moved, bubbles: true, cancelable: true}));
}"""


def test_browser_a_file_dropped_on_the_table_is_read_as_an_upload(app_url, browser):
    """The table would import a dropped CSV by itself, replacing its rows and headers without a check or a word. A
    file dropped on it goes through the upload's checks instead: a good one is loaded and named, a bad one is
    refused with the table left as it was, and the upload box is ready for the next file either way."""
    page = _open(browser, app_url)
    page.evaluate(DROP_JS, ["dropped.csv", "question,answer\nHi,Hello\nBye,Goodbye\nThanks,You are welcome\n"])
    page.wait_for_function("() => document.querySelector('#counts').innerText.includes('3 pairs')")
    page.wait_for_function("() => document.body.innerText.includes('Loaded 3 pairs from dropped.csv')")
    headers = page.locator("#pairs-table thead").inner_text()
    assert "Instruction" in headers and "Response" in headers and "question" not in headers
    assert "You are welcome" in page.locator("#pairs-table").inner_text()
    page.wait_for_function("() => !document.querySelector('#upload').innerText.includes('dropped')")  # emptied
    page.evaluate(DROP_JS, ["bad.csv", "question,notes\nHi,1\n"])  # no response column
    page.wait_for_function("() => /no response column.*Your table was left as it was/.test(document.body.innerText)")
    note = page.locator("#data-note").inner_text()  # said where it stays, not only in a warning that fades
    assert "bad.csv line 1 (the header): no response column" in note and "in the Response column field above the " \
        "upload (or with --response-column on the command line)" in note, note
    page.wait_for_function("() => !document.querySelector('#upload').innerText.includes('bad')")  # emptied again
    assert "You are welcome" in page.locator("#pairs-table").inner_text()
    assert "3 pairs" in page.locator("#counts").inner_text()
    assert not page.locator("#undo-upload").is_visible()  # the first upload replaced the app's starting rows
    page.evaluate(DROP_JS, ["dropped.tsv", "question\tanswer\nTabs?\tYes, tabs.\n"])  # the table's own hint offers TSV
    page.wait_for_function("() => document.body.innerText.includes('Loaded 1 pair from dropped.tsv')")
    # over rows of the user's: replaced at once, and Undo upload brings them back
    assert "The upload replaced your 3 rows. Undo upload brings them back." in page.locator("#data-note").inner_text()
    page.locator("#undo-upload").click()
    page.wait_for_function("() => document.querySelector('#counts').innerText.includes('3 pairs')")
    assert "You are welcome" in page.locator("#pairs-table").inner_text()
    assert "Tabs?" not in page.locator("#pairs-table").inner_text()
    page.locator("#undo-upload").wait_for(state="hidden")
    page.close()


def test_browser_big_data_shows_its_first_rows(app_url, browser):
    """The example data (306 pairs): the page holds 200 and says so; 'Use the table only' drops the rest."""
    n = len(read_pairs(ROOT / "examples" / "customer_service.jsonl"))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    page.wait_for_function("() => document.querySelector('#counts') && document.querySelector('#counts').innerText.includes('2 pairs')")
    page.locator("#load-example").click()
    page.wait_for_function("n => document.querySelector('#data-note').innerText.includes(`Showing 200 of ${n} pairs`)",
                           arg=n)
    page.wait_for_function("n => document.querySelector('#counts').innerText.includes(`${n} pairs`)", arg=n)
    # long responses wrap inside the table's width rather than run off its right edge
    page.wait_for_function("() => document.querySelectorAll('#pairs-table .body-cell').length >= 8")
    right = page.locator("#pairs-table").bounding_box()
    cells = page.locator("#pairs-table .body-cell").evaluate_all("els => els.map(e => e.getBoundingClientRect().right)")
    assert len(cells) >= 8 and max(cells) <= right["x"] + right["width"] + 1
    page.locator("#table-only").click()
    page.wait_for_function("() => document.querySelector('#counts').innerText.includes('200 pairs')")
    assert not page.locator("#table-only").is_visible() and "Showing" not in page.locator("#data-note").inner_text()
    page.close()


def _long_run(client, epochs=100_000):
    return client.submit({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]},
                         *dict(TRAIN_ARGS, epochs=epochs, validation_fraction=0).values(), api_name="/train")


def _wait_for(job, pattern, seconds=120):
    """The newest of the job's outputs whose progress matches `pattern` (a regular expression)."""
    deadline = time.time() + seconds
    while not any(re.search(pattern, out[0]) for out in job.outputs()):
        assert time.time() < deadline, f"no {pattern!r} in {job.outputs()[-1:]}"
        time.sleep(0.3)
    return next(out[0] for out in reversed(job.outputs()) if re.search(pattern, out[0]))


@pytest.fixture
def stop_all(app_url):
    """Stops, after the test, every run it left training or waiting (a failed test must not block the queue)."""
    yield
    client = Client(app_url, verbose=False)
    for run in _runs(client).values():
        if run["status"] in ("queued", "training"):
            client.predict(run["id"], api_name="/stop_run")


def test_runs_queue_say_their_place_and_stop_cancels_a_waiting_run(app_url, stop_all):
    first, second, third = (Client(app_url, verbose=False) for _ in range(3))
    running = _long_run(first, epochs=50_000)
    _wait_for(running, r"step [2-9]\d*/")
    waiting = _long_run(second, epochs=1)
    text = _wait_for(waiting, "ahead of yours")
    assert "1 run ahead of yours (started " in text and " ago, about " in text and " left)" in text
    last = _long_run(third, epochs=1)
    assert "2 runs ahead of yours" in _wait_for(last, "ahead of yours")
    assert "Cancelling" in second.predict(api_name="/stop")  # Stop while it waits: it never trains
    assert "cancelled while it waited in the queue" in waiting.result(timeout=30)[0]
    assert "1 run ahead of yours" in _wait_for(last, "1 run ahead")  # the third moved up
    assert "Stopping" in first.predict(api_name="/stop")
    assert "stopped by request after step" in running.result(timeout=60)[0]
    assert "finished" in last.result(timeout=120)[0]
    cancelled = [r for r in _runs(second).values() if "cancelled" in r["message"]]
    assert cancelled and all(r["status"] == "stopped" and r["step"] == 0 for r in cancelled)
    with pytest.raises(AppError, match="has no model: it stopped before it saved one"):  # and Export says why
        second.predict(cancelled[0]["id"], "adapter", api_name="/export")


def test_a_double_start_starts_one_run(app_url, stop_all):
    """Two Starts from one page with the same data and settings, both in flight at once (a double click), start one
    run and both follow it; another setting starts another run, with a name of its own."""
    client = Client(app_url, verbose=False)
    before = set(_runs(client))
    jobs = [_long_run(client, epochs=50_000) for _ in range(2)]
    for job in jobs:
        _wait_for(job, r"step [1-9]\d*/")
    new = [r for i, r in _runs(client).items() if i not in before]
    assert len(new) == 1 and new[0]["status"] == "training", new
    other = client.submit({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]},
                          *dict(TRAIN_ARGS, epochs=50_000, validation_fraction=0, seed=1).values(), api_name="/train")
    _wait_for(other, "queued|ahead of yours|step")
    new = [r for i, r in _runs(client).items() if i not in before]
    assert len(new) == 2 and len({r["name"] for r in new}) == 2 and {r["model"] for r in new} == {"tiny"}, new


def test_closed_tab_leaves_the_run_going_on_a_desktop(app_url, browser, stop_all):
    page = _open(browser, app_url)
    _pick_model(page, "tiny")
    page.get_by_label("Epochs").fill("10000")
    page.get_by_label("Batch size").fill("1")
    page.locator("#train").click()
    _wait_progress(page, r"step [2-9]\d*\/")
    page.close()
    client = Client(app_url, verbose=False)
    [run] = [r for r in _runs(client).values() if r["status"] == "training"]
    time.sleep(4)  # past a heartbeat and several polls that no longer come
    again = _runs(client)[run["id"]]
    assert again["status"] == "training" and again["step"] >= run["step"]
    assert client.predict(run["id"], api_name="/stop_run") == "stopping"
    deadline = time.time() + 60
    while _runs(client)[run["id"]]["status"] == "training":
        assert time.time() < deadline
        time.sleep(0.5)
    assert "stopped by request" in _runs(client)[run["id"]]["message"]


def test_resume_continues_a_stopped_run_and_delete_removes_it(app_url, stop_all):
    client = Client(app_url, verbose=False)
    job = _long_run(client, epochs=300)  # 300 steps of both pairs
    _wait_for(job, r"step ([5-9]|\d\d+)/")
    client.predict(api_name="/stop")
    job.result(timeout=60)
    run = next(r for r in _runs(client).values() if r["total_steps"] == 300)
    folder = Path(run["dir"])
    assert run["status"] == "stopped" and 5 <= run["step"] < 300 and list((folder / "checkpoints").glob("[0-9]*"))
    assert "Resuming" in client.predict(run["id"], api_name="/resume")
    # while it trains again, Try and Export say they use runs that have finished or stopped, and Delete waits
    _, a, _ = client.predict("Hi", 0.0, 0.95, 8, "tiny", run["id"], api_name="/generate")
    assert "is training: pick a run that has finished or stopped" in a
    with pytest.raises(AppError, match="has no finished model yet; pick a run that has finished or stopped"):
        client.predict(run["id"], api_name="/export")
    with pytest.raises(AppError, match="stop it before deleting it"):
        client.predict(run["id"], api_name="/delete")
    deadline = time.time() + 120
    while _runs(client)[run["id"]]["status"] in ("queued", "training"):
        assert time.time() < deadline
        time.sleep(0.5)
    done = _runs(client)[run["id"]]
    assert done["status"] == "finished" and done["step"] == 300
    # the closing line counts the steps this resume ran, not the run's total
    assert f"{300 - run['step']} steps ({run['step'] + 1} to 300) in " in done["message"], done["message"]
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").open()]
    assert steps == list(range(1, 301))  # the first part from the checkpoint, the rest resumed: one history
    assert "resuming from the last checkpoint" in (folder / "train.log").read_text()
    said = f"cannot be resumed: it finished all of its steps. To train it further, start a new run from its model: " \
        f"put its folder ({folder})"
    with pytest.raises(AppError, match=re.escape(said)):
        client.predict(run["id"], api_name="/resume")
    assert "Deleted" in client.predict(run["id"], api_name="/delete")
    assert not folder.exists() and run["id"] not in _runs(client)


def test_browser_resume_picks_the_run_and_a_reopened_tab_shows_it(app_url, browser, stop_all):
    """Resume, pressed on a run this browser did not start, makes it the run the page acts on and the one it keeps:
    a tab opened afterwards shows it training (a resumed run used to be forgotten, and the picker stayed behind)."""
    client = Client(app_url, verbose=False)
    job = _long_run(client, epochs=5000)
    _wait_for(job, r"step ([3-9]|\d\d+)/")
    client.predict(api_name="/stop")
    job.result(timeout=60)
    run = next(r for r in _runs(client).values() if r["total_steps"] == 5000 and r["status"] == "stopped")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = _open(browser, app_url, context)
    page.locator("#runs [role=gridcell]", has_text=run["name"]).first.click()
    page.wait_for_function("n => document.querySelector('#run-note').innerText.includes(n)", arg=run["name"])
    page.locator("#resume").click()
    _wait_progress(page, r"step \d+\/5000")
    page.wait_for_function("n => document.querySelector('#run-pick input').value.startsWith(n)", arg=run["name"])
    page.locator("#resume").click()  # again, while it trains: refused, in the note beside the buttons, which stays
    page.wait_for_function("() => document.querySelector('#run-action').innerText.includes('Cannot resume:')")
    page.wait_for_timeout(11_000)  # past the toast's life
    assert f"{run['name']} cannot be resumed: it is still training" in page.locator("#run-action").inner_text()
    page.wait_for_timeout(1500)  # the browser stores its runs
    page.close()
    again = _open(browser, app_url, context)
    text = _wait_progress(again, r"step \d+\/5000")
    assert run["name"] in text or "training" in text
    context.close()
    client.predict(run["id"], api_name="/stop_run")


def test_preview_lists_problems_with_row_numbers(app_url):
    client = Client(app_url, verbose=False)
    rows = [["Hi", "Hello"], ["", "orphan"], ["Hi", "Hello"], ["Long", "word " * 80]]
    spans, counts, problems = client.predict({"headers": ["Instruction", "Response"], "data": rows}, 1, 32, "response",
                                             api_name="/preview")
    assert "row 2: empty instruction" in problems and "row 3: duplicate of row 1" in problems
    assert "row 4: longer than 32 tokens" in problems and "1 will be truncated" in counts
    # the row number is the table's: a row left out is said, with the next row shown (it showed row 3 as 'row 2')
    _, counts, _ = client.predict({"headers": ["Instruction", "Response"], "data": rows}, 2, 32, "response",
                                  api_name="/preview")
    assert re.search(r"showing row [34] \(row 2 is left out: see below\)", counts), counts
    blank = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["", ""], ["Bye", "Goodbye"]]}
    for asked, said in ((2, "showing row 3 (row 2 is blank)"), (0, "showing row 1 (rows are numbered from 1)"),
                        (1e9, "showing row 3 (row 1,000,000,000 is past the last row, 3)")):  # it said 1,000,000
        _, counts, _ = client.predict(blank, asked, 32, "response", api_name="/preview")
        assert counts.endswith(said), counts


# ---------------------------------------------------------------------------------------------- bounds
TWO_ROWS = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]}


def raw_call(url, api_name, data):
    """Call an endpoint with a JSON body as Python writes it (NaN, Infinity), which gradio_client cannot send;
    ("complete", data) or ("error", message)."""
    body = json.dumps({"data": data})  # allow_nan: NaN and Infinity as JavaScript writes them
    r = httpx.post(f"{url}/gradio_api/call/{api_name}", content=body, headers={"content-type": "application/json"})
    r.raise_for_status()
    with httpx.stream("GET", f"{url}/gradio_api/call/{api_name}/{r.json()['event_id']}", timeout=120) as events:
        event = None
        for line in events.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in ("complete", "error"):
                payload = json.loads(line[6:])
                return event, payload.get("error") if isinstance(payload, dict) else payload
    raise AssertionError("no result")


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 10**9, r"Epochs must be a whole number from 1 to 100,000 .*; got 1,000,000,000\. Lower the epochs"),
    ("epochs", None, r"Epochs must be .*got nothing \(the field is empty\)\. Enter a value"),
    ("epochs", "3", r"Epochs must be a whole number .*got the text '3'\. Enter a number"),
    ("epochs", 2.5, r"Epochs must be a whole number .*got 2\.5\. Enter a whole number\.$"),
    ("epochs", -1, r"Epochs must be a whole number .*got -1\. Enter at least 1\.$"),
    ("batch_size", 10**9, r"Batch size must be a whole number from 1 to 256; got 1,000,000,000\. Lower the batch size"),
    ("batch_size", 0, r"Batch size must be a whole number from 1 to 256; got 0\. Enter at least 1\.$"),
    ("max_length", 10**9, r"Max length must be a whole number from 8 to 1,024"),
    ("warmup_steps", -1, r"Warmup steps must be a whole number from 0 to"),
    ("seed", 2**70, r"Seed must be a whole number from 0 to 4,294,967,295; got 1180591620717411303424"),
    ("seed", -1, r"Seed must be a whole number from 0 to 4,294,967,295; got -1"),
    ("learning_rate", 0, r"Learning rate must be a number greater than 0 and at most 1; got 0\. Try 5e-5"),
    ("learning_rate", -1, r"Learning rate must be a number greater than 0 and at most 1; got -1"),
    ("learning_rate", 1e30, r"Learning rate must be .* at most 1; got 1e\+30"),
    ("validation_fraction", 0.9, r"Validation fraction must be a number from 0 to 0\.5; got 0\.9"),
    ("precision", "float64", r"Precision must be one of float32, bfloat16; got 'float64'"),
    ("loss_on", None, r"Loss on must be one of response, all, reference; got None"),
    ("pack", None, r"Pack examples must be true or false; got None"),
    ("model_name", 5, r"The model must be a hub id"),
])
def test_training_values_are_checked_on_the_server(app_url, field, value, message):
    """What an API call can send that the widgets would not: a clear message at once, and the server still serves."""
    client = Client(app_url, verbose=False)
    start = time.time()
    with pytest.raises(AppError, match=message):
        client.predict(TWO_ROWS, **dict(TRAIN_ARGS, **{field: value}), api_name="/train")
    assert time.time() - start < 10  # refused before anything is loaded or allocated


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_learning_rate_must_be_finite(app_url, value, shown):
    args = dict(TRAIN_ARGS, learning_rate=value)
    event, message = raw_call(app_url, "train", [TWO_ROWS, *args.values()])
    assert event == "error" and message == (f"Learning rate must be a number greater than 0 and at most 1; got {shown}. "
                                            "Enter a finite number.")


def test_runs_too_long_for_the_time_limit_are_refused_and_the_server_answers_after(app_url):
    client = Client(app_url, verbose=False)
    start = time.time()
    with pytest.raises(AppError, match=r"100,000 epochs of 2 training pairs in batches of 1 is 200,000 steps; this "
                                       r"server runs at most 180,000 steps \(the time limit of 3,600 s at up to 50 "
                                       r"steps/s\)\. Lower the epochs to at most 90,000, or raise the batch size"):
        client.predict(TWO_ROWS, **dict(TRAIN_ARGS, epochs=100_000, batch_size=1, validation_fraction=0),
                       api_name="/train")
    assert time.time() - start < 10
    progress, _, log = client.predict(TWO_ROWS, **dict(TRAIN_ARGS, epochs=1, validation_fraction=0), api_name="/train")
    assert "step 1/1" in progress and "finished" in progress
    assert "time limit: 3,600 s for the whole run (JAXTUNE_MAX_TRAIN_SECONDS)" in log


def test_table_generate_and_preview_values_are_checked(app_url):
    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match=r"Row 2 of the table holds dict, not text"):
        client.predict({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], [{"a": 1}, "x"]]},
                       **TRAIN_ARGS, api_name="/train")
    with pytest.raises(AppError, match=r"Max new tokens must be a multiple of 8 from 8 to 256; got 1,000,000,000"):
        client.predict("Hi", 0.0, 0.95, 10**9, "tiny", api_name="/generate")
    with pytest.raises(AppError, match=r"Top-p must be a number from 0\.05 to 1; got 0\."):
        client.predict("Hi", 0.0, 0.0, 16, "tiny", api_name="/generate")
    with pytest.raises(AppError, match=r"Instruction is 9,000 characters; at most 8,000"):
        client.predict("Hi " * 3000, 0.0, 0.95, 16, "tiny", api_name="/generate")
    # a prompt the model cannot read fails, and the answers it replaced were cleared first: none stays beside it
    job = client.submit("Hi " * 1000, 0.0, 0.95, 16, "tiny", api_name="/generate")
    with pytest.raises(AppError, match=r"this model reads at most \d+\. Shorten the instruction"):
        job.result(timeout=120)
    assert job.outputs() and job.outputs()[0][0] == ""
    job = client.submit("   ", 0.0, 0.95, 16, "tiny", api_name="/generate")  # refused, and cleared likewise
    with pytest.raises(AppError, match=r"Type an instruction first"):
        job.result(timeout=60)
    assert job.outputs() and job.outputs()[0] == ("", "", "")
    with pytest.raises(AppError, match=r"There is no run 'nosuchrun' for run A \(deleted\?\)"):
        client.predict("Hi", 0.0, 0.95, 16, "tiny", "nosuchrun", api_name="/generate")
    assert raw_call(app_url, "generate", ["Hi", float("nan"), 0.95, 16, "tiny", None, None]) == (
        "error", "Temperature must be a number from 0 to 1.5; got nan. Enter a finite number.")
    assert raw_call(app_url, "preview", [TWO_ROWS, float("nan"), 128, "response"]) == (
        "error", "Preview row must be a whole number from 1 to 1,000,000; got nan. Enter a finite number.")
    # the preview follows the widgets as they are typed in: out-of-range numbers take the nearest allowed value
    _, counts, _ = client.predict(TWO_ROWS, 10**9, 10**9, "response", api_name="/preview")
    assert "2 pairs" in counts and counts.endswith("showing row 2 (row 1,000,000,000 is past the last row, 2)")


def test_push_without_network_is_a_clear_error(app_url):
    client = Client(app_url, verbose=False)
    client.predict({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"]]},
                   *dict(TRAIN_ARGS, epochs=1, validation_fraction=0).values(), api_name="/train")
    with pytest.raises(AppError, match="hub cannot be reached"):
        client.predict("someone/model", "hf_token", True, api_name="/push")
    with pytest.raises(AppError, match="user/name"):
        client.predict("no-slash", "hf_token", True, api_name="/push")


def test_unexpected_errors_are_logged_with_a_reference_not_shown(caplog, monkeypatch, tmp_path):
    """Whatever goes wrong unexpectedly reaches the user as a reference, the exception only the server's log."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import gradio as gr

    import app

    @app._guarded
    def broken():
        raise OSError("[Errno 2] No such file: '/srv/secret/model.safetensors'")

    @app._guarded
    def broken_stream():
        yield "first"
        raise OSError("[Errno 2] No such file: '/srv/secret/model.safetensors'")

    for call in (broken, lambda: list(broken_stream())):
        with pytest.raises(gr.Error) as info:
            call()
        message = info.value.message
        assert message.startswith("Something went wrong on the server (reference ") and "secret" not in message
        reference = message.split("reference ")[1].split(")")[0]
        assert f"(reference {reference})" in caplog.text and "/srv/secret/model.safetensors" in caplog.text
        assert info.value.print_exception is False  # the traceback is in the log once, with the reference

    @app._guarded
    def refused():
        raise gr.Error("Learning rate must be a number from 0 to 1; got -1.\nTry 5e-3.", title="Learning rate")

    caplog.clear()
    with caplog.at_level("INFO", logger=app.log.name), pytest.raises(gr.Error) as info:
        refused()
    assert info.value.print_exception is False and info.value.title == "Learning rate"  # the user's mistake: one line
    assert "refused: Learning rate must be a number from 0 to 1; got -1." in caplog.text and "Traceback" not in caplog.text


def _finished_lora_run(monkeypatch, tmp_path, **train):
    """The app module, imported with its runs in tmp_path, and a LoRA (r=2) run of tiny on two pairs, finished."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import app
    from jaxtune.config import RunConfig, TrainConfig
    from jaxtune.data import Pair

    cfg = RunConfig(model="tiny", samples=0, train=TrainConfig(batch_size=2, max_length=32, lora_rank=2, **train))
    run = app.REGISTRY.start(cfg, [Pair("Hi", "Hello"), Pair("Bye", "Goodbye")])
    deadline = time.time() + 120
    while run.status in ("queued", "training"):
        assert time.time() < deadline
        time.sleep(0.2)
    assert run.status == "finished", run.message
    return app, run


def test_a_browser_and_the_queue_hold_a_limited_number_of_runs(monkeypatch, tmp_path):
    """JAXTUNE_RUNS_PER_BROWSER and JAXTUNE_MAX_QUEUED (a Space's defaults: 2 and 8): one visitor cannot queue runs
    without end ahead of everyone, and a full queue says so. The page's storage gives back only run ids this server
    signed: an id learned elsewhere is not adopted, and on a Space neither is a bare one."""
    import gradio as gr

    app, done = _finished_lora_run(monkeypatch, tmp_path, epochs=1)
    monkeypatch.setattr(app, "RUNS_PER_BROWSER", 1)
    monkeypatch.setattr(app, "MAX_QUEUED", 1)
    table = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]}
    long = dict(TRAIN_ARGS, epochs=5000, validation_fraction=0)
    a, b, c = app.Session(), app.Session(), app.Session()
    try:
        app.start_run(table, *long.values(), a, [])
        deadline = time.time() + 60
        while app.REGISTRY.get(a.watch).status == "queued":  # training: the queue is empty again
            assert time.time() < deadline
            time.sleep(0.1)
        with pytest.raises(gr.Error, match=r"This browser has 1 run waiting or training, as many as this server"):
            app.start_run(table, *dict(long, seed=1).values(), a, [])
        app.start_run(table, *dict(long, seed=2).values(), b, [])  # it waits behind a's
        with pytest.raises(gr.Error, match=r"The queue is full: 1 run is waiting \(JAXTUNE_MAX_QUEUED\)"):
            app.start_run(table, *dict(long, seed=3).values(), c, [])
        assert c.ids == []
    finally:
        for run_id in a.ids + b.ids:
            app.REGISTRY.stop(run_id)
    forged = f"{done.id}.{'0' * 32}"
    assert done.id not in app.attach([forged], None)[0].ids
    assert done.id in app.attach([app.sign_run_id(done.id)], None)[0].ids
    assert done.id in app.attach([done.id], None)[0].ids  # a desktop lists every run anyway
    monkeypatch.setattr(app, "PUBLIC", True)
    assert done.id not in app.attach([done.id], None)[0].ids
    deadline = time.time() + 120
    while any(r.status in app.ACTIVE for r in app.REGISTRY.list(a.ids + b.ids)):
        assert time.time() < deadline
        time.sleep(0.2)


def test_new_runs_keep_the_runs_a_user_picked_and_the_picker_follows_a_start(monkeypatch, tmp_path):
    """When a run finishes, Try's run A and Evaluate's runs move to it only where the page had chosen them itself: a
    run the user picked stays picked (it used to be replaced by the newest). Start (and Resume) make Export, Resume
    and Delete act on the new run, not on the run picked before it."""
    app, first = _finished_lora_run(monkeypatch, tmp_path, epochs=1)
    _, second = _finished_lora_run(monkeypatch, tmp_path, epochs=1)
    session = app.Session()
    session.ids += [first.id, second.id]
    view = app._view(session, force=True)  # [progress, plot, log, runs, pick, try A, try B, eval, ...]
    assert view[5]["value"] == second.id and view[7]["value"] == [second.id]  # the newest, chosen by the page
    shown = {"run_a": first.id, "run_b": second.id, "eval": [second.id]}  # the user picked run A and B
    _, third = _finished_lora_run(monkeypatch, tmp_path, epochs=1)
    session.ids.append(third.id)
    view = app._view(session, shown=shown)
    assert [c[1] for c in view[5]["choices"]][:3] == [third.id, second.id, first.id]  # (earlier tests' runs after)
    assert "value" not in view[5] and "value" not in view[6]  # kept: the page keeps what it shows (and a pick made
    # since the poll left), which sending the value back would undo
    assert view[7]["value"] == [third.id]  # the page's own choice follows the newest run
    shown = {"run_a": first.id, "run_b": second.id, "eval": [first.id, third.id]}  # now the user picks Evaluate's too
    app.REGISTRY.delete(second.id)
    view = app._view(session, shown=shown)
    assert "value" not in view[5] and "value" not in view[7]
    assert view[6]["value"] is None  # the picked run B was deleted
    session.pick = first.id
    table = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]}
    saved, session, *view = app.start_run(table, *dict(TRAIN_ARGS, epochs=5000, validation_fraction=0).values(),
                                          session, [])
    assert saved == [app.sign_run_id(session.watch)] and session.pick == session.watch != first.id
    assert view[4]["value"] == session.watch  # the page's Run picker shows the new run
    reloaded, *view = app.attach([first.id, third.id, session.watch], None)  # the page reloaded while it trains
    assert app.REGISTRY.get(session.watch).status in app.ACTIVE  # (5000 epochs: still training)
    assert reloaded.pick == reloaded.watch == session.watch and view[4]["value"] == session.watch  # not first's
    app.REGISTRY.stop(session.watch)
    deadline = time.time() + 120
    while app.REGISTRY.get(session.watch).status in app.ACTIVE:
        assert time.time() < deadline
        time.sleep(0.2)


def test_keep_the_best_stops_early_and_keeps_the_lowest_validation_loss(monkeypatch, tmp_path):
    """Keep the best: without held-out pairs it is refused, saying what to set; with them the run's config holds
    early stopping, and the run's validation loss is its lowest, which its model card names as the weights kept."""
    import gradio as gr
    import yaml

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import app

    rows = [[f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."] for a in range(4) for b in range(3)]
    table = {"headers": ["Instruction", "Response"], "data": rows}
    session = app.Session()
    with pytest.raises(gr.Error, match="set a validation fraction"):
        app.start_run(table, *dict(TRAIN_ARGS, validation_fraction=0, keep_best=True).values(), session, [])
    app.start_run(table, *dict(TRAIN_ARGS, epochs=12, learning_rate=1e-2, validation_fraction=0.25,
                               keep_best=True).values(), session, [])
    run = app.REGISTRY.get(session.watch)
    deadline = time.time() + 120
    while run.status in app.ACTIVE:
        assert time.time() < deadline
        time.sleep(0.2)
    assert run.status == "finished", run.message
    assert yaml.safe_load((run.dir / "config.yaml").read_text())["early_stopping"] == app.EARLY_STOPPING
    vals = [h["val_loss"] for h in run.history if h.get("val_loss") is not None]
    assert len(vals) >= 2 and run.val_loss <= min(vals)
    frame = app._plot_frame(run)  # the validation line starts where the summary's does: before the first step
    start = frame[(frame["split"] == "validation") & (frame["step"] == 0)]["loss"].tolist()
    assert start == [run.initial_val_loss] and f"validation loss {run.initial_val_loss:.4f} -> " in run.message
    assert f"validation loss before the first step: {run.initial_val_loss:.4f}" in "\n".join(run.log)
    row = app._runs_frame([run]).iloc[0]  # the runs table names the step kept
    assert row["Validation loss"] == f"{run.val_loss:.4f}" + (f" (step {run.best_step}, kept)"
                                                              if run.best_step != run.step else "")
    assert any(" early stopping: the validation loss every" in line for line in run.log), run.log
    assert run.best_step < run.step  # this seeded run went on past its lowest (step 21 of 30)
    label = app._plot(run)["label"]  # the plot's title names the step kept
    assert label.endswith(f" · the model keeps step {run.best_step}'s weights, the lowest validation loss"), label
    card = (run.dir / "README.md").read_text()
    assert f"| early stopping | after {app.EARLY_STOPPING} evaluations without a lower validation loss" in card


def test_push_sends_the_adapter_or_the_merged_model(monkeypatch, tmp_path):
    """Push, to a local stand-in for the hub's upload routes (tests/hub_standin.py, at HF_ENDPOINT): a LoRA run's
    adapter with the embedded base it needs, then its merged model; a refused token is said as such."""
    import huggingface_hub.constants
    from hub_standin import GOOD_TOKEN, HubStandIn

    import gradio as gr

    app, run = _finished_lora_run(monkeypatch, tmp_path, epochs=2, learning_rate=1e-2)
    session = app.Session()
    session.ids.append(run.id)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # this "hub" is a loopback server
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub = HubStandIn()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        said, kept = app.push_to_hub("me/adapter", GOOD_TOKEN, True, run.id, "adapter", session)
        assert said == f"Uploaded the LoRA adapter to {hub.url}/me/adapter" and kept is session
        files = hub.repos["me/adapter"]["files"]
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer_config.json",
                "base/model.safetensors", "base/config.json"} <= set(files)
        assert not any(f.startswith(("checkpoints", "merged")) or "/." in f or f.startswith(".") or
                       f in ("run.json", "data.jsonl", "model.safetensors") for f in files)
        assert files["adapter_model.safetensors"] == (run.dir / "adapter_model.safetensors").read_bytes()
        assert "Uploaded the merged model" in app.push_to_hub("me/merged", GOOD_TOKEN, False, run.id, "merged",
                                                               session)[0]
        files = hub.repos["me/merged"]["files"]
        assert {"model.safetensors", "config.json", "README.md"} <= set(files) and "adapter_config.json" not in files
        assert hub.repos["me/merged"]["private"] is False and hub.repos["me/adapter"]["private"] is True
        with pytest.raises(gr.Error, match="Upload failed: the token was not accepted"):
            app.push_to_hub("me/other", "hf_wrong", True, run.id, "adapter", session)
    finally:
        hub.close()


def test_evaluate_scores_a_run_on_the_split_it_held_out_and_says_when_it_trained_on_the_pairs(monkeypatch, tmp_path):
    """With a run picked, the validation split is the one that run held out, from its own data, fraction and seed,
    whatever the page's table and settings are now (after a reload the table holds other rows, or only 200 of them);
    a run that held none out says so. A run scored on pairs it trained on (an upload here) is named, with how many,
    on the page and in eval.md."""
    import gradio as gr

    from jaxtune.config import RunConfig, TrainConfig
    from jaxtune.data import Pair
    from jaxtune.runs import split_validation

    app, run = _finished_lora_run(monkeypatch, tmp_path, epochs=1)  # trained on Hi/Hello and Bye/Goodbye, all of it
    session = app.Session()
    session.ids.append(run.id)
    args = dict(EVAL_ARGS, include_base=False, run_ids=[run.id])
    said = []
    with pytest.raises(gr.Error, match=f"Run {run.name} held no pairs out .its validation fraction was 0.: it "
                                       "trained on all of its data. Pick the bundled held-out pairs or an upload"):
        for out in app.evaluate(**args, session=session):
            said.append(out[0])
    assert len(said) == 1 and "⚠ Not evaluated: Run" in said[0] and "evaluation before" not in said[0]

    pairs = [Pair(f"Question {i}?", f"Answer {i}.") for i in range(10)]
    cfg = RunConfig(model="tiny", samples=0, validation_fraction=0.3,
                    train=TrainConfig(batch_size=2, max_length=32, lora_rank=2, epochs=1, seed=5))
    split = app.REGISTRY.start(cfg, pairs)
    deadline = time.time() + 120
    while split.status in ("queued", "training"):
        assert time.time() < deadline
        time.sleep(0.2)
    session.ids.append(split.id)
    held = split_validation(pairs, 0.3, 5)[1]
    *_, (progress, _, examples, session) = app.evaluate(**dict(args, run_ids=[split.id]), session=session)
    assert [row[:2] for row in examples["value"].values.tolist()] == [[p.instruction, p.response] for p in held]
    assert (f"3 held-out pairs: the validation split {split.name} held out: 3 of 10 pairs of data.jsonl (fraction "
            "0.3, seed 5)") in progress and "⚠" not in progress  # the page's EIGHT rows, 0.25 and seed 3 unused

    upload = tmp_path / "mixed.jsonl"
    rows = [Pair("Hi", "Hello"), Pair("Question 1?", "Answer 1."), Pair("Where?", "Here.")]
    upload.write_text("".join(json.dumps({"instruction": p.instruction, "response": p.response}) + "\n" for p in rows))
    *_, (progress, _, _, session) = app.evaluate(**dict(args, source="upload", file=str(upload)), session=session)
    said = f"{run.name} (LoRA r2) trained on 1 of these 3 pairs: its scores on them are not held-out"
    assert f"⚠ {said}" in progress
    report = Path(next(f for f in session.eval_reports if f.endswith("eval.md"))).read_text()
    assert f"**Warning:** {said}." in report
    assert json.loads(Path(next(f for f in session.eval_reports if f.endswith("eval.json"))).read_text())[
        "models"][0]["trained_on"] == 1
    with pytest.raises(gr.Error):  # refused after an evaluation: the page says its tables are the one before
        for out in app.evaluate(**dict(args, run_ids=[run.id]), session=session):
            said = out[0]
    assert "⚠ Not evaluated: Run" in said and "The tables below are the evaluation before." in said


def test_evaluations_answer_one_at_a_time_and_a_waiting_page_says_how_many_are_ahead(monkeypatch, tmp_path):
    """A second and third browser's Evaluate wait their turn and say so on their page (it showed nothing); a page that
    leaves while it waits gives its place up; each then answers in order, and no turn is left held."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import app

    args = dict(EVAL_ARGS, source="held-out", max_new_tokens=64)  # 58 pairs: seconds of answering
    first, second, third = (app.evaluate(**args, session=app.Session()) for _ in range(3))
    assert "waiting" not in next(first)[0]  # its turn at once: it answers
    assert "waiting: 1 evaluation on this server is ahead of yours, and one answers at a time" in next(second)[0]
    assert "waiting: 2 evaluations on this server are ahead of yours" in next(third)[0]
    second.close()  # its page was closed
    assert "waiting: 1 evaluation on this server is ahead of yours" in next(third)[0]
    *_, (done, summary, _, _) = first
    assert "1 model answered 58 pairs" in done and len(summary) == 1
    said = [out[0] for out in third]
    assert "1 model answered 58 pairs" in said[-1] and not any("waiting" in text for text in said)
    assert app._EVAL_TURNS == []


def test_undo_upload_brings_back_the_rows_and_the_pairs_beyond_them(monkeypatch, tmp_path):
    """An upload over the user's rows replaces them at once and keeps them for Undo upload: the table's rows and the
    loaded pairs beyond them, with the file they came from. Over the app's own rows there is nothing to undo."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import gradio as gr

    import app

    big, small = tmp_path / "big.jsonl", tmp_path / "small.csv"
    big.write_text("".join(json.dumps({"instruction": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(250)))
    small.write_text("question,answer\nHi,Hello\n")
    start = {"headers": app.HEADERS,
             "data": [list(r) for r in zip(app.REFERENCE_INSTRUCTIONS, app.REFERENCE_RESPONSES)]}
    table, note, session, _ = app.upload_in_page(str(big), "", "", start, None)
    assert session.undo is None and "replaced" not in note and len(session.rest) == 50
    table, note, session, _ = app.upload_in_page(str(small), "", "", table, session)
    assert "The upload replaced your 200 rows and the 50 loaded pairs beyond them." in note
    assert table.values.tolist() == [["Hi", "Hello"]] and session.rest == []
    edited = {"headers": app.HEADERS, "data": [["Hi", "Hello there"]]}  # edited since the upload: the first press asks
    skipped, note, session = app.undo_upload(edited, session)
    assert ("**The uploaded rows were edited since.** Undo upload brings back your 200 rows and the 50 loaded pairs "
            "beyond them and drops those edits") in note
    assert skipped == gr.skip() and session.rest == []
    table, note, session = app.undo_upload(edited, session)  # the second undoes
    assert table.values.tolist() == [[f"Q{i}?", f"A{i}."] for i in range(200)]
    assert session.rest == [[f"Q{i}?", f"A{i}."] for i in range(200, 250)] and session.source == "big.jsonl"
    assert "Showing 200 of 250 pairs" in note and session.undo is None
    assert "Nothing to undo" in app.undo_upload(table, session)[1]
    table, note, session, _ = app.upload_in_page(str(small), "", "", table, session)  # not edited: undone at once
    table, note, session = app.undo_upload(table, session)
    assert len(table) == 200 and len(session.rest) == 50


def test_a_run_started_from_a_runs_folder_is_named_after_that_run_not_its_server_path(monkeypatch, tmp_path):
    """Resume's advice for a finished run is to start a new one from its folder: the new run, the runs table, Try and
    Evaluate then name its model "run <name>" (a server path pushed the runs table's columns off the screen)."""
    app, run = _finished_lora_run(monkeypatch, tmp_path, epochs=1)
    assert app._model_label(str(run.dir)) == f"run {run.name}" and app._model_label("gpt2") == "gpt2"
    (tmp_path / "mine").mkdir()
    assert app._model_label(str(tmp_path / "mine")) == "mine"  # another local folder: its own name
    session = app.Session()
    table = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]}
    new = app._start_new(table, str(run.dir), "response", 1, 2, 3e-3, 32, 0, 0, "float32", 0, False, "LoRA", 2, False,
                         session=session)
    session.ids.append(new.id)
    assert new.name.endswith(f" from run {run.name}") and str(run.dir) not in new.name
    deadline = time.time() + 120
    while new.status in ("queued", "training"):
        assert time.time() < deadline
        time.sleep(0.2)
    assert new.status == "finished", new.message
    assert app._runs_frame([new]).loc[0, "Model"] == f"run {run.name}"
    models, base, _ = app._eval_models(True, [new.id], "tiny", 0, session)
    assert base == str(run.dir) and models[0][0] == f"base: run {run.name}"


def test_a_new_model_replaces_the_defaults_and_keeps_each_typed_value(monkeypatch, tmp_path):
    """Field by field: a value the user typed stays, the others take the new model's defaults (one typed value used
    to keep every field, the old model's defaults included); a name that is no model is said to be none."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import gradio as gr

    import app

    tiny, pre = app.TINY_DEFAULTS, app.PRETRAINED_DEFAULTS
    on_gpt2 = app._defaults_of(pre)  # the page put gpt2's defaults in, then the user typed 1 epoch
    *fields, note, applied = app.follow_model("tiny", 1, *on_gpt2[1:], on_gpt2)
    assert fields[0] == gr.skip() and fields[1:] == app._defaults_of(tiny)[1:]
    assert note.endswith("Your own values were kept: epochs 1 (default 20).") and applied == app._defaults_of(tiny)
    *fields, note, applied = app.follow_model("gpt2", 1, *app._defaults_of(tiny)[1:], applied)  # back: 1 stays
    assert fields == [gr.skip(), *on_gpt2[1:]] and applied == on_gpt2
    typed = [3, 8, 5e-3, 96, 20]  # on tiny the user typed 3 epochs, which is gpt2's default: still theirs
    *fields, note, _ = app.follow_model("gpt2", *typed, app._defaults_of(tiny))
    assert fields == [gr.skip(), 8, 5e-5, 128, 10] and "were kept" not in note  # (3 is gpt2's own default too)
    assert "is neither a model folder here" in app.model_defaults(str(tmp_path)).why  # a folder without config.json
    unknown = app.model_defaults("nobody/no-such-model").why  # it said 'is pretrained' of a name nothing had checked
    assert "is not on this machine: a run downloads it from the hub, if the hub has it" in unknown
    assert "is pretrained" in app.model_defaults("gpt2").why  # a GPT-2 the project knows


def test_the_memory_check_counts_the_method(monkeypatch, tmp_path):
    """On a cpu-basic Space (16 GB, 80% for a run) gpt2-large cannot be fully fine-tuned (24 bytes a parameter) but
    can be trained with LoRA (8, its base frozen); the refusal says which method would fit."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import gradio as gr

    import app
    from jaxtune.config import PRESETS

    monkeypatch.setattr(app, "RUN_MEMORY", int(0.8 * 16 * 2**30))
    large = PRESETS["gpt2-large"]
    with pytest.raises(gr.Error, match=r"Full fine-tuning with batch size 4 x max length 128 on gpt2-large needs about "
                                       r"2\d\.\d GiB by this server's estimate; a run has 12\.8 GiB here\. Pick LoRA or "
                                       r"QLoRA"):
        app._check_memory(large, "gpt2-large", 4, 128)
    app._check_memory(large, "gpt2-large", 4, 128, lora_rank=16)  # about 10 GiB
    with pytest.raises(gr.Error, match=r"LoRA rank 16 with batch size 64 x max length 1024 on gpt2-large .* Lower the "
                                       r"batch size"):
        app._check_memory(large, "gpt2-large", 64, 1024, lora_rank=16)
    with pytest.raises(gr.Error, match=r"batch size 64 x max length 1024 \(its 1024 positions; 4096 was asked\) on"):
        app._check_memory(large, "gpt2-large", 64, 4096, lora_rank=16)  # the length the run would use, and why
    full, lora = app.run_bytes(large, 4, 128), app.run_bytes(large, 4, 128, lora_rank=16)
    adapters = 16 * large.n_layer * 16 * 11 * large.n_embd  # 16 bytes each: c_attn, attn.c_proj, mlp.c_proj at r=16
    assert full - lora == pytest.approx(16 * app._parameters(large) - adapters, rel=1e-6)  # 24 - 8 bytes a parameter
    # Keep the best holds a float32 copy of what trains: 4 bytes a parameter (full), 4 an adapter parameter (LoRA)
    assert app.run_bytes(large, 4, 128, keep_best=True) - full == 4 * app._parameters(large)
    assert app.run_bytes(large, 4, 128, lora_rank=16, keep_best=True) - lora == adapters // 4
    medium = PRESETS["gpt2-medium"]  # 355M: about 9.9 GiB to fine-tune, 11.2 with one more copy of its weights
    monkeypatch.setattr(app, "RUN_MEMORY", int(10.5 * 2**30))
    app._check_memory(medium, "gpt2-medium", 4, 128)
    with pytest.raises(gr.Error, match=r"Full fine-tuning keeping the best weights with batch size 4 .* Untick Keep "
                                       r"the best \(it holds one more copy of the trained weights\), or pick LoRA"):
        app._check_memory(medium, "gpt2-medium", 4, 128, keep_best=True)


def test_a_pages_first_events_share_one_session(monkeypatch, tmp_path):
    """A reloaded page's first events (load events, the first poll, a click) all start with no session stored: they
    get one object, so what one keeps (a first Load example press) is not dropped by another finishing after it.
    Each made its own, and a quick second press asked again (seen under load in the browser test)."""
    import gradio as gr

    import app

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    request = gr.Request(session_hash="page-1")
    barrier = threading.Barrier(8)

    def first_event(_):
        barrier.wait()
        return app._session(None, request)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sessions = list(pool.map(first_event, range(8)))
    assert all(s is sessions[0] for s in sessions)
    sessions[0].example_asked = 1.0  # what the click's event kept
    assert app._session(None, request).example_asked == 1.0  # an event that started before it was stored sees it
    assert app._session(None, gr.Request(session_hash="page-2")) is not sessions[0]  # another page, its own
    app._unload(request)


def test_zips_asked_for_at_once_are_built_once(monkeypatch, tmp_path):
    """The page's poll and a pick can ask for a run's zip at the same moment: both get the one zip, whole, and no
    temporary file is left (they used to share one temporary name, and one rename failed: 'Something went wrong')."""
    app, run = _finished_lora_run(monkeypatch, tmp_path, epochs=1)
    session = app.Session()
    barrier = threading.Barrier(8)

    def ask(kind):
        barrier.wait()
        return app._zip(run, session, kind)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(ask, ["adapter"] * 4 + ["merged"] * 4))
    assert len(set(paths[:4])) == 1 and len(set(paths[4:])) == 1 and paths[0] != paths[4]
    with zipfile.ZipFile(paths[0]) as z:
        assert {"adapter_config.json", "adapter_model.safetensors", "base/model.safetensors"} <= set(z.namelist())
        assert z.testzip() is None
    with zipfile.ZipFile(paths[4]) as z:
        assert "model.safetensors" in z.namelist() and z.testzip() is None
    assert not [p for p in Path(paths[0]).parent.iterdir() if p.name.endswith(".tmp")]


def test_a_poll_in_flight_does_not_send_back_the_export_kind_the_user_left(monkeypatch, tmp_path):
    """A poll that read "adapter" just before the user picked "Merged full model" used to compare what it made with
    what the page had only after the pick had sent the merged zip: it then sent the adapter's zip back, last, and the
    next Download gave the adapter (seen once in CI's browser test). A page's views are now made one at a time."""
    app, run = _finished_lora_run(monkeypatch, tmp_path, epochs=1)
    session = app.Session()
    session.ids, session.pick, session.attached = [run.id], run.id, True
    app._view(session, force=True)
    session.sent.clear()  # as after a pick in the runs table: the next poll sends everything, the export button too
    zip_made, in_poll, go = app._zip, threading.Event(), threading.Event()

    def held_zip(run_, session_, kind="adapter"):
        if threading.current_thread().name == "poll":
            in_poll.set()
            go.wait(10)
        return zip_made(run_, session_, kind)

    monkeypatch.setattr(app, "_zip", held_zip)
    done = []  # (which, the export button's update), in the order they finished
    poll = threading.Thread(target=lambda: done.append(("poll", app.poll(session, [])[9])), name="poll")
    picked = []  # the download button as the pick left it: disabled until its zip is in it

    def pick_then_show():
        picked.append(app.pick_export("merged", session)[1])
        done.append(("pick", app.show_export(session)[9]))

    pick = threading.Thread(target=pick_then_show)
    poll.start()
    assert in_poll.wait(30)
    pick.start()
    pick.join(1.5)  # the pick had all the time it needed to finish before the poll went on
    go.set()
    poll.join(60), pick.join(60)
    assert [w for w, _ in done] == ["poll", "pick"]  # the pick waited for the poll's view
    assert picked[0]["interactive"] is False and "Preparing the merged full model" in picked[0]["label"]
    assert done[-1][1]["value"].endswith("-merged.zip") and "merged model" in done[-1][1]["label"]
    assert str(app.poll(session, [])[9]["value"]).endswith("-merged.zip")  # the next poll sends the merged zip again


def test_a_reload_brings_back_every_row_of_the_table():
    """A loaded file fills the table's first 200 rows; rows the user adds after them are the user's, and a reload
    brought back the first 200 only (the 201st was lost without a word)."""
    import app

    rows = [[f"Question {i}?", f"Answer {i}."] for i in range(app.TABLE_ROWS + 1)]
    table, *_ = app.restore_page({"model": "tiny", "rest": 0, "source": "", "table": rows}, None)
    assert table.values.tolist() == rows


def test_the_panels_follow_the_run_shown_through_show_command_stop_and_delete(monkeypatch, tmp_path):
    """Found by a hands-on trial: Show command's panel kept an old run's command after another run was picked; Stop's
    'Stopping ...' stayed after the run had stopped; a second Stop said no run of the page's was training while one
    was; Delete asked to confirm deleting a training run, then refused; and after a Delete the train panel showed
    no run while Export acted on the next one."""
    import gradio as gr

    app, first = _finished_lora_run(monkeypatch, tmp_path, epochs=1)
    _, second = _finished_lora_run(monkeypatch, tmp_path, epochs=1)
    session = app.Session()
    session.ids += [first.id, second.id]
    COMMAND, STOP_NOTE = 12, 14  # [session, *view]: ..., run note, command line, config.yaml, Stop's note
    skipped = gr.skip()  # what the page keeps as it is
    assert app.pick_run(first.id, session)[COMMAND:] == [skipped] * 3  # nothing to change
    line, config = app.show_command(session)
    assert first.id in line["value"] and config["visible"]
    assert app.poll(session, [])[COMMAND:COMMAND + 2] == [skipped] * 2  # still its run
    out = app.pick_run(second.id, session)
    assert [(o.get("visible"), o.get("value")) for o in out[COMMAND:COMMAND + 2]] == [(False, "")] * 2  # hidden

    table = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]}
    saved, session, *view = app.start_run(table, *dict(TRAIN_ARGS, epochs=5000, validation_fraction=0).values(),
                                          session, [])
    live = app.REGISTRY.get(session.watch)
    said = app.delete_in_page(live.id, session)  # the first press, not after a confirming one; a note, not an error,
    assert re.search(r"\*\*Cannot delete:\*\* .* is (queued|training); press Stop first, then Delete", said)  # which
    assert session.delete_asked is None and live.status in app.ACTIVE  # left the last note under an 'Error' badge
    app.pick_run(second.id, session)  # the panel shows a finished run; one of the page's trains
    said = app.stop_run(session)
    assert f"{second.name}, the run shown, is finished. {live.name} is " in said and "pick it in the runs table" in said
    app.pick_run(live.id, session)
    assert app.stop_run(session).startswith(f"Stopping {live.name}")
    deadline = time.time() + 120
    while live.status in app.ACTIVE:
        assert time.time() < deadline
        assert app.poll(session, [])[STOP_NOTE] == skipped or live.status not in app.ACTIVE
        time.sleep(0.2)
    assert app.poll(session, [])[STOP_NOTE] == ""  # the run stopped: its note goes
    assert app.poll(session, [])[STOP_NOTE] == skipped  # once

    app.pick_run(first.id, session)
    assert "Deleted" in app.delete_run(first.id, session)
    app.poll(session, [])
    assert session.pick == session.watch is not None and session.watch != first.id  # one run, in every panel


def test_the_progress_line_says_the_first_step_waits_for_the_compiler(tmp_path):
    """Until its first step, a run's line said 'step 0/70 · 0% · training' for 20 s, and a resumed run kept the ETA
    and rate it had before it stopped: now it says what it waits for, and shows no figure from before."""
    import app
    from jaxtune.runs import Run

    run = Run(id="x", dir=tmp_path, name="r", model="tiny", pairs=2, created=0.0, status="training", total_steps=70,
              warming_up=True, eta=12.0, tokens_per_sec=300.0)
    text = app._progress_html(run)
    assert "step 0/70" in text and "compiling the train step" in text and "ETA" not in text and "tokens/s" not in text
    run.warming_up, run.step = False, 1
    assert "ETA 0m 12s" in app._progress_html(run) and "compiling" not in app._progress_html(run)
    waited = Run(id="y", dir=tmp_path, name="w", model="tiny", pairs=2, created=0.0, status="stopped",
                 message="cancelled while it waited in the queue")  # Stop before it trained: the table says so
    assert app._runs_frame([run, waited])["Status"].tolist() == ["training", "cancelled"]


def test_the_runs_table_counts_the_pairs_a_run_trains_on_and_those_it_holds_out(monkeypatch, tmp_path):
    """It showed 8 pairs for a run that trained on 6 and held out 2."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import app
    from jaxtune.runs import Run

    runs = [Run(id="a", dir=tmp_path, name="a", model="tiny", pairs=8, created=0, held_out=2),
            Run(id="b", dir=tmp_path, name="b", model="tiny", pairs=1500, created=0)]
    assert app._runs_frame(runs)["Pairs"].tolist() == ["6 + 2 held out", "1,500"]


def test_the_preview_shows_a_character_split_over_tokens_once(monkeypatch, tmp_path):
    """An emoji is 2-4 byte tokens: the preview showed a '�' for each."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import app
    from jaxtune.data import encode

    e = encode(app.TOKENIZER, "Say hi 😀", "Hello 👋 there", max_length=64)
    spans = app._token_spans(e.input_ids.tolist(), e.loss_mask.tolist())
    assert len(e.input_ids) > len(spans) and not any("\ufffd" in text for text, _ in spans)
    assert (" 😀", None) in spans and (" 👋", "loss") in spans and spans[-1] == ("<|endoftext|>", "loss")
    assert "".join(text for text, _ in spans[:-1]) == "Instruction: Say hi 😀\nResponse: Hello 👋 there"


def test_every_poll_takes_the_page_values_raw(monkeypatch, tmp_path):
    """Resume (then Stop, Delete) polled with Gradio's preprocessing: a run picked for Try that had begun training
    was no longer a choice, and the page popped "Value: <run id> is not in the list of choices: [<run ids>]"
    (found by a hands-on trial). Every event that runs poll takes the values as sent, as the timer's does."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import app

    polls = [d for d in app.demo.fns.values() if getattr(d.fn, "__name__", "") == "poll"]
    assert len(polls) >= 4  # the timer's, and after Stop, Resume and Delete
    assert all(d.preprocess is False for d in polls), [d.preprocess for d in polls]


def test_a_run_whose_eta_passes_the_time_limit_says_where_the_limit_ends_it(monkeypatch, tmp_path):
    """100,000 epochs started without a word and read 'ETA 649m 12s' under a 60-minute limit (a hands-on trial)."""
    import time as clock

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path / "runs"))
    import app
    from jaxtune.runs import Run

    monkeypatch.setattr(app.REGISTRY, "max_seconds", 3600)
    run = Run(id="x", dir=tmp_path, name="tiny", model="tiny", pairs=2, created=clock.time(), status="training",
              started=clock.time() - 600, step=1000, total_steps=100_000, eta=38_952.0, tokens_per_sec=900.0)
    line = app._progress_html(run)
    assert "ETA 649m 12s, past the time limit of 60m 00s (JAXTUNE_MAX_TRAIN_SECONDS): it stops in 49m 5" in line
    assert "near step 8,6" in line and "keeps what it learned" in line  # 1,000 + 99,000 x 3,000 / 38,952 = 8,625
    run.eta = 2000.0  # within the limit: the ETA alone
    assert "ETA 33m 20s ·" in app._progress_html(run) and "time limit" not in app._progress_html(run)
