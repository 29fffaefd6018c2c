"""Where a long run spends its host time, for runs on a machine with no debugger at hand: a daemon thread samples
the main thread's Python stack and prints the functions most often on it (inclusive counts, so the top lines
read as the hot call path), every `every` seconds and at exit, to stdout and to an optional file.

    with StackSampler(out=Path(os.environ["OUT"]) / "stacks.txt"):
        slow_compile()
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from pathlib import Path


class StackSampler:
    def __init__(self, interval: float = 0.25, every: float = 150.0, top: int = 22, out: Path | None = None):
        self.interval, self.every, self.top, self.out = interval, every, top, out
        self.counts: collections.Counter = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stack-sampler")
        self._main = threading.main_thread().ident

    def __enter__(self) -> StackSampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.report("at exit")

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self._main)
            seen = set()
            while frame is not None:
                code = frame.f_code
                seen.add(f"{_short(code.co_filename)}:{code.co_firstlineno} {code.co_name}")
                frame = frame.f_back
            self.counts.update(seen)
            self.samples += 1
            if time.perf_counter() - last > self.every:
                last = time.perf_counter()
                self.report("so far")

    def report(self, when: str) -> None:
        n = max(self.samples, 1)
        lines = [f"--- stacks {when}: {self.samples} samples over {time.perf_counter() - self._t0:.0f} s"]
        lines += [f"{100 * c / n:5.1f}%  {name}" for name, c in self.counts.most_common(self.top)]
        text = "\n".join(lines)
        print(text, flush=True)
        if self.out is not None:
            with open(self.out, "a") as f:
                f.write(text + "\n")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/pq_ao/", "/benchmarks/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path.rsplit("/", 1)[-1]
