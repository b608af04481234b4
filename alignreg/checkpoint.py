"""Atomic checkpoints: written to ``step_XXXXXXXX.tmp`` and renamed when complete, so a crash or a
SIGTERM mid-write never leaves a checkpoint that ``resume: auto`` would pick up."""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

_STEP = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2,
                    files: Optional[dict[str, str]] = None) -> Path:
    """``state`` as ``state.pt`` plus small text ``files`` (name -> content, e.g. the run's config)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    with open(tmp / "COMPLETE", "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
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


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        from alignreg.config import ConfigError

        raise ConfigError(f"checkpoint {str(path)!r} is missing or incomplete; pass a complete step_* directory or resume=auto")
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
