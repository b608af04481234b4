"""Atomic checkpoints: written to ``step_XXXXXXXX.tmp`` and renamed when complete, so a crash or a
SIGTERM mid-write never leaves a checkpoint that ``resume: auto`` would pick up.

The ``COMPLETE`` marker records the byte size of every file in the checkpoint. Before a resume the
sizes are compared and the CRC-32 of every record of the torch file (a zip archive) is checked (a read
of the file, ~3 GB/s here), so a checkpoint damaged after it was written (truncated by a full disk or
an interrupted copy, flipped bytes) is found before any state is loaded: ``torch.load`` itself would
load damaged tensor bytes without a word. ``resume: auto`` renames such a checkpoint to
``step_XXXXXXXX.unreadable`` (kept, never deleted) and resumes from the one before."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from alignreg.config import RunError

_STEP = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2,
                    files: Optional[dict[str, str]] = None) -> Path:
    """``state`` as ``state.pt`` plus small text ``files`` (name -> content, e.g. the run's config).

    A write that fails (a full disk, a quota) removes its partial files and raises CheckpointError
    naming the last complete checkpoint, which is untouched."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_durable(state, tmp / "state.pt")
        for name, text in (files or {}).items():
            with open(tmp / name, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        with open(tmp / "COMPLETE", "w") as f:
            f.write(json.dumps({"step": step, "bytes": sizes}))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)  # its entries are on disk before the rename publishes it
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        last = latest_checkpoint(run_dir)
        raise CheckpointError(f"could not write the checkpoint of step {step} into {str(root)!r} ({e.strerror or e}); "
                              f"the last complete checkpoint, {str(last) if last else 'none'}, is intact: make room "
                              "and run the same command again to resume from it") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: str | Path) -> int:
    """The step of a ``step_XXXXXXXX`` checkpoint directory (0 for another name)."""
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else 0


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_problem(path: str | Path) -> Optional[str]:
    """Why checkpoint ``path`` cannot be resumed from, or None: compares the files with the sizes
    ``COMPLETE`` recorded (markers written before sizes were recorded hold just the step) and checks
    the CRC-32 of every record in ``state.pt``."""
    path = Path(path)
    marker = path / "COMPLETE"
    if not marker.is_file():
        return "no COMPLETE marker: it was never finished"
    try:
        sizes = json.loads(marker.read_text()).get("bytes", {})
    except (ValueError, AttributeError):  # an older marker: the step alone
        sizes = {}
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size:,} bytes, {size:,} were written"
    problem = torch_file_problem(path / "state.pt")
    return f"state.pt {problem}" if problem else None


def torch_file_problem(path: Path) -> Optional[str]:
    """None when every record of the ``torch.save`` archive ``path`` passes its CRC-32 check, else why not."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"is not a readable torch file ({type(e).__name__}: {e})"
    return f"record {bad!r} fails its CRC-32 check (damaged bytes)" if bad is not None else None


def _unused_name(path: Path, suffix: str) -> Path:
    """``<path>.<suffix>``, or ``<path>.<suffix>2``, ``3``, ... : the first that does not exist yet."""
    dest, n = path.with_name(f"{path.name}.{suffix}"), 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}.{suffix}{n}")
    return dest


def set_aside(path: Path, why: str = "unreadable") -> Path:
    """Rename a checkpoint out of the ``step_*`` pattern (so no resume or rotation touches it) to
    ``<name>.<why>``: a damaged one (``unreadable``) or one of a line of steps a resume from an
    earlier checkpoint abandoned (``abandoned``)."""
    dest = _unused_name(path, why)
    os.replace(path, dest)
    return dest


def abandon_later_checkpoints(run_dir: str | Path, ckpt: Path, warn) -> list[Path]:
    """A resume from ``ckpt`` while the run directory holds later checkpoints (``trainer.resume`` naming
    an earlier ``step_*``): set the later ones aside as ``*.abandoned``, kept but out of the ``step_*``
    pattern, so the rotation cannot delete the resumed run's new checkpoints in their favour and a
    later ``resume: auto`` cannot jump back to the abandoned steps."""
    root = (Path(run_dir) / "checkpoints").resolve()
    if Path(ckpt).resolve().parent != root:
        return []
    later = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) > checkpoint_step(ckpt)]
    moved = [set_aside(c, "abandoned") for c in later]
    if moved:
        metrics, kept = Path(run_dir) / "metrics.jsonl", ""
        if metrics.is_file():  # the resumed run truncates it to its step: keep the abandoned steps' rows
            dest = _unused_name(metrics, "abandoned")
            shutil.copyfile(metrics, dest)
            kept = f"; their metrics: {dest.name}"
        warn(f"resuming from {ckpt}: the later checkpoints of this run directory are set aside, not deleted: "
             + ", ".join(p.name for p in moved) + kept)
    return moved


def latest_readable_checkpoint(run_dir: str | Path, warn) -> Optional[Path]:
    """The newest checkpoint without a :func:`checkpoint_problem`; damaged newer ones are set aside
    (``warn`` says which and why). Raises CheckpointError when there are checkpoints but none is readable."""
    found = list_checkpoints(run_dir)
    moved = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        moved.append(set_aside(path))
        warn(f"checkpoint {path} is unreadable ({problem}); kept as {moved[-1]}, resuming from the one before")
    if moved:
        raise CheckpointError(f"trainer.run_dir {str(Path(run_dir))!r}: no readable checkpoint (set aside: "
                              f"{', '.join(p.name for p in moved)}); start a new run in another trainer.run_dir")
    return None


def require_resumable(path: str | Path, prefix: str = "") -> None:
    """CheckpointError (its message starting with ``prefix``) when :func:`checkpoint_problem` finds one."""
    path = Path(path)
    problem = checkpoint_problem(path) if path.is_dir() else "it is not a directory"
    if problem is not None:
        raise CheckpointError(f"{prefix}checkpoint {str(path)!r} cannot be resumed from: {problem}. Pass another "
                              "step_* directory, or trainer.resume=auto (which sets damaged checkpoints aside)")


def checkpoint_config(path: str | Path) -> Path:
    """The config that wrote checkpoint ``path``: its own ``config.yaml``, or for checkpoints written
    before they carried one, the run directory's."""
    path = Path(path)
    return path / "config.yaml" if (path / "config.yaml").is_file() else path.parent.parent / "config.yaml"


def load_checkpoint(path: str | Path, checked: bool = False) -> dict:
    """The state in checkpoint ``path``; ``checked``: :func:`require_resumable` has passed already."""
    path = Path(path)
    if not checked:
        require_resumable(path)
    return read_state(path / "state.pt", verify=False,
                      fix="rename that checkpoint directory (e.g. to <name>.unreadable) and run again to resume from "
                          "the checkpoint before it")


class CheckpointError(RunError):
    """A checkpoint that cannot be read; the message names it and what to do."""


def read_state(path: Path, fix: str, verify: bool = True) -> dict:
    """``torch.load`` of a checkpoint file, with an error that names the file and ``fix`` if it is damaged
    (``verify``: check the CRC-32s first; ``torch.load`` does not)."""
    problem = torch_file_problem(path) if verify else None
    if problem is not None:
        raise CheckpointError(f"{path} {problem}; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (truncation and corruption surface as several exception types)
        reason = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {reason}); {fix}") from None


def save_durable(obj: Any, path: Path) -> None:
    """``torch.save`` flushed to disk, so a rename that publishes the file never outlives its bytes."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
