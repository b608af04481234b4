"""D4RL-format loading: qlearning_dataset semantics, validation errors, normalised scores."""
import h5py
import numpy as np
import pytest

from alignreg.offline.datasets import (DatasetError, OfflineData, from_arrays, qlearning_dataset, read_d4rl_hdf5,
                                       read_minari)
from alignreg.offline.scores import D4RL_REF, normalized_score


def d4rl_reference_loop(ds, terminate_on_end=False, max_episode_steps=1000):
    """D4RL's qlearning_dataset loop, transcribed literally (per-row Python)."""
    N = ds["rewards"].shape[0]
    obs_, next_obs_, action_, reward_, done_ = [], [], [], [], []
    use_timeouts = "timeouts" in ds
    episode_step = 0
    for i in range(N - 1):
        obs = ds["observations"][i].astype(np.float32)
        new_obs = ds["observations"][i + 1].astype(np.float32)
        action = ds["actions"][i].astype(np.float32)
        reward = ds["rewards"][i].astype(np.float32)
        done_bool = bool(ds["terminals"][i])
        final_timestep = ds["timeouts"][i] if use_timeouts else (episode_step == max_episode_steps - 1)
        if (not terminate_on_end) and final_timestep:
            episode_step = 0
            continue
        if done_bool or final_timestep:
            episode_step = 0
        obs_.append(obs); next_obs_.append(new_obs); action_.append(action); reward_.append(reward); done_.append(done_bool)
        episode_step += 1
    return {"observations": np.array(obs_), "actions": np.array(action_), "next_observations": np.array(next_obs_),
            "rewards": np.array(reward_), "terminals": np.array(done_)}


def make_raw(rng, n=3000, S=5, A=2, max_steps=1000, with_timeouts=True):
    """Episodes ending by termination (random lengths) or by the time limit, like a D4RL file."""
    obs = rng.normal(size=(n, S)); act = rng.uniform(-1, 1, (n, A)); rew = rng.normal(size=n)
    term = np.zeros(n, bool); tout = np.zeros(n, bool)
    t = 0
    for i in range(n):
        t += 1
        if rng.random() < 0.002:
            term[i], t = True, 0
        elif t == max_steps:
            tout[i], t = True, 0
    raw = {"observations": obs, "actions": act, "rewards": rew, "terminals": term,
           "next_observations": np.roll(obs, -1, 0)}
    if with_timeouts:
        raw["timeouts"] = tout
    return raw


def write(path, raw):
    with h5py.File(path, "w") as f:
        for k, v in raw.items():
            f.create_dataset(k, data=v)


@pytest.mark.parametrize("with_timeouts", [True, False])
@pytest.mark.parametrize("terminate_on_end", [False, True])
def test_qlearning_dataset_matches_d4rl(tmp_path, with_timeouts, terminate_on_end):
    raw = make_raw(np.random.default_rng(0), n=5000, max_steps=700, with_timeouts=with_timeouts)
    # make the counter path meet episodes of exactly max_episode_steps: force a 700-step run with no terminal
    write(tmp_path / "d.hdf5", raw)
    got = qlearning_dataset(read_d4rl_hdf5(tmp_path / "d.hdf5"), terminate_on_end, max_episode_steps=700)
    ref = d4rl_reference_loop(raw, terminate_on_end, max_episode_steps=700)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype, k
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    if not terminate_on_end:
        assert len(got["rewards"]) < len(raw["rewards"]) - 1  # timeouts were dropped


def test_rewards_column_vector_and_timeout_rows_dropped(tmp_path):
    raw = make_raw(np.random.default_rng(1), n=2500, max_steps=400)
    raw["rewards"] = raw["rewards"][:, None]
    raw["terminals"] = raw["terminals"][:, None]
    write(tmp_path / "d.hdf5", raw)
    got = qlearning_dataset(read_d4rl_hdf5(tmp_path / "d.hdf5"))
    kept = np.nonzero(~raw["timeouts"][:-1])[0]
    np.testing.assert_array_equal(got["next_observations"], raw["observations"][kept + 1].astype(np.float32))
    np.testing.assert_array_equal(got["rewards"], raw["rewards"][kept, 0].astype(np.float32))


@pytest.mark.parametrize("mutate, msg", [
    (lambda r: r.pop("actions"), "missing dataset 'actions'"),
    (lambda r: r.__setitem__("rewards", np.zeros(7)), "rewards must have shape"),
    (lambda r: r["observations"].__setitem__((17, 2), np.nan), "observations contains NaN or inf (first at row 17)"),
    (lambda r: r["rewards"].__setitem__(5, np.inf), "rewards contains NaN or inf (first at row 5)"),
    (lambda r: r.__setitem__("actions", np.zeros((100, 2, 2))), "must be 2-D"),
    (lambda r: r.__setitem__("next_observations", np.zeros((3, 5))), "next_observations shape"),
    # not real numbers: a raw numpy TypeError before (ufunc 'isfinite' not supported)
    (lambda r: r.__setitem__("observations", r["observations"].astype("S8")), "observations must hold real numbers, got dtype |S8"),
    (lambda r: r.__setitem__("actions", r["actions"] + 1j), "actions must hold real numbers, got dtype complex128"),
    # terminals / timeouts: NaN was read as True (astype(bool)), 2 as a terminal
    (lambda r: r.__setitem__("terminals", np.where(np.arange(100) == 9, np.nan, 0.0)), "terminals contains NaN or inf (first at row 9)"),
    (lambda r: r.__setitem__("timeouts", np.where(np.arange(100) == 4, np.nan, 0.0)), "timeouts contains NaN or inf (first at row 4)"),
    (lambda r: r.__setitem__("terminals", np.where(np.arange(100) == 6, 2, 0)), "terminals must be 0/1 (or boolean), got 2 at row 6"),
])
def test_corrupt_files_give_clear_errors(tmp_path, mutate, msg):
    raw = make_raw(np.random.default_rng(2), n=100)
    mutate(raw)
    write(tmp_path / "bad.hdf5", raw)
    with pytest.raises(DatasetError) as e:
        read_d4rl_hdf5(tmp_path / "bad.hdf5")
    assert msg in str(e.value) and "bad.hdf5" in str(e.value) and "\n" not in str(e.value)


def test_no_transitions_left_is_a_clear_error(tmp_path):
    """Every row a time-out: qlearning_dataset keeps nothing (a memoryview TypeError in data_fingerprint before)."""
    from alignreg.offline.config import OfflineDataConfig
    from alignreg.offline.train import load_transitions

    raw = make_raw(np.random.default_rng(4), n=50)
    raw["terminals"][:], raw["timeouts"][:] = False, True
    write(tmp_path / "t.hdf5", raw)
    with pytest.raises(DatasetError, match=r"t.hdf5: no transitions left after dropping the time-out rows and the "
                                           r"last row \(50 rows, every one a final timestep\)"):
        load_transitions(OfflineDataConfig(source="d4rl_hdf5", path=str(tmp_path / "t.hdf5")))


def test_not_hdf5_and_missing_file(tmp_path):
    (tmp_path / "x.hdf5").write_text("not hdf5")
    with pytest.raises(DatasetError, match="not a readable HDF5 file"):
        read_d4rl_hdf5(tmp_path / "x.hdf5")
    with pytest.raises(DatasetError, match="does not exist"):
        read_d4rl_hdf5(tmp_path / "nope.hdf5")


def test_from_arrays_and_normalisation():
    rng = np.random.default_rng(3)
    obs = rng.normal(3.0, 2.0, (500, 4))
    t = from_arrays(obs, rng.uniform(-1, 1, (500, 2)), rng.normal(size=500), obs + 1, np.zeros(500, bool))
    d = OfflineData(t)
    np.testing.assert_allclose(d.mean[0], obs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(d.std[0], obs.std(0) + 1e-3, rtol=1e-5)
    np.testing.assert_allclose(d.states.numpy(), (obs - obs.mean(0)) / (obs.std(0) + 1e-3), atol=1e-5)
    with pytest.raises(DatasetError, match="actions has 3 rows"):
        from_arrays(obs, np.zeros((3, 2)), np.zeros(500), obs, np.zeros(500))


def test_normalized_score_d4rl_refs():
    for env, (lo, hi) in D4RL_REF.items():
        assert normalized_score(env, lo, "d4rl") == pytest.approx(0.0)
        assert normalized_score(env, hi, "d4rl") == pytest.approx(100.0)
    assert normalized_score("hopper", 1607.0, "d4rl") == pytest.approx(100 * (1607.0 + 20.272305) / (3234.3 + 20.272305))
    assert D4RL_REF["halfcheetah"] == (-280.178953, 12135.0) and D4RL_REF["walker2d"] == (1.629008, 4592.3)


def test_offline_imports_stay_light():
    import subprocess
    import sys

    code = ("import sys, alignreg.offline, alignreg.offline.cli, alignreg.offline.train, alignreg.offline.sweep, "
            "alignreg.offline.generate, alignreg.regularizers; "
            "print(','.join(m for m in ('gymnasium','mujoco','h5py','scipy','ray','matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def write_minari(dataset_id, episodes, **spaces_or_env):
    """A Minari dataset written locally by Minari itself (``create_dataset_from_buffers``: the files
    ``DataCollector.create_dataset`` writes, without the jax that ``DataCollector`` needs to stack steps)."""
    import warnings

    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [EpisodeBuffer(id=i, **ep) for i, ep in enumerate(episodes)]
    with warnings.catch_warnings():  # minari's reminders to set author, code_permalink, ...
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(dataset_id, buffers, algorithm_name="alignreg-test", **spaces_or_env)


def record_hopper_minari(tmp_path, monkeypatch, dataset_id="test/hopper/tiny-v0"):
    """Three Hopper-v5 episodes under a 15-step TimeLimit, recorded as ``DataCollector`` does (reset
    observation + one observation per step): small random actions run into the time limit (truncated),
    a fixed full-torque action makes the hopper fall at step 10 (terminated). Returns the recorded episodes."""
    import gymnasium as gym

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = gym.make("Hopper-v5", max_episode_steps=15)
    rng = np.random.default_rng(0)
    episodes = []
    for seed, fall in enumerate([False, True, False]):
        o, _ = env.reset(seed=seed)
        ep = {"observations": [o], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        while not (ep["terminations"] and (ep["terminations"][-1] or ep["truncations"][-1])):
            a = np.array([1, -1, 1], np.float32) if fall else rng.uniform(-0.1, 0.1, 3).astype(np.float32)
            o, r, term, trunc, _ = env.step(a)
            for k, v in zip(("observations", "actions", "rewards", "terminations", "truncations"), (o, a, r, term, trunc)):
                ep[k].append(v)
        episodes.append({k: np.array(v) for k, v in ep.items()})
    assert [(len(e["actions"]), e["terminations"][-1], e["truncations"][-1]) for e in episodes] == \
        [(15, False, True), (10, True, False), (15, False, True)]
    write_minari(dataset_id, episodes, env=env)
    return episodes


def test_minari_dataset_gives_the_recorded_transitions(tmp_path, monkeypatch):
    """Every step of every episode, next observation = the episode's own next one (also at a truncation,
    never the next episode's reset), terminals = terminations only; read directly and via data.source=minari."""
    from alignreg.config import from_dict
    from alignreg.offline.config import OfflineConfig
    from alignreg.offline.train import load_transitions

    eps = record_hopper_minari(tmp_path, monkeypatch)
    want = {"observations": np.concatenate([e["observations"][:-1] for e in eps]).astype(np.float32),
            "actions": np.concatenate([e["actions"] for e in eps]),
            "next_observations": np.concatenate([e["observations"][1:] for e in eps]).astype(np.float32),
            "rewards": np.concatenate([e["rewards"] for e in eps]).astype(np.float32),
            "terminals": np.concatenate([e["terminations"] for e in eps])}
    cfg = from_dict(OfflineConfig, {"data": {"source": "minari", "minari_id": "test/hopper/tiny-v0", "env": "hopper"}})
    via_config, ref = load_transitions(cfg.data)
    assert ref == "d4rl"
    for t in (read_minari("test/hopper/tiny-v0"), via_config):
        assert set(t) == set(want) and len(t["rewards"]) == 40
        for k in want:
            assert t[k].dtype == want[k].dtype, k
            np.testing.assert_array_equal(t[k], want[k], err_msg=k)
        assert np.flatnonzero(t["terminals"]).tolist() == [24]  # the fall, not the two truncations (rows 14, 39)
        np.testing.assert_array_equal(t["next_observations"][14], eps[0]["observations"][15].astype(np.float32))
        np.testing.assert_array_equal(t["observations"][15], eps[1]["observations"][0].astype(np.float32))


def test_minari_short_training_run(tmp_path, monkeypatch):
    from alignreg.config import from_dict
    from alignreg.offline.config import OfflineConfig
    from alignreg.offline.train import train

    record_hopper_minari(tmp_path, monkeypatch)
    cfg = from_dict(OfflineConfig, {"data": {"source": "minari", "minari_id": "test/hopper/tiny-v0"},
                                    "learner": {"batch_size": 16, "actor_hidden": [16], "critic_hidden": [16]},
                                    "regularizers": [{"name": "bc_mse"}], "eval": {"every": 0, "episodes": 1},
                                    "trainer": {"steps": 10, "log_every": 5, "checkpoint_every": 10,
                                                "progress": False}})
    res = train(cfg, tmp_path / "run", log=lambda *a: None)
    assert res["source"] == "minari" and res["reference"] == "d4rl" and np.isfinite(res["final_score"])


def test_minari_errors_are_clear(tmp_path, monkeypatch):
    """A missing id was minari's FileNotFoundError (with 'Use download=True', which alignreg cannot pass); a
    Dict observation space crashed in from_arrays; data.env of another task was only caught by dimensions."""
    import gymnasium as gym

    from alignreg.offline.config import OfflineDataConfig
    from alignreg.offline.train import load_transitions

    record_hopper_minari(tmp_path, monkeypatch)
    with pytest.raises(DatasetError) as e:
        load_transitions(OfflineDataConfig(source="minari", minari_id="mujoco/hopper/medium-v0"))
    msg = str(e.value)
    assert msg.startswith(f"minari:mujoco/hopper/medium-v0: no such dataset in the local Minari folder {tmp_path / 'minari'}")
    assert "`minari download mujoco/hopper/medium-v0`" in msg and "`minari list remote`" in msg and "\n" not in msg

    with pytest.raises(DatasetError, match=r"^minari:test/hopper/tiny-v0: recorded in Hopper-v5, but data.env="
                                           r"walker2d evaluates in Walker2d-v5; set data.env=hopper$"):
        load_transitions(OfflineDataConfig(source="minari", minari_id="test/hopper/tiny-v0", env="walker2d"))

    obs_space = gym.spaces.Dict({"achieved": gym.spaces.Box(-1, 1, (2,)), "observation": gym.spaces.Box(-1, 1, (3,))})
    rng = np.random.default_rng(1)
    ep = {"observations": {"achieved": rng.uniform(-1, 1, (6, 2)), "observation": rng.uniform(-1, 1, (6, 3))},
          "actions": rng.uniform(-1, 1, (5, 2)), "rewards": np.ones(5), "terminations": np.zeros(5, bool),
          "truncations": np.eye(5, dtype=bool)[4]}
    write_minari("test/dict/tiny-v0", [ep], observation_space=obs_space, action_space=gym.spaces.Box(-1, 1, (2,)))
    with pytest.raises(DatasetError, match=r"^minari:test/dict/tiny-v0: the observation space is Dict with keys "
                                           r"achieved, observation; alignreg needs flat Box observations"):
        read_minari("test/dict/tiny-v0")
