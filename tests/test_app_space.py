"""The app as a public Hugging Face Space (JAXTUNE_PUBLIC=1, as SPACE_ID does): `python app.py` on a loopback port
with small limits, driven through gradio_client. The last test stops it with SIGTERM."""

import json
import shutil
import signal
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from conftest import start_app

ROOT = Path(__file__).resolve().parents[1]
TIME_LIMIT = 20  # JAXTUNE_MAX_TRAIN_SECONDS
ORPHAN_SECONDS = 3  # JAXTUNE_ORPHAN_SECONDS: a run no page has polled for this long is stopped
LIMITS = dict(JAXTUNE_PUBLIC="1", JAXTUNE_MAX_ROWS="500", JAXTUNE_MAX_UPLOAD_MB="0.05",
              JAXTUNE_MAX_TRAIN_SECONDS=str(TIME_LIMIT), JAXTUNE_ORPHAN_SECONDS=str(ORPHAN_SECONDS),
              JAXTUNE_MAX_STEPS="1000000", JAXTUNE_MAX_EXAMPLES_SEEN="1000000",  # so that the time limit stops runs
              JAXTUNE_EVAL_MAX_PAIRS="5")
TRAIN_ARGS = dict(model_name="tiny", loss_on="response", epochs=1, batch_size=64, learning_rate=3e-3, max_length=64,
                  warmup_steps=0, seed=0, precision="float32", validation_fraction=0.0, pack=False)
TWO_ROWS = {"headers": ["Instruction", "Response"], "data": [["Hi", "Hello"], ["Bye", "Goodbye"]]}


class App:
    def __init__(self, proc, url, tmp, log, runs):
        self.proc, self.url, self.tmp, self.log, self.runs = proc, url, tmp, log, runs

    def client(self):
        return Client(self.url, verbose=False)


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("space-tmp")  # TMPDIR: session folders and Gradio's cache
    log = tmp_path_factory.mktemp("space") / "app.log"
    runs = tmp_path_factory.mktemp("space-runs")
    proc, url = start_app(log, drop=["SPACE_ID"], TMPDIR=str(tmp), JAXTUNE_RUNS_DIR=str(runs),
                          GRADIO_HEARTBEAT_INTERVAL="1", **LIMITS)
    yield App(proc, url, tmp, log, runs)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _jsonl(path, n, width=0):
    path.write_text("".join(json.dumps({"instruction": f"question {i}", "response": f"answer {i}" + " x" * width}) + "\n"
                            for i in range(n)))
    return path


PATHS = ["/etc", "/etc/passwd", ".", "..", "../x", "~", "~/models", "./examples", "/nonexistent/dir", "a/b/c",
         "C:\\models", "examples/", "http://example.com/model"]


def test_model_field_takes_hub_ids_and_presets_only(space, hf_dir):
    client = space.client()
    messages = set()
    for name in PATHS + [str(hf_dir)]:  # a real model directory too: the desktop app would load it
        with pytest.raises(AppError) as info:
            client.predict(TWO_ROWS, **dict(TRAIN_ARGS, model_name=name), api_name="/train")
        messages.add(str(info.value))
        with pytest.raises(AppError) as info:
            client.predict("Hi", 0.0, 0.95, 16, name, api_name="/generate")
        messages.add(str(info.value))
    [message] = messages  # one message for every refused value: it says nothing about what is on the server
    assert "hub id" in message and "tiny" in message and not any(p in message for p in ("/etc", "..", "~"))
    # relative folders that exist next to app.py are names like any other: looked up in the hub's cache only
    answers = {}
    for name in ("examples", "jaxtune", "tests", "no-such-folder"):
        with pytest.raises(AppError) as info:
            client.predict(TWO_ROWS, **dict(TRAIN_ARGS, model_name=name), api_name="/train")
        answers[name] = str(info.value).replace(repr(name), "NAME")
    assert len(set(answers.values())) == 1 and "not in this server's Hugging Face cache" in answers["examples"]
    # the presets work
    progress, _, log = client.predict(TWO_ROWS, **TRAIN_ARGS, api_name="/train")
    assert "step 1/1" in progress and "finished" in progress and "model: tiny" in log


def test_uploads_are_limited_in_rows_and_size(space, tmp_path):
    client = space.client()
    with pytest.raises(AppError, match=r"many\.jsonl has 501 rows; this server takes at most 500 \(JAXTUNE_MAX_ROWS\)"):
        client.predict(handle_file(str(_jsonl(tmp_path / "many.jsonl", 501))), "", "", None, api_name="/upload")
    frame = pd.DataFrame({"prompt": [f"q{i}" for i in range(600)], "completion": [f"a{i}" for i in range(600)]})
    frame.to_parquet(tmp_path / "many.parquet")
    with pytest.raises(AppError, match=r"many\.parquet has 600 rows; this server takes at most 500"):
        client.predict(handle_file(str(tmp_path / "many.parquet")), "", "", None, api_name="/upload")
    big = _jsonl(tmp_path / "big.jsonl", 100, width=300)
    assert big.stat().st_size > 0.05 * 2**20
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client checks the Space's limit
        client.predict(handle_file(str(big)), "", "", None, api_name="/upload")
    with open(big, "rb") as f:  # and so does the server, for any other client
        r = httpx.post(f"{space.url}/gradio_api/upload", files={"files": ("big.jsonl", f)})
    assert r.status_code == 413
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{oops\n')
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(bad)), "", "", None, api_name="/upload")
    assert str(info.value).startswith("bad.jsonl line 2: not valid JSON") and str(space.tmp) not in str(info.value)
    with pytest.raises(AppError, match=r"notes\.txt: upload a \.jsonl, \.json, \.csv, \.tsv, \.parquet file"):
        (tmp_path / "notes.txt").write_text("hello")
        client.predict(handle_file(str(tmp_path / "notes.txt")), "", "", None, api_name="/upload")
    with pytest.raises(AppError, match=r"The data has 501 rows; this server takes at most 500"):
        client.predict({"headers": ["a", "b"], "data": [["Hi", "Hello"]] * 501}, **TRAIN_ARGS, api_name="/train")
    # a malformed table is refused by Gradio itself; the public server shows no exception text
    with pytest.raises(AppError) as info:
        client.predict({"headers": ["a", "b"], "data": "x"}, **TRAIN_ARGS, api_name="/train")
    assert "pydantic" not in str(info.value) and "validation error" not in str(info.value)
    assert "does not fit /train: a value is not of the kind its input takes" in str(info.value)


def test_big_upload_stays_on_the_server(space, tmp_path):
    """The page gets the first 200 pairs and the count; training uses them all, until 'Use the table only'."""
    client = space.client()
    table, note = client.predict(handle_file(str(_jsonl(tmp_path / "pairs.jsonl", 300))), "", "", None,
                                 api_name="/upload")
    assert len(table["data"]) == 200 and table["data"][0] == ["question 0", "answer 0"]
    assert "Showing 200 of 300 pairs** from pairs.jsonl; all are used for training" in note
    _, counts, _ = client.predict(table, 1, 64, "response", api_name="/preview")
    assert counts.startswith("**300 pairs")
    _, counts, _ = client.predict(table, 250, 64, "response", api_name="/preview")
    assert "showing row 250" in counts  # a pair the page does not hold, previewed by its number
    table["data"][0] = ["question zero", "answer zero"]  # an edit in the table applies; the rest stays
    _, _, log = client.predict(table, **TRAIN_ARGS, api_name="/train")
    assert "300 pairs" in log.splitlines()[0] and "; 5 steps on cpu" in log  # 300 pairs in batches of 64
    assert client.predict(api_name="/use_table_only") == ""
    _, counts, _ = client.predict(table, 1, 64, "response", api_name="/preview")
    assert counts.startswith("**200 pairs")
    pd.DataFrame({"question": ["Where is my order?", "Can I pay by card?"],
                  "answer": ["It ships tomorrow.", "Yes."]}).to_parquet(tmp_path / "two.parquet")
    table, note = client.predict(handle_file(str(tmp_path / "two.parquet")), "", "", None, api_name="/upload")
    assert table["data"] == [["Where is my order?", "It ships tomorrow."], ["Can I pay by card?", "Yes."]] and not note


def test_the_time_limit_covers_the_whole_run_and_says_so(space):
    client = space.client()
    client.predict(TWO_ROWS, **TRAIN_ARGS, api_name="/train")  # the shared tiny model is loaded: steps start soon
    start = time.time()
    progress, _, log = client.predict(TWO_ROWS, **dict(TRAIN_ARGS, epochs=100_000, batch_size=2), api_name="/train")
    elapsed = time.time() - start
    note = f"the time limit of {TIME_LIMIT} s (JAXTUNE_MAX_TRAIN_SECONDS) was reached after step "
    assert f"stopped: {note}" in progress and note in log and "keeps what it learned and was saved" in progress
    said = int(progress.split(note)[1].split(";")[0])
    steps = int(progress.split("step ")[1].split("/")[0])
    assert 1 <= steps < 100_000 and f"step {steps}/100000" in progress
    assert said == steps  # the step in flight when the limit was reached finished, and the message counts it
    assert TIME_LIMIT - 1 < elapsed < TIME_LIMIT + 10  # the limit counts from the request, compilation included


def _runs(client) -> dict:
    return {r["id"]: r for r in client.predict(api_name="/runs")}


def test_a_space_lists_and_touches_only_this_browsers_runs(space):
    mine, other = space.client(), space.client()
    mine.predict(TWO_ROWS, **TRAIN_ARGS, api_name="/train")
    [run] = _runs(mine).values()
    assert run["status"] == "finished" and Path(run["dir"]).parent == space.runs
    assert run["id"] not in _runs(other)  # another browser's runs are not listed, and not reachable by id either
    for api_name in ("/stop_run", "/resume", "/delete", "/export"):
        with pytest.raises(AppError, match=f"There is no run '{run['id']}' here \\(deleted\\?\\)"):
            other.predict(run["id"], api_name=api_name)
    with pytest.raises(AppError, match=r"There is no run '\w+' for run A"):  # as if it did not exist
        other.predict("Hi", 0.0, 0.95, 8, "tiny", run["id"], api_name="/generate")
    assert mine.predict(api_name="/export").endswith(".zip")


def test_evaluate_is_capped_on_a_space_and_sees_only_this_browsers_runs(space):
    """Public: the first JAXTUNE_EVAL_MAX_PAIRS held-out pairs are evaluated, saying so; answers are at most 64 new
    tokens; another browser's run cannot be evaluated."""
    mine, other = space.client(), space.client()
    mine.predict(TWO_ROWS, **TRAIN_ARGS, api_name="/train")
    [run] = [r for r in _runs(mine).values() if r["status"] == "finished"][:1]
    args = dict(source="held-out", file=None, instruction_column="", response_column="", table=TWO_ROWS,
                validation_fraction=0, seed=0, max_length=64, loss_on="response", include_base=True,
                run_ids=[run["id"]], max_new_tokens=64, model_name="tiny")
    job = mine.submit(**args, api_name="/evaluate")
    progress, summary, examples = job.result(timeout=300)
    n = sum(1 for line in (ROOT / "examples" / "customer_service_val.jsonl").open() if line.strip())
    assert (f"the first 5 of {n} held-out pairs (customer_service_val.jsonl): this server evaluates at most 5 a "
            "request (JAXTUNE_EVAL_MAX_PAIRS)") in progress
    assert len(examples["value"]["data"]) == 5 and [row[0] for row in summary["data"]] == ["base: tiny", run["name"]]
    assert any("(1 of 2)" in out[0] for out in job.outputs()[:-1])  # progress came before the result
    files = mine.predict(api_name="/eval_reports")  # the reports, in Gradio's cache: removed when the app stops
    assert sorted(Path(f).name for f in files) == ["eval.json", "eval.jsonl", "eval.md"]
    with pytest.raises(AppError, match=r"Max new tokens must be a multiple of 8 from 8 to 64 \(this server's limit\); "
                                       r"got 128\. Lower the max new tokens"):
        mine.predict(**dict(args, max_new_tokens=128), api_name="/evaluate")
    with pytest.raises(AppError, match=r"is not one of the runs listed here"):
        other.predict(**args, api_name="/evaluate")


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_a_run_whose_page_is_closed_is_stopped_after_the_orphan_limit(space, browser):
    """On a Space an open page keeps its run alive (it polls every second); once the page is closed, the run is
    checkpointed, its model written, and it is stopped after JAXTUNE_ORPHAN_SECONDS, saying so."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(space.url)
    page.wait_for_function("() => document.querySelector('#counts') && document.querySelector('#counts').innerText.includes('pairs')")
    model = page.get_by_role("combobox", name="Model")
    model.click()
    model.fill("tiny")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#defaults-note').innerText.startsWith('tiny ')")
    page.get_by_label("Epochs").fill("100000")
    page.get_by_label("Batch size").fill("1")
    page.locator("#train").click()
    page.wait_for_function("() => /step [2-9]\\d*\\//.test((document.querySelector('#progress .jt-progress-text') "
                           "|| {innerText: ''}).innerText)", timeout=60_000)
    page.wait_for_timeout((ORPHAN_SECONDS + 1.5) * 1000)  # longer than the limit: the open page keeps it going
    [info] = [json.loads(p.read_text()) for p in space.runs.glob("*/run.json")
              if json.loads(p.read_text())["status"] == "training"]
    closed = time.time()
    page.close()
    folder = space.runs / info["id"]
    while json.loads((folder / "run.json").read_text())["status"] == "training":
        assert time.time() - closed < ORPHAN_SECONDS + 8, "the orphaned run was not stopped"
        time.sleep(0.3)
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "stopped" and info["saved"]
    assert f"no page had this run open for {ORPHAN_SECONDS} s (JAXTUNE_ORPHAN_SECONDS)" in info["message"]
    assert (folder / "model.safetensors").exists() and list((folder / "checkpoints").glob("[0-9]*"))


def test_session_folders_and_cache_go_when_the_app_stops(space, tmp_path):
    """Last in this file: it stops the app."""
    client = space.client()
    client.predict(TWO_ROWS, **TRAIN_ARGS, api_name="/train")
    client.predict(handle_file(str(_jsonl(tmp_path / "few.jsonl", 3))), "", "", None, api_name="/upload")
    client.predict(api_name="/export")
    assert list(space.tmp.glob("jaxtune-app-*")) and [p for p in (space.tmp / "gradio").rglob("*") if p.is_file()]
    space.proc.send_signal(signal.SIGTERM)
    assert space.proc.wait(timeout=60) == 0, space.log.read_text()[-2000:]
    assert not list(space.tmp.glob("jaxtune-app-*"))
    assert not [p for p in (space.tmp / "gradio").rglob("*") if p.is_file()]  # uploads, the exported zip
