"""How progress is shown, decided in one place for every bar dinofeat draws (probe, extract, repair, validate, bench).

- off: the caller asked for none (`--quiet`, `--json`, a rank that is not rank 0) or TQDM_DISABLE is set to a
  non-empty value (tqdm's own rule: it reads `bool(value)`, so even "0" disables);
- frames: stderr is a terminal (or a notebook): tqdm's redrawn `\\r` bar;
- lines: stderr is a file or a pipe (SLURM, nohup, CI logs): one plain line every LINE_INTERVAL_S seconds, since a
  log of `\\r` frames is one endless line to `less`, `tail -f` and the CI's viewer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any, Literal

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

Mode = Literal["off", "frames", "lines"]
_NOTEBOOK = any(c.__name__ == "tqdm_notebook" for c in auto_tqdm.__mro__)  # tqdm.auto chose the notebook widget
LINE_INTERVAL_S = 5.0  # a log line every few seconds: enough to see a run is alive, few enough to read


def mode(enabled: bool, file: IO[str] | None = None, environ: dict[str, str] | None = None) -> Mode:
    """How a bar asked for with `enabled` is shown on `file` (default: stderr)."""
    env = os.environ if environ is None else environ
    if not enabled or env.get("TQDM_DISABLE"):
        return "off"
    if _NOTEBOOK:  # a widget, not frames in a log
        return "frames"
    stream = sys.stderr if file is None else file
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or minimal stream: treat as a log
        tty = False
    return "frames" if tty else "lines"


class _Lines:
    """A file for tqdm that turns each redraw (`\\r` + status) into one line of its own."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, s: str) -> None:
        text = s.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, file: IO[str] | None = None, **kw: Any) -> Any:
    """A tqdm bar (an iterable wrapper or a `with` block with `.update`) shown as `mode` says; `kw` are tqdm's."""
    how = mode(enabled, file)
    if how == "off":
        return std_tqdm(iterable, disable=True, **kw)
    if how == "frames":
        return auto_tqdm(iterable, file=file, **kw)
    stream = sys.stderr if file is None else file
    # lines: a fixed width (no terminal to measure), ASCII (log viewers), and a redraw only every LINE_INTERVAL_S
    return std_tqdm(
        iterable, file=_Lines(stream), mininterval=LINE_INTERVAL_S, maxinterval=LINE_INTERVAL_S, ncols=100,
        ascii=True, dynamic_ncols=False, **kw,
    )  # fmt: skip
