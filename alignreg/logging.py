"""Metrics: JSONL (one line per logged step), TensorBoard when installed, and PNG curves.

On resume the JSONL file is truncated to the checkpoint's step, so lines are never duplicated and
nothing at or before the checkpoint is lost. A line that is not JSON (a write torn by a kill or a
full disk) is skipped with a warning; before a resume rewrites such a file the original is kept as
``<name>.before_resume``.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            truncate_jsonl(self.path, resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resume hides the events of the steps after the checkpoint that the stopped run had logged
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)
            except Exception as e:  # tensorboard not installed: JSONL still works
                print(f"warning: TensorBoard logging off ({type(e).__name__}: {e}); install alignreg[viz]", file=sys.stderr)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _parse_jsonl(path: Path) -> tuple[list[tuple[str, dict]], int]:
    """(line, row) for every JSON line of ``path`` and the number of lines that were not JSON (warned)."""
    rows, bad = [], 0
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((line, json.loads(line)))
        except ValueError:
            bad += 1
            print(f"warning: {path}:{i} is not a JSON line (a torn write?); skipped", file=sys.stderr)
    return rows, bad


def read_metrics(path: str | Path) -> list[dict]:
    return [row for _, row in _parse_jsonl(Path(path))[0]]


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Keep the lines of a JSONL log with ``"step" <= step`` (those after a checkpoint are written again
    by the resumed run); a file with non-JSON lines is first copied to ``<name>.before_resume``."""
    path = Path(path)
    if not path.is_file():
        return
    rows, bad = _parse_jsonl(path)
    if bad:
        import shutil

        shutil.copyfile(path, path.with_name(path.name + ".before_resume"))
    tmp = path.with_name(path.name + ".tmp")  # a kill mid-write must not lose the rows before the checkpoint
    tmp.write_text("".join(line + "\n" for line, row in rows if row.get("step", -1) <= step))
    os.replace(tmp, path)


def plot_curves(metrics_path: str | Path, out_png: str | Path, keys: list[tuple[str, str]]) -> Optional[Path]:
    """One panel per (key, title) with a value at some step; returns the PNG path (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib not installed, no PNG written; install alignreg[viz]", file=sys.stderr)
        return None
    rows = read_metrics(metrics_path)
    panels = [(k, t) for k, t in keys if any(k in r for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (k, title) in zip(axes[0], panels):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
