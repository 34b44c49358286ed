"""The one progress display of the long-running scripts (train.py, quantize.py): tqdm's bar on a terminal, and a plain
line every few seconds when stderr is a file or a pipe (`python train.py > log 2>&1`, the app), where tqdm's \\r redraws
would pile up into megabyte-long lines."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from tqdm import tqdm

PLAIN_EVERY_S = 10.0  # without a terminal, one progress line this often (and one at the start and the end)


class Progress:
    """Progress towards `total` units: update(n, status) moves it to n, write(msg) prints a message (stdout) beside it.

    budget=True: n counts seconds of a time budget, and the display shows that clock only (no second clock of its own).
    disable=True shows nothing (the ranks other than 0 under torchrun).
    """

    def __init__(self, total: float, unit: str, desc: str, initial: float = 0.0, budget: bool = False, disable: bool = False,
                 stream: TextIO | None = None):
        self.total, self.unit, self.desc, self.budget, self.disable = total, unit, desc, budget, disable
        self.stream = stream or sys.stderr
        self.n, self.n0, self.status = initial, initial, ""
        self.t0 = time.perf_counter()
        self.t_line = -math.inf  # when the last plain line was written
        self.n_line: float | None = None  # the position it showed
        self.bar: tqdm | None = None
        if not disable and self.stream.isatty():
            fmt = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:g} s of the budget{postfix}" if budget else None
            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1,
                            bar_format=fmt, file=self.stream)

    def update(self, n: float, status: str = "") -> None:
        """Move to position n (absolute) with this status text."""
        self.n, self.status = min(n, self.total), status
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(self.n - self.bar.n)
        elif not self.disable and time.perf_counter() - self.t_line >= PLAIN_EVERY_S:
            self._line()

    def line(self) -> str:
        """The plain line of the current position: position of total, percent, rate (counted units) and status."""
        pct = 100.0 * self.n / self.total if self.total else 100.0
        if self.budget:
            text = f"{self.desc}: {self.n:.0f}/{self.total:g} s of the budget ({pct:.0f}%)"
        else:
            seconds = time.perf_counter() - self.t0
            rate = (self.n - self.n0) / seconds if seconds > 0 else 0.0
            text = f"{self.desc}: {self.n:g}/{self.total:g} {self.unit} ({pct:.0f}%), {rate:.2f} {self.unit}/s"
        return f"{text}, {self.status}" if self.status else text

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.t_line, self.n_line = time.perf_counter(), self.n

    def write(self, message: str) -> None:
        """Print a message on stdout without breaking the bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def close(self) -> None:
        """End the display; without a terminal, a last line when the position moved since the last one."""
        if self.bar is not None:
            self.bar.close()
        elif not self.disable and self.n_line != self.n:
            self._line()
