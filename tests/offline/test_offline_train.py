"""End-to-end on CPU: data generated on first use, short runs of every algorithm, resume, CLI errors."""
import json
import os
import signal

import h5py
import numpy as np
import pytest
import torch
import yaml

from alignreg.config import load_config
from alignreg.offline.cli import data_main, offline_main
from alignreg.offline.config import OfflineConfig
from alignreg.offline.train import train

ALGOS = {
    "bc": ({"algo": "bc"}, [{"name": "bc_mse"}]),
    "td3bc": ({}, [{"name": "bc_mse"}]),
    "prdc": ({}, [{"name": "prdc", "params": {"beta": 2.0, "k": 1}}]),
    "a2pr": ({"actor_hidden": [32, 32, 32], "critic_hidden": [32, 32, 32, 32]},
             [{"name": "a2pr", "coef": 0.4, "params": {"vae_hidden": [32, 32], "value_hidden": [32, 32]}}]),
}


def cfg_dict(tmp_path, algo, steps=100, **trainer):
    learner, regs = ALGOS[algo]
    return {"data": {"source": "generated", "env": "hopper", "level": "random", "size": 3000,
                     "path": str(tmp_path / "hopper-random.hdf5")},
            "learner": {"batch_size": 64, "actor_hidden": [32, 32], "critic_hidden": [32, 32], **learner},
            "regularizers": regs, "eval": {"every": 50, "episodes": 1},
            "trainer": {"steps": steps, "log_every": 25, "checkpoint_every": 50, "progress": False, **trainer}}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_short_training_run(tmp_path, algo):
    from alignreg.config import from_dict

    cfg = from_dict(OfflineConfig, cfg_dict(tmp_path, algo))
    res = train(cfg, tmp_path / "run", log=lambda *a: None)
    out = tmp_path / "run"
    assert (out / "hopper-random.hdf5").exists() is False and (tmp_path / "hopper-random.hdf5").is_file()
    assert [e["step"] for e in res["evals"]] == [50, 100]
    assert np.isfinite(res["final_score"]) and res["reference"] == "alignreg-v5"
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [25, 50, 75, 100]
    assert all(np.isfinite(v) for l in lines for v in l.values())
    assert (out / "curve.png").stat().st_size > 1000 and (out / "checkpoint.pt").is_file()
    assert json.loads((out / "results.json").read_text())["algo"] == ("bc" if algo == "bc" else ALGOS[algo][1][0]["name"])


@pytest.mark.parametrize("algo", ["prdc", "a2pr"])
def test_resume_reproduces_uninterrupted_run(tmp_path, algo):
    from alignreg.config import from_dict

    full = from_dict(OfflineConfig, cfg_dict(tmp_path, algo, steps=100))
    train(full, tmp_path / "full", log=lambda *a: None)
    half = from_dict(OfflineConfig, cfg_dict(tmp_path, algo, steps=50))
    train(half, tmp_path / "part", log=lambda *a: None)
    rest = from_dict(OfflineConfig, cfg_dict(tmp_path, algo, steps=100))
    train(rest, tmp_path / "part", log=lambda *a: None)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["learner"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["learner"]
    assert a["it"] == b["it"] == 100
    for key in ("actor", "critic"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=0)
    steps = [json.loads(l)["step"] for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [25, 50, 75, 100]


def test_sigterm_mid_interval_checkpoints_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    """SIGTERM (or a first Ctrl-C) between two checkpoints and two metrics lines: the iteration finishes,
    the checkpoint is written (with the partial metrics averages) and the resumed run equals an
    uninterrupted one: weights, metrics lines and evaluations."""
    from alignreg.config import from_dict
    from alignreg.offline.td3 import TD3Learner

    cfg = lambda: from_dict(OfflineConfig, cfg_dict(tmp_path, "td3bc", steps=100))  # noqa: E731
    train(cfg(), tmp_path / "full", log=lambda *a: None)
    original = TD3Learner.train_step

    def train_step(self, batch):
        if self.it == 36:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(TD3Learner, "train_step", train_step)
    before = signal.getsignal(signal.SIGTERM)
    res = train(cfg(), tmp_path / "part", log=lambda *a: None)
    assert res["stopped"] == "SIGTERM" and res["steps"] == 37
    assert signal.getsignal(signal.SIGTERM) is before and not (tmp_path / "part" / "results.json").exists()
    monkeypatch.undo()
    assert train(cfg(), tmp_path / "part", log=lambda *a: None)["steps"] == 100
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["learner"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["learner"]
    for key in ("actor", "critic"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=0)

    def lines(run, name):
        rows = [json.loads(l) for l in (tmp_path / run / name).read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]

    assert lines("part", "metrics.jsonl") == lines("full", "metrics.jsonl")
    assert lines("part", "evals.jsonl") == lines("full", "evals.jsonl")


def test_resume_refuses_other_settings_and_damaged_checkpoints_and_resume_false_keeps_the_run(tmp_path):
    from alignreg.config import ConfigError, from_dict

    d = cfg_dict(tmp_path, "td3bc", steps=50)
    train(from_dict(OfflineConfig, d), tmp_path / "run", log=lambda *a: None)
    saved = (tmp_path / "run" / "results.json").read_text()
    other = {**d, "learner": {**d["learner"], "alpha": 5.0}, "trainer": {**d["trainer"], "steps": 100}}
    with pytest.raises(ConfigError, match=r"different settings: learner.alpha 2.5 -> 5.0\. A resume continues"):
        train(from_dict(OfflineConfig, other), tmp_path / "run", log=lambda *a: None)
    with pytest.raises(ConfigError, match="trainer.steps=20 is below the iteration"):
        train(from_dict(OfflineConfig, {**d, "trainer": {**d["trainer"], "steps": 20}}), tmp_path / "run",
              log=lambda *a: None)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(from_dict(OfflineConfig, {**d, "trainer": {**d["trainer"], "resume": False}}), tmp_path / "run",
              log=lambda *a: None)
    assert (tmp_path / "run" / "results.json").read_text() == saved
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    # the data file edited in place (same settings, other transitions): the resume refuses it
    with h5py.File(d["data"]["path"], "r+") as f:
        f["rewards"][0] += 1.0
    with pytest.raises(ConfigError, match=r"the dataset changed since .*checkpoint.pt was written"):
        train(from_dict(OfflineConfig, {**d, "trainer": {**d["trainer"], "steps": 100}}), tmp_path / "run",
              log=lambda *a: None)
    assert (tmp_path / "run" / "results.json").read_text() == saved
    # a damaged checkpoint (bytes flipped after it was written) is never loaded, and nothing is overwritten
    from alignreg.checkpoint import CheckpointError
    from tests.test_checkpoint import flip_tensor_bytes

    flip_tensor_bytes(tmp_path / "run" / "checkpoint.pt")
    damaged = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"checkpoint.pt record .* fails its CRC-32 check .*; restore it"):
        train(from_dict(OfflineConfig, {**d, "trainer": {**d["trainer"], "steps": 100}}), tmp_path / "run",
              log=lambda *a: None)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == damaged
    assert (tmp_path / "run" / "results.json").read_text() == saved


def test_cli_errors_are_one_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg_dict(tmp_path, "prdc")))
    assert offline_main([str(p), "learner.alhpa=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config.learner.alhpa: unknown key; valid keys:") and "\n" not in err
    assert offline_main([str(p), "regularizers.0.name=kl_ref"]) == 2
    assert "does not apply here; valid choices: a2pr, bc_mse, prdc" in capsys.readouterr().err
    assert offline_main([str(p), "data.source=minari"]) == 2
    assert "data.minari_id: required" in capsys.readouterr().err
    assert offline_main([str(p), "data.source=d4rl_hdf5", f"data.path={tmp_path}/missing.hdf5"]) == 2
    assert "dataset file does not exist" in capsys.readouterr().err
    assert offline_main([str(tmp_path / "nope.yaml")]) == 2
    # out-of-range values name the key (trainer.log_every=0 was a ZeroDivisionError mid-run)
    for override, needle in (("trainer.log_every=0", "config.trainer.log_every must be >= 1, got 0"),
                             ("eval.episodes=0", "config.eval.episodes must be >= 1, got 0"),
                             ("learner.actor_hidden=[]", "config.learner.actor_hidden must be a non-empty list"),
                             ("learner.tau=0", r"config.learner.tau must be in (0, 1]"),
                             ("data.size=10", "config.data.size must be >= 1000, got 10"),
                             ("data.seed=-1", "config.data.seed must be >= 0, got -1")):
        assert offline_main([str(p), override]) == 2
        assert needle in capsys.readouterr().err, override
    # a bad out_dir placeholder was a KeyError / ValueError traceback
    for out_dir, needle in (("runs/o/{nme}", "(KeyError: 'nme')"), ("{name}-{seed", "(ValueError: expected '}'")):
        assert offline_main([str(p), f"trainer.out_dir={out_dir}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: config.trainer.out_dir: bad placeholder in '{out_dir}' {needle}") and "\n" not in err
        assert err.endswith("valid placeholders: {name}, {seed} (write {{ and }} for literal braces)")
    # alignreg data: bad sizes were an IndexError (0) / ValueError (-5) traceback
    for args, needle in ((["--size", "0"], "error: --size must be >= 1000 (env steps per behaviour policy), got 0"),
                         (["--size", "-5"], "error: --size must be >= 1000 (env steps per behaviour policy), got -5"),
                         (["--seed", "-1"], "error: --seed must be >= 0, got -1")):
        assert data_main(["d4rl", "--env", "hopper", "--level", "random", "--out", str(tmp_path / "x.hdf5"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err == needle and not (tmp_path / "x.hdf5").exists()


def test_generated_data_is_deterministic_and_d4rl_format(tmp_path):
    assert data_main(["d4rl", "--env", "hopper", "--level", "random", "--size", "1500", "--out", str(tmp_path / "a.hdf5")]) == 0
    assert data_main(["d4rl", "--env", "hopper", "--level", "random", "--size", "1500", "--out", str(tmp_path / "b.hdf5")]) == 0
    with h5py.File(tmp_path / "a.hdf5") as fa, h5py.File(tmp_path / "b.hdf5") as fb:
        assert set(fa.keys()) == {"observations", "actions", "rewards", "next_observations", "terminals", "timeouts"}
        for k in fa.keys():
            np.testing.assert_array_equal(fa[k][()], fb[k][()])
        obs, nxt, term, tout = fa["observations"][()], fa["next_observations"][()], fa["terminals"][()], fa["timeouts"][()]
        ends = term | tout
        np.testing.assert_array_equal(obs[1:][~ends[:-1]], nxt[:-1][~ends[:-1]])  # episodes are contiguous
        assert tout[-1] and fa.attrs["reference_set"] == "alignreg-v5"


def test_shipped_policies_and_alignreg_references(tmp_path):
    from alignreg.offline.generate import POLICY_DIR, generate_dataset
    from alignreg.offline.scores import alignreg_v5_refs, normalized_score

    for env in ("hopper", "halfcheetah", "walker2d"):
        assert (POLICY_DIR / f"{env}.pt").stat().st_size < 1_000_000
        ref = alignreg_v5_refs()[env]
        assert ref["random"] < ref["medium_policy"] < ref["expert"]
        assert normalized_score(env, ref["random"], "alignreg-v5") == pytest.approx(0.0)
        assert normalized_score(env, ref["expert"], "alignreg-v5") == pytest.approx(100.0)
    lines: list[str] = []
    a = generate_dataset("walker2d", "medium-expert", 600, 3, tmp_path / "a.hdf5", log=lines.append)
    b = generate_dataset("walker2d", "medium-expert", 600, 3, tmp_path / "b.hdf5", log=None)
    assert len(lines) == 18 and "segment 2/2 (expert) 540/600 env steps" in lines[-1]  # progress every 10 %
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert fa["observations"].shape == (1200, 17) and fa["actions"].shape == (1200, 6)
        for k in fa.keys():
            np.testing.assert_array_equal(fa[k][()], fb[k][()])
        assert fa["timeouts"][599] and fa["timeouts"][1199]  # segment ends are final steps, as in D4RL


def test_generated_data_is_tied_to_the_shipped_policies(tmp_path):
    from alignreg.config import ConfigError
    from alignreg.offline.config import OfflineDataConfig
    from alignreg.offline.generate import policy_version
    from alignreg.offline.train import generated_path, load_transitions

    ver = policy_version("hopper")
    assert len(ver) == 8 and ver != policy_version("walker2d")
    default = generated_path(OfflineDataConfig(env="hopper", level="medium", size=500, cache_dir=str(tmp_path)))
    assert default.name == f"hopper-medium-v5-p{ver}-s0-n500.hdf5"
    dc = OfflineDataConfig(env="hopper", level="random", size=300, path=str(tmp_path / "h.hdf5"))
    data, _ = load_transitions(dc, log=lambda *a: None)  # generated on first use
    with h5py.File(tmp_path / "h.hdf5", "r") as f:
        assert f.attrs["behaviour_policies"] == ver
    again, _ = load_transitions(dc)  # the same policies: reused as it is
    np.testing.assert_array_equal(again["observations"], data["observations"])
    # a file of other data settings than the config's (its results would be labelled with the config's)
    for change, needle in (({"level": "expert"}, "generated with level=random, but the config has data.level=expert"),
                           ({"env": "walker2d"}, "generated with env=hopper, but the config has data.env=walker2d"),
                           ({"size": 400, "seed": 2}, "generated with seed=0, size=300, but the config has "
                                                     "data.seed=2, data.size=400; set those keys")):
        with pytest.raises(ConfigError, match=needle):
            load_transitions(OfflineDataConfig(**{**vars(dc), **change}))
    with h5py.File(tmp_path / "h.hdf5", "a") as f:
        f.attrs["level"] = "medium-replay"  # its size is set by the shipped replay plan, not by data.size
    load_transitions(OfflineDataConfig(**{**vars(dc), "level": "medium-replay", "size": 100_000}))
    with h5py.File(tmp_path / "h.hdf5", "a") as f:
        f.attrs["level"] = "random"
    with h5py.File(tmp_path / "h.hdf5", "a") as f:
        f.attrs["behaviour_policies"] = "0123abcd"  # made by other behaviour policies
    with pytest.raises(ConfigError, match="generated with 0123abcd behaviour policies, but this alignreg ships"):
        load_transitions(dc)
    with h5py.File(tmp_path / "h.hdf5", "a") as f:
        del f.attrs["behaviour_policies"]  # written before files carried the attribute
    with pytest.raises(ConfigError, match="an older alignreg's behaviour policies.*delete the file"):
        load_transitions(dc)
    with h5py.File(tmp_path / "h.hdf5", "a") as f:
        del f.attrs["generator"]  # e.g. a real D4RL file named as generated data
    with pytest.raises(ConfigError, match="not generated by alignreg.*set data.source: d4rl_hdf5"):
        load_transitions(dc)
    d4rl = OfflineDataConfig(env="hopper", source="d4rl_hdf5", path=str(tmp_path / "h.hdf5"))
    assert load_transitions(d4rl)[1] == "d4rl"  # the same file, read as D4RL data


def test_dataset_of_another_env_is_refused_before_training(tmp_path):
    """A hopper-shaped file (11-D obs, 3-D actions) with data.env=walker2d (17 / 6) used to train fully and
    crash at the first evaluation."""
    from alignreg.config import ConfigError, from_dict
    from alignreg.offline.generate import generate_dataset

    generate_dataset("hopper", "random", 300, 0, tmp_path / "h.hdf5", log=None)
    d = cfg_dict(tmp_path, "td3bc", steps=50)
    d["data"] = {"source": "d4rl_hdf5", "path": str(tmp_path / "h.hdf5"), "env": "walker2d"}
    with pytest.raises(ConfigError, match=r"^data.env=walker2d expects 17-D observations / 6-D actions, the "
                                          r"dataset has 11 / 3; set data.env"):
        train(from_dict(OfflineConfig, d), tmp_path / "run", log=lambda *a: None)
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_final_checkpoint_precedes_the_final_eval_and_a_rerun_keeps_the_speed(tmp_path, monkeypatch):
    from alignreg.config import from_dict
    import alignreg.offline.evaluate as evaluate_mod

    d = cfg_dict(tmp_path, "td3bc", steps=50)
    d["eval"]["every"], d["trainer"]["checkpoint_every"] = 0, 0
    real = evaluate_mod.evaluate

    def broken(*a, **k):
        raise RuntimeError("eval crashed")

    monkeypatch.setattr(evaluate_mod, "evaluate", broken)
    with pytest.raises(RuntimeError, match="eval crashed"):
        train(from_dict(OfflineConfig, d), tmp_path / "run", log=lambda *a: None)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["learner"]["it"] == 50  # training kept
    monkeypatch.setattr(evaluate_mod, "evaluate", real)
    res = train(from_dict(OfflineConfig, d), tmp_path / "run", log=lambda *a: None)  # only the final eval runs
    assert res["steps"] == 50 and [e["step"] for e in res["evals"]] == [50] and res["steps_per_s"] == 0.0
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    stored["steps_per_s"] = 123.0
    (tmp_path / "run" / "results.json").write_text(json.dumps(stored))
    again = train(from_dict(OfflineConfig, d), tmp_path / "run", log=lambda *a: None)  # a finished run: nothing trains
    assert again["steps_per_s"] == 123.0 and again["evals"] == res["evals"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps_per_s"] == 123.0


def test_default_out_dir_separates_seeds(tmp_path, monkeypatch):
    """The default trainer.out_dir holds the seed: a second seed of one config used to find the first's run
    and refuse it (trainer.seed 0 -> 1)."""
    d = cfg_dict(tmp_path, "td3bc", steps=10)
    d["eval"]["every"] = 0
    (tmp_path / "td3bc_small.yaml").write_text(yaml.safe_dump(d))
    monkeypatch.chdir(tmp_path)
    for seed in (0, 1):
        assert offline_main(["td3bc_small.yaml", f"trainer.seed={seed}"]) == 0
        assert json.loads((tmp_path / "runs" / "offline" / f"td3bc_small-s{seed}" / "results.json").read_text())["seed"] == seed


def test_a_kill_after_the_final_eval_row_and_before_its_checkpoint_leaves_no_duplicate_row(tmp_path, monkeypatch):
    """The final evaluation appends its row to evals.jsonl, then the checkpoint holding it is written; a kill
    in between resumed from the checkpoint of the same step, kept that row and appended it again."""
    from alignreg.config import from_dict
    import alignreg.offline.train as train_mod

    d = cfg_dict(tmp_path, "td3bc", steps=50)
    d["eval"]["every"], d["trainer"]["checkpoint_every"] = 25, 0
    real, saves = train_mod._atomic_save, []

    def killed_at_the_second_final_save(obj, path):
        saves.append(obj["learner"]["it"])
        if len(saves) == 2:  # after the final evaluation's row: the process dies here
            raise KeyboardInterrupt
        real(obj, path)

    monkeypatch.setattr(train_mod, "_atomic_save", killed_at_the_second_final_save)
    with pytest.raises(KeyboardInterrupt):
        train(from_dict(OfflineConfig, d), tmp_path / "run", log=lambda *a: None)
    rows = lambda: [json.loads(l)["step"] for l in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]  # noqa: E731
    assert saves == [50, 50] and rows() == [25, 50]
    monkeypatch.undo()
    res = train(from_dict(OfflineConfig, d), tmp_path / "run", log=lambda *a: None)
    assert [e["step"] for e in res["evals"]] == rows() == [25, 50]
    assert [json.loads(l) for l in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()] == res["evals"]


def test_a_signal_at_the_end_of_training_is_handled_too(tmp_path, monkeypatch):
    """SIGTERM used to be handled only inside the training loop: one during the final evaluation or the
    writing of the results reached the previous handler (the default one kills the process mid-write), and
    one during the last iteration was ignored. Now: during the last iteration, the checkpoint is written and
    the run stops before the final evaluation (the resumed run only evaluates); during the final
    evaluation, the run finishes and reports the signal."""
    from alignreg.config import from_dict
    import alignreg.offline.evaluate as evaluate_mod
    from alignreg.offline.td3 import TD3Learner

    def outer(signum, frame):  # stands in for the default handler, which would kill pytest
        raise AssertionError("SIGTERM reached the handler outside train()")

    previous = signal.signal(signal.SIGTERM, outer)
    try:
        d = cfg_dict(tmp_path, "td3bc", steps=50)
        d["eval"]["every"], d["trainer"]["checkpoint_every"] = 25, 0
        original_step, real_eval = TD3Learner.train_step, evaluate_mod.evaluate

        def train_step(self, batch):
            if self.it == 49:  # the last iteration
                os.kill(os.getpid(), signal.SIGTERM)
            return original_step(self, batch)

        monkeypatch.setattr(TD3Learner, "train_step", train_step)
        res = train(from_dict(OfflineConfig, d), tmp_path / "run", log=lambda *a: None)
        assert res["stopped"] == "SIGTERM" and res["steps"] == 50 and "final_score" not in res
        assert not (tmp_path / "run" / "results.json").exists()
        assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["learner"]["it"] == 50
        monkeypatch.setattr(TD3Learner, "train_step", original_step)

        def evaluate(*a, **k):  # the final evaluation (the resumed run only evaluates)
            os.kill(os.getpid(), signal.SIGTERM)
            return real_eval(*a, **k)

        monkeypatch.setattr(evaluate_mod, "evaluate", evaluate)
        lines: list[str] = []
        res = train(from_dict(OfflineConfig, d), tmp_path / "run", log=lines.append)
        assert res["stopped"] == "SIGTERM" and [e["step"] for e in res["evals"]] == [25, 50]
        assert "SIGTERM: it came while the run was finishing" in lines[-1]
        stored = json.loads((tmp_path / "run" / "results.json").read_text())
        assert stored == {k: v for k, v in res.items() if k != "stopped"}
        assert signal.getsignal(signal.SIGTERM) is outer
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_trainer_device_errors_name_the_fix(tmp_path):
    from alignreg.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"trainer.device: unknown device 'gpu'; valid: auto, cpu, cuda, cuda:N"):
        from_dict(OfflineConfig, cfg_dict(tmp_path, "td3bc", device="gpu"))
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a machine without one)
    cfg = from_dict(OfflineConfig, cfg_dict(tmp_path, "td3bc", device=missing))
    with pytest.raises(ConfigError, match=rf"trainer.device={missing}: torch sees \d+ CUDA device\(s\) here.*set trainer.device=cpu or auto"):
        train(cfg, tmp_path / "run", log=lambda *a: None)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    auto = from_dict(OfflineConfig, cfg_dict(tmp_path, "prdc", steps=20))  # auto: the CPU here
    assert auto.trainer.device == "auto"
    res = train(auto, tmp_path / "auto", log=lambda *a: None)
    assert res["steps"] == 20
