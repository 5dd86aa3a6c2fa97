"""How jaxtune's own programs start: glibc's malloc on transparent huge pages. Standard library only, so it runs
before JAX is imported.

On a CPU, XLA allocates each execution's temporaries afresh (about 2 GB a step for GPT-2 124M at 4 rows of 256
tokens) and glibc maps such blocks with mmap and unmaps them when they are freed, so the kernel faults in and zeroes
every 4 KiB page of them again, every step. glibc's tunable glibc.malloc.hugetlb=1 (glibc 2.35 and later) asks for
transparent huge pages on those blocks, 2 MiB a fault. Measured with `python -m jaxtune.bench --no-torch` on the
2-core machine of the README, with and without: page faults fell from 470,000 to 1,600 a step and a float32 step
took 13% less time at the same peak memory; bf16 steps gained nothing measurable (their fresh pages are still
zeroed). The benchmark runs its jaxtune side this way and its PyTorch sides as their users run them, without.

glibc reads its tunables only when a process starts, so the command line, the app, the benchmark and the
evaluation start themselves once more with the tunable set (`os.execve`, the same process id, before anything is
imported). A Python program of your own that imports jaxtune can get the same with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py`. JAXTUNE_HUGE_PAGES=0 turns it off.
`python -m jaxtune.launch` says whether this machine gets them.

The same programs end with a line, not a traceback of the import, when Ctrl-C comes during their first seconds,
while JAX is imported (`quiet_ctrl_c`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_PACKAGE = Path(__file__).resolve().parent


def huge_pages_status() -> tuple[bool, str]:
    """(whether a restart with the tunable would give huge pages, why or why not)."""
    if os.environ.get("JAXTUNE_HUGE_PAGES", "").strip().lower() in ("0", "off", "false", "no"):
        return False, "turned off by JAXTUNE_HUGE_PAGES"
    if not sys.platform.startswith("linux"):
        return False, f"not Linux ({sys.platform})"
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    name, _, version = libc.partition(" ")
    if name != "glibc" or tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (2, 35):
        return False, f"needs glibc 2.35 or later (this is {libc or 'another C library'})"
    try:
        mode = _THP.read_text().strip()
    except OSError:
        return False, "this kernel has no transparent huge pages"
    if "[madvise]" not in mode:  # [always]: every process gets them already; [never]: none can
        return False, f"transparent huge pages are '{mode}' here, not 'madvise'"
    return True, "glibc.malloc.hugetlb=1 gives XLA's buffers transparent huge pages"


def _own_program(argv: list[str]) -> bool:
    """Whether this process is one of jaxtune's programs: `python -m jaxtune[.module]`, the `jaxtune` command, or
    the app.py beside the package. A program of the user's that imports jaxtune is left as it started."""
    args = argv[1:]
    if "-c" in args:
        return False
    if "-m" in args:
        i = args.index("-m")
        return i + 1 < len(args) and (args[i + 1] == "jaxtune" or args[i + 1].startswith("jaxtune."))
    script = next((a for a in args if not a.startswith("-")), None)
    if script is None:
        return False
    path = Path(script)
    return path.name == "jaxtune" or (path.name == "app.py" and path.resolve().parent == _PACKAGE.parent)


def restart_with_huge_pages(argv: list[str] | None = None) -> None:
    """Start this program again with glibc.malloc.hugetlb=1 when it is one of jaxtune's own, the machine can give
    huge pages and the tunable is not set yet (so this happens at most once). Returns only when nothing is done."""
    argv = list(sys.orig_argv if argv is None else argv)
    if TUNABLE in os.environ.get("GLIBC_TUNABLES", "") or not _own_program(argv) or not huge_pages_status()[0]:
        return
    tunables = ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), f"{TUNABLE}=1")))
    sys.stdout.flush(), sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})
    except OSError:
        return  # cannot start again: run as it is


def raise_interrupt(frame) -> None:
    """What a SIGINT handler does to stop the program: raise KeyboardInterrupt, unless the signal came while a
    garbage-collection callback ran (JAX keeps one, run at every collection: an exception raised there is printed
    and ignored, and the program ran on); then the signal is sent again a moment later, outside the callback."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks:
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        frame = frame.f_back
    raise KeyboardInterrupt


@contextlib.contextmanager
def quiet_ctrl_c(argv: list[str] | None = None):
    """Within it, in one of jaxtune's own programs, Ctrl-C ends the program at once (exit status 130) with "aborted
    by Ctrl-C": the imports it guards hold nothing to save or clean up. Elsewhere (a program of your own, a thread)
    it does nothing; on leaving, SIGINT's handler is the one before."""
    argv = list(sys.orig_argv if argv is None else argv)
    if not _own_program(argv) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):  # at once: an exception raised here can land in a garbage-collection callback of
        print("\naborted by Ctrl-C", file=sys.stderr, flush=True)  # JAX's, which Python prints and ignores
        os._exit(130)

    before = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def anon_huge_pages_bytes(start: int, size: int) -> int:
    """Bytes of the mapping at [start, start + size) that are backed by transparent huge pages (/proc/self/smaps)."""
    inside, total = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < start + size and start < hi
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


def main() -> int:
    import ctypes

    wanted, why = huge_pages_status()
    on = TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
    size = 64 << 20  # a block glibc maps with mmap, as it does XLA's temporaries
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    huge = anon_huge_pages_bytes(block, size) if sys.platform.startswith("linux") else 0
    libc.free(block)
    print(f"huge pages for XLA's buffers: {'on' if on and huge else 'off'} ({why}); "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; "
          f"a {size >> 20} MiB malloc block has {huge >> 20} MiB on huge pages")
    return 0 if (huge > 0) == wanted else 1


if __name__ == "__main__":
    restart_with_huge_pages()
    sys.exit(main())
