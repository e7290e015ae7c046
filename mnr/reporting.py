"""What a run shows and hears: log set-up, metrics.jsonl (+ Accelerate trackers), the progress bar, stop signals.

Everything that prints or writes is a no-op off the main process (`mnr.distributed.is_main`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

from mnr import distributed
from mnr.atomic import write_error


def plural(n: int, word: str, many: str = "") -> str:
    """'1 step', '2 steps' ('many': an irregular plural, e.g. plural(n, "process", "processes"))."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)
    for noisy in ("transformers", "datasets", "httpx", "urllib3", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def json_ready(value):
    """`value` with every NaN or infinite float replaced by None (null): JSON has no NaN, and `json.dumps` would
    write one that strict readers (jq, JavaScript, most other languages) refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


class MetricsLog:
    """metrics.jsonl in the output dir (+ Accelerate trackers); main process only."""

    def __init__(self, accelerator, path: Path):
        self.accelerator = accelerator
        self.path = path

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps the crashed run did after its checkpoint (they are redone), and
        damaged lines (with a warning); step=-1 drops all (a run that starts again from scratch)."""
        if not distributed.is_main() or not self.path.is_file():
            return
        keep = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:  # e.g. the last line, cut short by a kill mid-write
                logging.getLogger("mnr").warning("%s line %d is damaged, dropped: %.60r", self.path, number, line)
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def drop_last(self) -> None:
        """Remove the last record (an evaluation that a resume redoes, written once there)."""
        if not distributed.is_main() or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text("".join(line + "\n" for line in lines[:-1]), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as err:
            raise write_error(self.path, err) from None

    def write(self, record: dict) -> None:
        if not distributed.is_main():
            return
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(json_ready(record), allow_nan=False) + "\n")
        except OSError as err:  # a full disk: one line naming the file
            raise write_error(self.path, err) from None
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=record.get("step"))


class Progress:
    """Rich progress bar on the main process at a terminal (loss, lr, pairs/s, ETA); a no-op elsewhere, when
    disabled, or without a terminal (a log file, CI), where the loop logs a plain line per log step instead."""

    def __init__(self, enabled: bool, total: int, completed: int):
        self.bar = None
        if enabled and distributed.is_main():
            from rich.console import Console

            if not Console(stderr=False).is_terminal:
                return  # a bar rendered into a file leaves a cut-off line at the end of the log
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                    TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=completed, info="")
            self.bar.start()

    @property
    def live(self) -> bool:
        return self.bar is not None

    def update(self, advance: int = 1, info: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=advance, **({"info": info} if info is not None else {}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class Stopped(BaseException):
    """A stop signal ended the run where nothing could be saved (a BaseException, as KeyboardInterrupt: no
    `except Exception` turns it into another error)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class StopRequest:
    """SIGTERM, Ctrl-C (SIGINT), SIGHUP: one behaviour, whatever the signal.

    `at_once` (before training starts: nothing to save yet) raises `Stopped` from the handler; otherwise the
    signal is recorded in `signum` and the run stops at its next safe point (the end of the step, evaluation or
    export), saving first. A second signal raises `Stopped` at once. A signal the process was started with
    ignored (`nohup`, a background job's SIGINT) stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum = 0
        self.at_once = True
        self._previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            try:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. a notebook worker): leave signals alone
                pass

    def _handle(self, signum, frame) -> None:
        first = not self.signum
        self.signum = self.signum or signum
        if self.at_once or not first:
            raise Stopped(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class LogWindow:
    """The steps since the last log line: pairs/s and the mean loss over those steps (a log line that showed
    only the last step's loss would make a run look like it diverges). A save restarts the clock only."""

    def __init__(self) -> None:
        self.loss_sum, self.steps = None, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.started, self.pairs = time.perf_counter(), 0

    def add(self, loss, pairs: int) -> None:
        """loss: this step's (local, detached) loss tensor, or None for a skipped step (not averaged)."""
        self.pairs += pairs
        if loss is not None:  # kept on the device: no host sync until the log line
            self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
            self.steps += 1

    def rate(self) -> float:
        return self.pairs / max(time.perf_counter() - self.started, 1e-9)

    def mean_loss(self):
        """Mean of this process's losses over the window (a tensor), or None when every step was skipped."""
        return None if self.loss_sum is None else self.loss_sum / self.steps

    def reset(self) -> None:
        self.loss_sum, self.steps = None, 0
        self.restart_clock()
