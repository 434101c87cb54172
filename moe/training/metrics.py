"""Run-folder metrics: one strict-JSON object per line, mirrored to TensorBoard.

Each line is written whole with one ``write`` and flushed, so an interrupted run (a killed
process, a full disk) leaves at most a torn last line; readers drop that line with a warning
instead of failing. Non-finite numbers are written as ``null`` (strict JSON has no NaN), and the
skipped-step counters say why a value is missing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def finite(value):
    """``value`` with every non-finite float replaced by None (through lists and dicts)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def encode_row(row: dict) -> str:
    """One metrics line: strict JSON (non-finite numbers become null), newline-terminated."""
    return json.dumps(finite(row), allow_nan=False) + "\n"


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool = True, trackers: list | None = None):
        """``trackers``: started experiment trackers (``dynamoe.training.trackers``) that get
        every row too."""
        self.enabled = enabled
        self._fd = None
        self._tb = None
        self._trackers = list(trackers or [])
        if not enabled:
            return
        path = Path(run_dir) / METRICS_FILE
        drop_torn_line(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        data = encode_row({"step": step, "split": split, **values}).encode()
        written = os.write(self._fd, data)  # one append of the whole line
        if written != len(data):
            raise OSError(f"metrics line cut short ({written} of {len(data)} bytes): is the disk full?")
        for key, value in values.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self._tb.add_scalar(f"{split}/{key}", value, step)
        for tracker in self._trackers:
            tracker.log(step, split, values)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._tb.close()
            self._fd = self._tb = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def parse_lines(path: Path) -> list[dict]:
    """The rows of a metrics file; a last line that does not parse (a write cut short) is dropped
    with a warning, and an unparsable line elsewhere is an error naming the line."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropped a torn last line (a write was cut short)", stacklevel=2)
                continue
            raise ValueError(
                f"{path}: line {i + 1} is not JSON; fix: delete that line (the run folder is otherwise intact)"
            ) from None
    return rows


def drop_torn_line(path: Path) -> None:
    """Cut a torn last line off the file in place, so the next append starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:  # torn (JSONDecodeError and UnicodeDecodeError are both ValueErrors)
        warnings.warn(f"{path}: dropped a torn last line (a write was cut short)", stacklevel=2)
        with open(path, "r+b") as f:
            f.truncate(cut)
        return
    with open(path, "ab") as f:  # a whole last line without its newline: end it
        f.write(b"\n")


def read_metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    rows = parse_lines(Path(run_dir) / METRICS_FILE)
    return [r for r in rows if split is None or r.get("split") == split]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Forget metrics logged after ``step``: the resumed run logs them again."""
    path = Path(run_dir) / METRICS_FILE
    if path.exists():
        kept = [row for row in parse_lines(path) if row["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(encode_row(row) for row in kept))
        os.replace(tmp, path)
