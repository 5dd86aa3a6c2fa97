"""jaxtune's own programs start once more with glibc's malloc on transparent huge pages (jaxtune/launch.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtune.launch import TUNABLE, _own_program, huge_pages_status

ROOT = Path(__file__).resolve().parent.parent


def check(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXTUNE_HUGE_PAGES")}
    return subprocess.run([sys.executable, "-m", "jaxtune.launch"], cwd=ROOT, env={**env, **env_extra},
                          capture_output=True, text=True, timeout=120)


def test_a_jaxtune_program_restarts_once_with_huge_pages():
    p = check({})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "RuntimeWarning" not in p.stderr
    wanted, why = huge_pages_status()
    if not wanted:
        pytest.skip(f"this machine cannot give huge pages: {why}")
    # the restarted process has the tunable (set once, not twice) and a block like XLA's lies on huge pages
    assert f"GLIBC_TUNABLES='{TUNABLE}=1'" in p.stdout and "huge pages for XLA's buffers: on" in p.stdout
    assert "64 MiB malloc block has 0 MiB" not in p.stdout


def test_huge_pages_can_be_turned_off_and_a_set_tunable_is_kept():
    off = check({"JAXTUNE_HUGE_PAGES": "0"})
    assert off.returncode == 0 and "off (turned off by JAXTUNE_HUGE_PAGES)" in off.stdout
    assert "GLIBC_TUNABLES=''" in off.stdout and "has 0 MiB on huge pages" in off.stdout
    kept = check({"GLIBC_TUNABLES": f"{TUNABLE}=0"})  # the user's own setting wins: no restart
    assert f"GLIBC_TUNABLES='{TUNABLE}=0'" in kept.stdout and "has 0 MiB on huge pages" in kept.stdout


@pytest.mark.parametrize("argv, own", [
    (["python", "-m", "jaxtune", "train", "--data", "x.jsonl"], True),
    (["python", "-u", "-m", "jaxtune.bench", "--seq", "1024"], True),
    (["/usr/bin/python3", "/usr/local/bin/jaxtune", "generate"], True),  # the console script
    (["python", str(ROOT / "app.py")], True),
    (["python", "my_script.py"], False),  # a user's program that imports jaxtune starts as it was started
    (["python", "/elsewhere/app.py"], False),
    (["python", "-c", "import jaxtune"], False),
    (["python", "-m", "pytest", "tests"], False),
    (["python"], False),
])
def test_only_jaxtunes_own_programs_restart(argv, own):
    assert _own_program(argv) is own


def test_the_benchmark_runs_pytorch_sides_without_jaxtunes_huge_pages():
    from jaxtune.bench import side_environment

    environ = {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=1", "PATH": "/bin"}
    assert side_environment("jax", environ)["GLIBC_TUNABLES"] == environ["GLIBC_TUNABLES"]
    for side in ("torch", "peft", "trl"):
        env = side_environment(side, environ)
        assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2" and env["JAXTUNE_HUGE_PAGES"] == "0"
        assert env["PATH"] == "/bin" and env["TOKENIZERS_PARALLELISM"] == "false"


def test_an_interrupt_that_lands_in_a_garbage_collection_callback_is_raised_after_it():
    """JAX runs a callback at every garbage collection, and an exception raised inside one is printed and ignored:
    a Ctrl-C that came then was lost and `eval` ran to its end. raise_interrupt sends the signal again, outside."""
    import gc
    import signal
    import sys
    import time

    from jaxtune.launch import raise_interrupt

    came = []

    def callback(phase, info):  # the frame a SIGINT handler would see, had the signal come now
        if not came:
            came.append(phase)
            raise_interrupt(sys._getframe())

    previous = signal.signal(signal.SIGINT, lambda signum, frame: raise_interrupt(frame))
    gc.callbacks.append(callback)
    try:
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            gc.collect()
            time.sleep(5)  # the signal sent again arrives within 0.05 s
        assert came and time.monotonic() - started < 2
    finally:
        gc.callbacks.remove(callback)
        signal.signal(signal.SIGINT, previous)
