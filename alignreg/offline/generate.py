"""D4RL-format datasets generated locally from gymnasium MuJoCo v5 environments.

D4RL's own package and downloads need mujoco-py and the internet; alignreg instead trains its own
behaviour policies with online TD3 (:func:`train_behaviour`, run once by the maintainers; the small
actor checkpoints ship in ``alignreg/offline/policies/<env>.pt``) and rolls them out to write
D4RL-format HDF5 files (:func:`generate_dataset`). Generation is deterministic given the seed.

Levels (mirroring D4RL's recipes, with alignreg's policies):

* ``random``        uniform random actions.
* ``medium``        the ``medium`` snapshot (an online-TD3 actor stopped at roughly 1/3-1/2 of the
                    expert's return), Gaussian action noise ``medium_noise``.
* ``expert``        the best snapshot of the online run, noise ``expert_noise``.
* ``medium-expert`` ``medium`` followed by ``expert`` (both full size), as in D4RL.
* ``medium-replay`` a coarse stand-in for D4RL's replay buffer (the ``replay_plan`` of the shipped
                    policies; ``size`` is ignored): 10k uniform-random steps (online TD3's warm-up),
                    then rollouts, with TD3's exploration noise (0.1), of ``max_replay`` = 4 snapshots
                    taken every ``stride``-th 10k-step snapshot from step 10k up to ``medium``; each is
                    rolled out for the whole stretch until the next chosen snapshot (``stride`` x 10k
                    steps; the last until ``medium``, possibly fewer). The first, ``replay_10000``, was
                    saved at the end of the warm-up, before any update: it is the untrained initial
                    actor. Shipped: hopper 10k random + snapshots 10k/60k/110k/160k x 50k = 210k;
                    halfcheetah 10k + 10k/30k/50k/70k x 20k = 90k; walker2d 10k + 10k/80k/150k x 70k +
                    220k x 40k = 260k transitions. Deviation: D4RL's medium-replay is the whole replay
                    buffer up to ``medium`` (every step collected by the policy of that moment); here 4
                    policies each stand in for a whole stretch of training (shipping the buffer would
                    mean shipping data).

File layout (D4RL's): ``observations, actions, rewards, next_observations, terminals, timeouts``
(+ ``metadata`` attributes). ``timeouts`` marks time-limit truncation (1000 steps) and the last
step of the file if it cuts an episode.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from alignreg.offline.networks import Actor

ENV_IDS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
LEVELS = ("random", "medium", "medium-replay", "medium-expert", "expert")
POLICY_DIR = Path(__file__).parent / "policies"
BEHAVIOUR_HIDDEN = [256, 256]
EXPL_NOISE = 0.1  # TD3 exploration noise (online training and medium-replay rollouts)


def make_env(env: str):
    import gymnasium as gym

    if env not in ENV_IDS:
        from alignreg.config import ConfigError

        raise ConfigError(f"env: unknown environment {env!r}; valid choices: {', '.join(ENV_IDS)}")
    return gym.make(ENV_IDS[env])


# ------------------------------------------------------------------------------------------------
# Behaviour policies: online TD3 (maintainer tool; results ship as policies/<env>.pt)
# ------------------------------------------------------------------------------------------------


def rollout_returns(env, actor: Actor | None, episodes: int, seed: int) -> list[float]:
    """Undiscounted returns of ``actor`` (deterministic) or of uniform random actions (None)."""
    rng = np.random.default_rng(seed)
    out = []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        total, done = 0.0, False
        while not done:
            if actor is None:
                a = rng.uniform(-1, 1, env.action_space.shape[0])
            else:
                with torch.no_grad():
                    a = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
            obs, r, term, trunc, _ = env.step(a)
            total += float(r)
            done = term or trunc
        out.append(total)
    return out


def train_behaviour(env_name: str, steps: int, out_dir: str | Path, seed: int = 0, start_steps: int = 10_000,
                    snapshot_every: int = 10_000, eval_episodes: int = 5) -> None:
    """Online TD3 (Fujimoto et al. 2018 defaults) saving an actor snapshot + eval return every
    ``snapshot_every`` env steps into ``out_dir`` (``snap_<step>.pt``, ``log.jsonl``)."""
    from alignreg.offline.td3 import TD3Learner
    from alignreg.offline.batch import TransitionBatch

    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env, eval_env = make_env(env_name), make_env(env_name)
    S, A = env.observation_space.shape[0], env.action_space.shape[0]
    learner = TD3Learner(S, A, actor_hidden=BEHAVIOUR_HIDDEN, normalize_q=False)
    rng = np.random.default_rng(seed)
    buf = {k: np.zeros((steps, d), np.float32) for k, d in (("s", S), ("a", A), ("r", 1), ("s2", S), ("nd", 1))}
    obs, _ = env.reset(seed=seed)
    t0 = time.time()
    for t in range(steps):
        if t < start_steps:
            a = rng.uniform(-1, 1, A)
        else:
            with torch.no_grad():
                a = learner.actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
            a = np.clip(a + rng.normal(0, EXPL_NOISE, A), -1, 1)
        obs2, r, term, trunc, _ = env.step(a)
        for k, v in (("s", obs), ("a", a), ("r", r), ("s2", obs2), ("nd", 1.0 - float(term))):
            buf[k][t] = v
        obs = obs2
        if term or trunc:
            obs, _ = env.reset()
        if t >= start_steps:
            idx = torch.from_numpy(rng.integers(0, t + 1, 256))
            b = TransitionBatch(*(torch.from_numpy(buf[k])[idx] for k in ("s", "a", "r", "s2", "nd")))
            learner.train_step(b)
        if (t + 1) % snapshot_every == 0:
            learner.actor.eval()
            rets = rollout_returns(eval_env, learner.actor, eval_episodes, seed=10_000 + t)
            torch.save(learner.actor.state_dict(), out / f"snap_{t + 1}.pt")
            rec = {"step": t + 1, "return_mean": float(np.mean(rets)), "return_std": float(np.std(rets)),
                   "time_s": round(time.time() - t0, 1)}
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(env_name, rec, flush=True)


def package_policies(env_name: str, run_dir: str | Path, medium_frac: float = 0.4, max_replay: int = 4) -> dict:
    """Pick ``expert`` (best eval return) and ``medium`` (first snapshot reaching ``medium_frac`` of the
    expert's return above random) from an online run; write ``policies/<env>.pt`` (fp16 weights).
    The medium-replay plan keeps ``max_replay`` snapshots (every ``stride``-th from step 10k, the first
    being the untrained actor saved at the end of the warm-up), each rolled out until the next one."""
    run = Path(run_dir)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    expert = max(log, key=lambda r: r["return_mean"])
    lo = log[0]["return_mean"]
    target = lo + medium_frac * (expert["return_mean"] - lo)
    medium = next(r for r in log if r["return_mean"] >= target and r["step"] > 10_000)
    trained = [r["step"] for r in log if 10_000 <= r["step"] < medium["step"]]  # policies that collected data
    stride = max(1, -(-len(trained) // max_replay))
    chosen = trained[::stride]
    plan = [["random", 10_000]]
    for i, st in enumerate(chosen):
        end = chosen[i + 1] if i + 1 < len(chosen) else medium["step"]
        plan.append([f"replay_{st}", end - st])

    def load(step):
        return {k: v.half() for k, v in torch.load(run / f"snap_{step}.pt").items()}

    snaps = {"medium": load(medium["step"]), "expert": load(expert["step"])}
    snaps.update({f"replay_{st}": load(st) for st in chosen})
    env = make_env(env_name)
    blob = {"format": 1, "env": env_name, "env_id": ENV_IDS[env_name], "obs_dim": env.observation_space.shape[0],
            "act_dim": env.action_space.shape[0], "hidden": BEHAVIOUR_HIDDEN, "snapshots": snaps,
            "replay_plan": plan, "medium_step": medium["step"], "expert_step": expert["step"], "train_log": log}
    POLICY_DIR.mkdir(exist_ok=True)
    buf = io.BytesIO()
    torch.save(blob, buf)
    (POLICY_DIR / f"{env_name}.pt").write_bytes(buf.getvalue())
    return {"medium": medium, "expert": expert, "replay_plan": plan}


def _policy_file(env_name: str) -> Path:
    path = POLICY_DIR / f"{env_name}.pt"
    if not path.is_file():
        from alignreg.config import ConfigError

        raise ConfigError(f"no shipped behaviour policies for env {env_name!r} ({path} missing)")
    return path


def policy_version(env_name: str) -> str:
    """Short content hash of ``env_name``'s shipped behaviour policies. Generated files carry it (in
    their default name and as the ``behaviour_policies`` attribute), so data made with other policies
    (an older alignreg) is never mistaken for the current data."""
    return hashlib.sha256(_policy_file(env_name).read_bytes()).hexdigest()[:8]


def load_policy(env_name: str, snapshot: str) -> Actor:
    blob = torch.load(_policy_file(env_name), weights_only=True)
    actor = Actor(blob["obs_dim"], blob["act_dim"], blob["hidden"])
    actor.load_state_dict({k: v.float() for k, v in blob["snapshots"][snapshot].items()})
    return actor.eval()


def _policy_plan(env_name: str, level: str, size: int) -> list[tuple[str, int, float]]:
    """(policy, env steps, action noise std) segments of a level."""
    if level == "random":
        return [("random", size, 0.0)]
    if level in ("medium", "expert"):
        return [(level, size, EXPL_NOISE)]
    if level == "medium-expert":
        return [("medium", size, EXPL_NOISE), ("expert", size, EXPL_NOISE)]
    blob = torch.load(_policy_file(env_name), weights_only=True)
    return [(name, steps, 0.0 if name == "random" else EXPL_NOISE) for name, steps in blob["replay_plan"]]


def rollout_segment(env, actor: Actor | None, steps: int, noise: float, rng: np.random.Generator,
                    seed: int, progress=None) -> dict[str, np.ndarray]:
    """``steps`` env steps of ``actor`` (+ Gaussian noise) or uniform random actions, D4RL layout.
    ``progress(done, total)`` (optional) is called every 10 % of the steps."""
    S, A = env.observation_space.shape[0], env.action_space.shape[0]
    out = {"observations": np.zeros((steps, S), np.float32), "actions": np.zeros((steps, A), np.float32),
           "rewards": np.zeros(steps, np.float32), "next_observations": np.zeros((steps, S), np.float32),
           "terminals": np.zeros(steps, bool), "timeouts": np.zeros(steps, bool)}
    episode = 0
    obs, _ = env.reset(seed=seed)
    every = max(steps // 10, 1)
    for t in range(steps):
        if progress is not None and t and t % every == 0:
            progress(t, steps)
        if actor is None:
            a = rng.uniform(-1, 1, A)
        else:
            with torch.no_grad():
                a = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
            a = np.clip(a + rng.normal(0, noise, A), -1, 1) if noise > 0 else a
        obs2, r, term, trunc, _ = env.step(a)
        out["observations"][t], out["actions"][t], out["rewards"][t] = obs, a, r
        out["next_observations"][t], out["terminals"][t] = obs2, term
        out["timeouts"][t] = trunc and not term
        obs = obs2
        if term or trunc:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
    out["timeouts"][-1] |= not out["terminals"][-1]  # the file cuts the last episode: D4RL-style final step
    return out


def generate_dataset(env_name: str, level: str, size: int, seed: int, out_path: str | Path, log=print) -> Path:
    """Write a D4RL-format HDF5 file for ``<env>-<level>`` (deterministic given ``seed``); progress goes to
    ``log`` (None: silent)."""
    import h5py

    from alignreg.config import ConfigError

    if level not in LEVELS:
        raise ConfigError(f"level: unknown level {level!r}; valid choices: {', '.join(LEVELS)}")
    env = make_env(env_name)
    rng = np.random.default_rng(seed)
    parts, plan, t0 = [], _policy_plan(env_name, level, size), time.perf_counter()
    for i, (policy, steps, noise) in enumerate(plan):
        actor = None if policy == "random" else load_policy(env_name, policy)

        def progress(done, total, i=i, policy=policy):
            log(f"  {env_name}-{level}: segment {i + 1}/{len(plan)} ({policy}) {done}/{total} env steps, "
                f"{time.perf_counter() - t0:.0f} s")

        parts.append(rollout_segment(env, actor, steps, noise, rng, seed=seed * 1_000_003 + i * 100_000,
                                     progress=progress if log is not None else None))
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # unique: concurrent generators never share a temp file
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in data.items():
                f.create_dataset(k, data=v)
            f.attrs.update({"generator": "alignreg", "env": env_name, "env_id": ENV_IDS[env_name], "level": level,
                            "seed": seed, "size": size, "reference_set": "alignreg-v5",
                            "behaviour_policies": policy_version(env_name)})
    except BaseException:  # a full disk or Ctrl-C mid-write: no partial file left behind
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def measure_references(envs: list[str], episodes: int = 20, seed: int = 12345) -> dict:
    """alignreg-v5 reference returns: uniform random actions and the expert snapshot (deterministic),
    mean over ``episodes`` (env seeds seed..seed+episodes-1); written to reference_scores.json."""
    from alignreg.offline.scores import REFERENCE_FILE

    out = {"note": "alignreg-v5 references: gymnasium MuJoCo v5, random = uniform random actions, "
                   "expert = alignreg's expert behaviour policy (deterministic); NOT D4RL's references",
           "episodes": episodes, "seed": seed, "envs": {}}
    for e in envs:
        env = make_env(e)
        blob = torch.load(POLICY_DIR / f"{e}.pt", weights_only=True)
        rnd = rollout_returns(env, None, episodes, seed)
        exp = rollout_returns(env, load_policy(e, "expert"), episodes, seed)
        med = rollout_returns(env, load_policy(e, "medium"), episodes, seed)
        out["envs"][e] = {"random": float(np.mean(rnd)), "expert": float(np.mean(exp)),
                          "random_std": float(np.std(rnd)), "expert_std": float(np.std(exp)),
                          "medium_policy": float(np.mean(med)), "expert_train_steps": blob["expert_step"],
                          "medium_train_steps": blob["medium_step"]}
    REFERENCE_FILE.write_text(json.dumps(out, indent=1) + "\n")
    return out
