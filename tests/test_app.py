"""The Gradio app, started as `python app.py` on a loopback port: through its API and in a real browser.

Screenshots of each browser step land in the test's temporary directory (and in $JAXTUNE_SCREENSHOTS if set).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import transformers
from gradio_client import Client
from gradio_client.exceptions import AppError

from jaxtune.data import read_pairs

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_tmp(tmp_path_factory):
    """The app's TMPDIR: its session folders (jaxtune-app-*) and Gradio's cache."""
    return tmp_path_factory.mktemp("app-tmp")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, app_tmp):
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT), TMPDIR=str(app_tmp),
               GRADIO_HEARTBEAT_INTERVAL="1")  # a closed tab is noticed within a second
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"app.py did not start: {log.read_text()[-2000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


TRAIN_ARGS = dict(model_name="tiny", loss_on="response", epochs=4, batch_size=4, learning_rate=3e-3, max_length=64,
                  warmup_steps=2, seed=0, precision="float32", validation_fraction=0.25, pack=False)


def test_api_end_to_end(app_url, tmp_path):
    """Load data, train a few steps, stop, generate, export; the zip loads in PyTorch transformers."""
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
    seen = 0
    for progress, plot, log in job:
        seen += 1
        if "step 3/" in progress:
            assert "Stopping" in client.predict(api_name="/stop")
    progress, plot, log = job.outputs()[-1]
    assert "stopped after step" in progress and "keeps what it learned" in progress
    steps = [row[0] for row in plot["data"] if row[2] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and 3 <= len(steps) < 8 * 4
    assert any(row[2] == "validation" for row in plot["data"])
    base, tuned = client.predict("Where is my order?", 0.0, 0.95, 16, "tiny", api_name="/generate")
    assert base and tuned and "train a model" not in tuned
    exported = client.predict(api_name="/export")
    zip_path = exported["value"] if isinstance(exported, dict) else exported  # the component update carries the file
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(tmp_path / "model")
    pt = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tok("Hello world").input_ids == [15496, 995] and pt.config.n_layer == 2
    metrics = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == steps
    with torch.no_grad():
        assert torch.isfinite(pt(torch.tensor([[15496, 995]])).logits).all()


ONE_ROW = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"]]}


def test_bad_input_gets_clear_messages(app_url, tmp_path):
    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="no pairs"):
        client.predict({"headers": ["Instruction", "Response"], "data": [["", ""]]}, *TRAIN_ARGS.values(),
                       api_name="/train")
    with pytest.raises(AppError, match=r"row 2: empty response"):
        client.predict({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", " "]]},
                       *TRAIN_ARGS.values(), api_name="/train")
    args = dict(TRAIN_ARGS, model_name="nobody/no-such-model")
    with pytest.raises(AppError, match="not in the local Hugging Face cache"):
        client.predict({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"]]}, *args.values(),
                       api_name="/train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{oops\n')
    from gradio_client import handle_file

    with pytest.raises(AppError, match=r"line 2 is not valid JSON.*left as it was"):
        client.predict(handle_file(str(bad)), "", "", ONE_ROW, api_name="/upload")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Translate", "input": "chat", "output": "cat"}]))
    table, note = client.predict(handle_file(str(alpaca)), "", "", ONE_ROW, api_name="/upload")
    assert table["data"] == [["Translate\n\nchat", "cat"]] and note == ""  # all shown: nothing to say
    with pytest.raises(AppError, match="no tuned model yet"):
        Client(app_url, verbose=False).predict(api_name="/export")


def test_desktop_loads_local_model_directories(app_url, hf_dir):
    """Not public: the model field also takes a directory on this machine."""
    base, tuned = Client(app_url, verbose=False).predict("Hi", 0.0, 0.95, 8, str(hf_dir), api_name="/generate")
    assert base and "train a model" in tuned


def test_sessions_are_separate(app_url):
    """A second browser session sees none of the first one's model."""
    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    _, _, log = first.predict({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]},
                              *dict(TRAIN_ARGS, epochs=1, validation_fraction=0, pack=True).values(), api_name="/train")
    assert "training 1 step on" in log and "(packed)" in log  # both pairs in one packed row
    exported = first.predict(api_name="/export")
    assert (exported["value"] if isinstance(exported, dict) else exported).endswith(".zip")
    _, tuned = second.predict("Hi", 0.0, 0.95, 8, "tiny", api_name="/generate")
    assert "train a model" in tuned


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


def test_browser_train_stop_try(app_url, app_tmp, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(app_url)
    page.wait_for_selector("#pairs-table")
    page.wait_for_function("() => document.querySelector('#counts') && document.querySelector('#counts').innerText.includes('pairs')")
    cells = page.locator('#pairs-table [data-testid^="cell-"]:visible')

    def edit(index, text):  # wait for the cell's editor to have focus before replacing its text
        cells.nth(index).dblclick()
        page.wait_for_function("() => { const e = document.activeElement; return e && e.closest('#pairs-table') "
                               "&& ['TEXTAREA', 'INPUT'].includes(e.tagName); }", timeout=10_000)
        page.locator("#pairs-table textarea:focus, #pairs-table input:focus").fill(text)
        page.keyboard.press("Enter")
        page.wait_for_function("([i, t]) => document.querySelectorAll('#pairs-table [data-testid^=\"cell-\"]')[i]"
                               ".innerText.trim().startsWith(t)", arg=[index, text], timeout=10_000)

    rows = [("Where is my parcel?", "It ships tomorrow and arrives on Friday."),
            ("Can I pay by card?", "Yes, we accept Visa and Mastercard.")]
    for r, (instruction, response) in enumerate(rows):
        edit(2 * r, instruction)
        edit(2 * r + 1, response)
    page.wait_for_function("() => document.querySelector('#preview').innerText.includes('parcel')")
    assert [cells.nth(i).inner_text().replace("\u22ee", "").strip() for i in range(4)] == [t for row in rows for t in row]
    assert "2 pairs" in page.locator("#counts").inner_text()
    assert page.locator("#preview").inner_text().count("<|endoftext|>") == 1
    _shot(page, tmp_path, "1-data")

    model = page.get_by_role("combobox", name="Model")
    model.click()
    model.fill("tiny")
    page.keyboard.press("Enter")
    page.get_by_label("Epochs").fill("200")
    page.get_by_label("Learning rate").fill("0.003")
    page.locator("#train").click()
    page.wait_for_function("() => /step [3-9]\\d*\\//.test(document.querySelector('#progress .jt-progress-text').innerText)",
                           timeout=180_000)
    width = page.locator("#progress .jt-bar").evaluate("e => parseFloat(e.style.width)")
    assert width > 0
    assert "ETA" in _progress_text(page) and "tokens/s" in _progress_text(page)
    page.wait_for_function("() => document.querySelectorAll('#loss-plot [aria-roledescription=\"point\"]').length >= 3")
    points = page.locator('#loss-plot [aria-roledescription="point"]').evaluate_all("els => els.map(e => e.getAttribute('aria-label'))")
    losses = [float(p.split("loss: ")[1].split(";")[0]) for p in points if "split: train" in p]
    assert len(losses) >= 3 and all(np.isfinite(losses))
    line = page.locator('#loss-plot path[aria-roledescription="line mark"]').first
    assert line.get_attribute("d").count("L") >= 2 and line.get_attribute("stroke") == "#f97316"  # drawn, visibly
    _shot(page, tmp_path, "2-training")

    page.wait_for_function("() => /step ([89]|\\d\\d+)\\//.test(document.querySelector('#progress .jt-progress-text').innerText)",
                           timeout=120_000)
    page.locator("#stop").click()
    page.wait_for_function("() => document.querySelector('#progress .jt-progress-text').innerText.includes('stopped after step')",
                           timeout=60_000)
    stopped_at = int(_progress_text(page).split("step ")[1].split("/")[0])
    assert stopped_at < 200  # far from the end: Stop took effect
    assert "keeps what it learned" in page.locator("#log textarea").input_value()
    _shot(page, tmp_path, "3-stopped")

    page.locator("#instruction textarea").fill("Where is my parcel?")
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#tuned-out textarea').value.length > 0", timeout=60_000)
    page.wait_for_function("() => document.querySelector('#base-out textarea').value.length > 0", timeout=60_000)
    previous, deadline = None, time.time() + 60
    while time.time() < deadline:  # streaming: wait until both answers stop growing
        current = (page.locator("#base-out textarea").input_value(), page.locator("#tuned-out textarea").input_value())
        if current == previous:
            break
        previous = current
        page.wait_for_timeout(1500)
    assert previous[1].startswith("It ships")  # a few steps on two pairs already shape the tuned answer
    _shot(page, tmp_path, "4-try")

    folders = set(app_tmp.glob("jaxtune-app-*"))
    page.locator("#export").click()
    page.wait_for_selector("#zip a[download], #zip a[href*='.zip']", timeout=60_000)
    assert "jaxtune-model.zip" in page.locator("#zip").inner_text().replace("\n", "")
    _shot(page, tmp_path, "5-export")
    [folder] = set(app_tmp.glob("jaxtune-app-*")) - folders  # the session's own folder, made by the export
    page.close()  # the session ends: its folder goes (Gradio itself would call the state's callback an hour later)
    deadline = time.time() + 30
    while folder.exists():
        assert time.time() < deadline, "the closed session's folder was not removed"
        time.sleep(0.5)


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
    page.locator("#table-only").click()
    page.wait_for_function("() => document.querySelector('#counts').innerText.includes('200 pairs')")
    assert not page.locator("#table-only").is_visible() and "Showing" not in page.locator("#data-note").inner_text()
    page.close()


def _long_run(client, epochs=100_000):
    return client.submit({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]},
                         *dict(TRAIN_ARGS, epochs=epochs, validation_fraction=0).values(), api_name="/train")


def _wait_iterating(job, seconds=120):
    deadline = time.time() + seconds
    while job.status().code.name != "ITERATING" or len(job.outputs()) < 3:
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.5)


def test_runs_queue_one_at_a_time_and_show_their_place(app_url):
    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    running = _long_run(first)
    _wait_iterating(running)
    waiting = _long_run(second, epochs=1)
    deadline = time.time() + 30
    while waiting.status().rank is None and time.time() < deadline:
        time.sleep(0.3)
    status = waiting.status()
    assert status.code.name == "IN_QUEUE" and status.rank == 0  # first in line, behind the running job
    first.predict(api_name="/stop")
    assert "stopped after step" in running.result()[0]
    assert "done" in waiting.result(timeout=120)[0]


def test_closed_tab_releases_the_machine(app_url, browser):
    page = browser.new_page()
    page.goto(app_url)
    page.wait_for_selector("#pairs-table")
    model = page.get_by_role("combobox", name="Model")
    model.click()
    model.fill("tiny")
    page.keyboard.press("Enter")
    page.get_by_label("Epochs").fill("100000")
    page.locator("#train").click()
    page.wait_for_function("() => document.querySelector('#progress .jt-progress-text').innerText.includes('step 2/')",
                           timeout=120_000)
    page.close()  # the run must not hold the (one) training slot after its tab is gone
    job = _long_run(Client(app_url, verbose=False), epochs=1)
    assert "done" in job.result(timeout=60)[0]


def test_preview_lists_problems_with_row_numbers(app_url):
    client = Client(app_url, verbose=False)
    rows = [["Hi", "Hello"], ["", "orphan"], ["Hi", "Hello"], ["Long", "word " * 80]]
    spans, counts, problems = client.predict({"headers": ["Instruction", "Response"], "data": rows}, 1, 32, "response",
                                             api_name="/preview")
    assert "row 2: empty instruction" in problems and "row 3: duplicate of row 1" in problems
    assert "row 4: longer than 32 tokens" in problems and "1 will be truncated" in counts


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
    ("epochs", 2.5, r"Epochs must be a whole number .*got 2\.5"),
    ("batch_size", 10**9, r"Batch size must be a whole number from 1 to 256; got 1,000,000,000"),
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
    _, _, log = client.predict(TWO_ROWS, **dict(TRAIN_ARGS, epochs=1, validation_fraction=0), api_name="/train")
    assert "finished 1 step" in log and "time limit: 3,600 s for the whole run (JAXTUNE_MAX_TRAIN_SECONDS)" in log


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
    assert raw_call(app_url, "generate", ["Hi", float("nan"), 0.95, 16, "tiny"]) == (
        "error", "Temperature must be a number from 0 to 1.5; got nan. Enter a finite number.")
    assert raw_call(app_url, "preview", [TWO_ROWS, float("nan"), 128, "response"]) == (
        "error", "Preview row must be a whole number from 1 to 1,000,000; got nan. Enter a finite number.")
    # the preview follows the widgets as they are typed in: out-of-range numbers take the nearest allowed value
    _, counts, _ = client.predict(TWO_ROWS, 10**9, 10**9, "response", api_name="/preview")
    assert "2 pairs" in counts and "showing row 2" in counts


def test_push_without_network_is_a_clear_error(app_url):
    client = Client(app_url, verbose=False)
    client.predict({"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"]]},
                   *dict(TRAIN_ARGS, epochs=1, validation_fraction=0).values(), api_name="/train")
    with pytest.raises(AppError, match="hub cannot be reached"):
        client.predict("someone/model", "hf_token", True, api_name="/push")
    with pytest.raises(AppError, match="user/name"):
        client.predict("no-slash", "hf_token", True, api_name="/push")


def test_unexpected_errors_are_logged_with_a_reference_not_shown(caplog, monkeypatch):
    """Whatever goes wrong unexpectedly reaches the user as a reference, the exception only the server's log."""
    monkeypatch.syspath_prepend(str(ROOT))
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
