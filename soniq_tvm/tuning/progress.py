"""A plain-text progress bar on stderr (no dependency).

On a terminal it redraws one line: trials done out of the budget, the current
task, the best latency measured for it, and the estimated total of the tuned
kernels (sum over tasks of weight x best latency). Elsewhere (a log file, a CI
job) it prints one line per finished task instead.
"""
from __future__ import annotations

import shutil
import sys
import time

__all__ = ["Progress"]


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.1f} us" if us >= 10 else f"{us:.2f} us"


class Progress:
    def __init__(self, total_trials: int, total_tasks: int, *, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total = max(0, int(total_trials))
        self.tasks = total_tasks
        self.done = 0
        self.skipped = 0
        self.failed = 0
        self.task_i = 0
        self.task_name = ""
        self.task_best: float | None = None
        self.best: dict[str, tuple[float, int]] = {}  # task key -> (best us, weight)
        self.t0 = time.time()
        self._last = 0.0

    # ---- events -----------------------------------------------------------------
    def start_task(self, i: int, key: str, name: str, weight: int, best_us: float | None = None) -> None:
        self.task_i, self.task_name, self.task_best = i, name, best_us
        if best_us is not None:
            self.best[key] = (best_us, weight)
        self._key, self._weight = key, weight
        self._draw(force=True)

    _key, _weight = "", 1

    def note_best(self, key: str, weight: int, us: float) -> None:
        old = self.best.get(key)
        if old is None or us < old[0]:
            self.best[key] = (us, weight)

    def measured(self, latencies: list[float | None], key: str | None = None, weight: int | None = None) -> None:
        """Trials done (None: failed), for ``key`` (default: the current task)."""
        key = key or self._key
        weight = self._weight if weight is None else weight
        for lat in latencies:
            self.done += 1
            if lat is None:
                self.failed += 1
                continue
            self.note_best(key, weight, lat)
            if key == self._key and (self.task_best is None or lat < self.task_best):
                self.task_best = lat
        self._draw()

    def resumed(self, n: int) -> None:
        self.skipped += n
        self.done += n
        self._draw()

    def end_task(self) -> None:
        if self.enabled and not self.tty:
            self.line(f"[tune] task {self.task_i}/{self.tasks} {self.task_name}: best {fmt_us(self.task_best)}"
                      f" | trials {self.done}/{self.total} | {self._elapsed()}")
        self._draw(force=True)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._draw(force=True)

    def close(self) -> None:
        if self.tty:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    # ---- rendering --------------------------------------------------------------
    @property
    def total_best_us(self) -> float:
        return sum(b * w for b, w in self.best.values())

    def _elapsed(self) -> str:
        s = int(time.time() - self.t0)
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    def render(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(20 * min(1.0, frac))
        text = (f"[tune] [{bar:<20}] {self.done}/{self.total} trials | task {self.task_i}/{self.tasks} "
                f"{self.task_name} | best {fmt_us(self.task_best)} | tuned kernels {fmt_us(self.total_best_us)}"
                f" | {self._elapsed()}")
        width = shutil.get_terminal_size((120, 20)).columns - 1
        return text if len(text) <= width else text[: width - 3] + "..."

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.time()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        self.stream.write("\r\033[K" + self.render())
        self.stream.flush()
