"""Timing and memory measurement shared by every benchmark: warm-up, repeats, min time, peak RSS growth."""
from __future__ import annotations

import os
import threading
import time


def time_call(fn, *, repeats: int = 3, warmup: int = 1) -> float:
    """Minimum wall time of `fn()` in milliseconds over `repeats` runs after `warmup` runs.
    The minimum is the least noisy statistic on a shared machine."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn, *, interval_s: float = 0.0005) -> tuple[object, int]:
    """Run `fn()` while a thread samples the process's resident memory; returns (result, peak growth in
    bytes over the level before the call). Sampled, so allocations that live < interval may be missed;
    large tensors are mmap-backed and returned to the OS when freed, so growth reflects live tensors."""
    baseline = _rss_bytes()
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    peak = max(peak, _rss_bytes())
    return result, peak - baseline


def record_markdown(path: str, section: str, body: str) -> None:
    """Replace (or append) the block between `<!-- section -->` markers in a markdown file."""
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
