"""Checkpoint integrity: sizes and CRC-32s checked before a resume, damaged checkpoints set aside, never loaded."""
from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch

from alignreg.checkpoint import (CheckpointError, checkpoint_problem, latest_readable_checkpoint, list_checkpoints,
                                 load_checkpoint, read_state, save_checkpoint)


def _state(step: int) -> dict:
    return {"step": step, "w": torch.arange(50_000, dtype=torch.float32) + step}


def flip_tensor_bytes(path) -> None:
    """Overwrite 64 bytes in the middle of the largest record (tensor data): the zip stays well formed."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:  # the local header is 30 bytes + name + extra; the data follows
        f.seek(info.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + n + m + info.file_size // 2)
        f.write(b"\xa5" * 64)


def test_marker_records_sizes_and_an_intact_checkpoint_has_no_problem(tmp_path):
    ck = save_checkpoint(tmp_path, 3, _state(3), files={"config.yaml": "a: 1\n"})
    marker = json.loads((ck / "COMPLETE").read_text())
    assert marker["step"] == 3 and marker["bytes"]["state.pt"] == (ck / "state.pt").stat().st_size
    assert marker["bytes"]["config.yaml"] == 5
    assert checkpoint_problem(ck) is None
    assert torch.equal(load_checkpoint(ck)["w"], _state(3)["w"])


def test_flipped_tensor_bytes_are_caught_although_torch_load_accepts_them(tmp_path):
    ck = save_checkpoint(tmp_path, 1, _state(1))
    flip_tensor_bytes(ck / "state.pt")
    assert not torch.equal(torch.load(ck / "state.pt", weights_only=False)["w"], _state(1)["w"])  # silently wrong
    assert "fails its CRC-32 check" in checkpoint_problem(ck)
    with pytest.raises(CheckpointError, match=r"step_00000001.*cannot be resumed from: state.pt record .* CRC-32"):
        load_checkpoint(ck)


def test_truncation_and_missing_files_are_named(tmp_path):
    ck = save_checkpoint(tmp_path, 2, _state(2), files={"config.yaml": "a: 1\n"})
    size = (ck / "state.pt").stat().st_size
    with open(ck / "state.pt", "r+b") as f:
        f.truncate(size // 3)
    assert checkpoint_problem(ck) == f"state.pt has {size // 3:,} bytes, {size:,} were written"
    (ck / "COMPLETE").write_text("2")  # a marker from before sizes were recorded: the zip check still fails
    assert "state.pt is not a readable torch file" in checkpoint_problem(ck)
    ck4 = save_checkpoint(tmp_path, 4, _state(4), files={"config.yaml": "a: 1\n"})
    (ck4 / "config.yaml").unlink()
    assert checkpoint_problem(ck4) == "config.yaml is missing"


def test_resume_sets_damaged_checkpoints_aside_and_keeps_their_bytes(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, _state(step), keep=3)
    root = tmp_path / "checkpoints"
    flip_tensor_bytes(root / "step_00000006" / "state.pt")
    damaged = (root / "step_00000006" / "state.pt").read_bytes()
    warnings = []
    assert latest_readable_checkpoint(tmp_path, warnings.append) == root / "step_00000004"
    assert len(warnings) == 1 and "step_00000006 is unreadable" in warnings[0] and "CRC-32" in warnings[0]
    assert (root / "step_00000006.unreadable" / "state.pt").read_bytes() == damaged
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    save_checkpoint(tmp_path, 6, _state(6), keep=1)  # the rotation never deletes a set-aside checkpoint
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006", "step_00000006.unreadable"]
    for p in list_checkpoints(tmp_path):
        (p / "state.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"no readable checkpoint \(set aside: step_00000006.unreadable2\)"):
        latest_readable_checkpoint(tmp_path, warnings.append)


def test_a_damaged_single_file_state_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(_state(0), path)
    flip_tensor_bytes(path)
    with pytest.raises(CheckpointError, match=r"checkpoint.pt record .* fails its CRC-32 check .*; restore it"):
        read_state(path, fix="restore it")


def test_an_explicit_damaged_checkpoint_is_refused_before_anything_starts(tmp_path):
    from alignreg.config import RLConfig, from_dict
    from alignreg.orchestration.trainer import _resolve_resume

    ck = save_checkpoint(tmp_path, 5, _state(5))
    cfg = from_dict(RLConfig, {"trainer": {"run_dir": str(tmp_path / "other"), "resume": str(ck)}})
    assert _resolve_resume(cfg) == ck
    flip_tensor_bytes(ck / "state.pt")
    with pytest.raises(CheckpointError, match=r"trainer.resume: checkpoint .*step_00000005' cannot be resumed from: "
                                              r"state.pt record .* CRC-32 .*trainer.resume=auto"):
        _resolve_resume(cfg)
    assert ck.is_dir()  # an explicit choice is not renamed


def test_a_failed_write_keeps_the_last_checkpoint_and_names_it(tmp_path, monkeypatch):
    import errno
    import os

    import alignreg.checkpoint as ck

    save_checkpoint(tmp_path, 2, _state(2))
    real = torch.save

    def full_disk(obj, f, *a, **k):
        real(obj, f, *a, **k)  # the bytes go out, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"could not write the checkpoint of step 4 .*No space left on device.*"
                                              r"step_00000002, is intact"):
        save_checkpoint(tmp_path, 4, _state(4))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]  # no partial step_4.tmp
    assert checkpoint_problem(tmp_path / "checkpoints" / "step_00000002") is None


def test_a_full_disk_is_one_line_from_the_cli(monkeypatch, capsys):
    import errno
    import os

    from alignreg import cli

    def fail(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl")

    monkeypatch.setitem(cli.COMMANDS, "rl", fail)
    assert cli.main(["rl", "c.yaml"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: No space left on device writing '/runs/x/metrics.jsonl'; make room and run the same "
                   "command again (a run resumes from its last complete checkpoint)")

    def denied(argv):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/shared/runs/x")

    monkeypatch.setitem(cli.COMMANDS, "rl", denied)
    assert cli.main(["rl", "c.yaml"]) == 1
    assert capsys.readouterr().err.startswith("error: Permission denied: '/shared/runs/x'; check its permissions")


def test_a_run_directory_in_use_by_another_process_is_refused_before_anything_is_written(tmp_path):
    import subprocess
    import sys

    from alignreg.config import RLConfig, RunError, from_dict
    from alignreg.offline.config import OfflineConfig
    from alignreg.offline.train import train as offline_train
    from alignreg.orchestration.trainer import train
    from alignreg.runlock import RunLock
    from alignreg.sft import SFTRunConfig, run_sft

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from alignreg.runlock import RunLock\n"
                               f"with RunLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=rf"trainer.run_dir '{tmp_path}' is in use by another alignreg run \(pid "
                                           rf"{holder.pid} on .*\); wait for it to end or stop it"):
            train(from_dict(RLConfig, {"trainer": {"run_dir": str(tmp_path)}}))
        with pytest.raises(RunError, match=rf"trainer.out_dir '{tmp_path}' is in use .*pid {holder.pid}"):
            offline_train(from_dict(OfflineConfig, {}), tmp_path)
        with pytest.raises(RunError, match=rf"output_dir '{tmp_path}' is in use .*pid {holder.pid}"):
            run_sft(from_dict(SFTRunConfig, {"output_dir": str(tmp_path)}))
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # nothing else was written
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # released by the kernel when its holder died (killed: no stale lock)
        assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()


def test_a_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    """trainer.resume naming an earlier step: the later checkpoints (and the metrics of their steps) are
    kept under other names, so the resumed run's rotation cannot delete its own new checkpoints in their
    favour and a later resume: auto cannot return to them."""
    from alignreg.checkpoint import abandon_later_checkpoints

    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, _state(step), keep=3)
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(7)))
    root = tmp_path / "checkpoints"
    warnings = []
    assert abandon_later_checkpoints(tmp_path, root / "step_00000006", warnings.append) == []  # the newest: nothing later
    moved = abandon_later_checkpoints(tmp_path, root / "step_00000002", warnings.append)
    assert [p.name for p in moved] == ["step_00000004.abandoned", "step_00000006.abandoned"]
    assert len(warnings) == 1 and "set aside, not deleted" in warnings[0] and "metrics.jsonl.abandoned" in warnings[0]
    assert (tmp_path / "metrics.jsonl.abandoned").read_text().count("step") == 7
    assert load_checkpoint(root / "step_00000006.abandoned")["step"] == 6  # intact
    save_checkpoint(tmp_path, 3, _state(3), keep=1)  # the resumed run's rotation keeps its own newest
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    assert latest_readable_checkpoint(tmp_path, warnings.append) == root / "step_00000003"
    assert abandon_later_checkpoints(tmp_path / "other", root / "step_00000003", warnings.append) == []  # not this run's


def test_checkpoint_text_files_and_entries_are_flushed_before_publishing(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    save_checkpoint(tmp_path, 1, _state(1), files={"config.yaml": "a: 1\n"})
    tmp = str(tmp_path / "checkpoints" / "step_00000001.tmp")
    assert {tmp + "/state.pt", tmp + "/config.yaml", tmp + "/COMPLETE", tmp, str(tmp_path / "checkpoints")} <= set(synced)


def test_a_file_system_without_flock_is_named_not_reported_as_a_busy_run(tmp_path, monkeypatch):
    import errno
    import fcntl

    from alignreg.config import RunError
    from alignreg.runlock import RunLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(RunError, match=r"cannot lock .lock \(No locks available\); the file system may not support flock"):
        with RunLock(tmp_path):
            pass
