"""Offline datasets: D4RL HDF5 files, Minari datasets, in-memory arrays -> one transition format.

* :func:`read_d4rl_hdf5` reads a D4RL file with h5py (no ``d4rl`` import) and validates it like
  D4RL's ``get_dataset`` (required keys, matching lengths, rewards/terminals ``(N,)`` or ``(N, 1)``)
  plus real numeric dtypes, finite values and 0/1 ``terminals``/``timeouts``, raising
  :class:`DatasetError` with the file and key named.
* :func:`qlearning_dataset` reproduces ``d4rl.qlearning_dataset(env, dataset, terminate_on_end=False)``
  exactly: for ``i < N-1`` the transition ``(obs[i], act[i], rew[i], obs[i+1], terminals[i])`` is kept
  unless step ``i`` is a final timestep (``timeouts[i]``, or -- for files without ``timeouts`` --
  the 1000th step of an episode counted by D4RL's ``episode_step`` rule), which is skipped; the last
  row ``N-1`` is always dropped; ``next_observations`` in the file are *not* used (D4RL ignores them).
* :func:`read_minari` converts a local Minari dataset's episodes: every step, the episode's own next
  observation (also at a truncation), ``terminals`` = ``terminations``;
  :func:`from_arrays` validates user arrays.
* :class:`OfflineData` holds the transitions, the state normalisation ``(s - mean) / (std + 1e-3)``
  (TD3+BC / PRDC) and samples :class:`~alignreg.offline.batch.TransitionBatch` es.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from alignreg.config import ConfigError
from alignreg.offline.batch import TransitionBatch

REQUIRED = ("observations", "actions", "rewards", "terminals")


class DatasetError(ConfigError):
    """A dataset file or array that cannot be used; the message names the file/key and the problem."""


def _validate(raw: dict, where: str) -> dict:
    for k in REQUIRED:
        if k not in raw:
            raise DatasetError(f"{where}: missing dataset {k!r} (found: {', '.join(sorted(raw)) or 'nothing'})")
    obs, act = np.asarray(raw["observations"]), np.asarray(raw["actions"])
    if obs.ndim != 2 or act.ndim != 2:
        raise DatasetError(f"{where}: observations and actions must be 2-D [N, dim], got shapes {obs.shape} and {act.shape}")
    n = obs.shape[0]
    out = {"observations": obs, "actions": act}
    for k in ("rewards", "terminals", "timeouts"):
        if k not in raw:
            continue
        v = np.asarray(raw[k])
        if v.shape == (n, 1):
            v = v[:, 0]
        if v.shape != (n,):
            raise DatasetError(f"{where}: {k} must have shape ({n},) or ({n}, 1) to match observations, got {v.shape}")
        out[k] = v
    if act.shape[0] != n:
        raise DatasetError(f"{where}: actions has {act.shape[0]} rows but observations has {n}")
    if "next_observations" in raw:
        nxt = np.asarray(raw["next_observations"])
        if nxt.shape != obs.shape:
            raise DatasetError(f"{where}: next_observations shape {nxt.shape} != observations shape {obs.shape}")
        out["next_observations"] = nxt
    for k, v in out.items():
        if not (v.dtype == bool or np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating)):
            raise DatasetError(f"{where}: {k} must hold real numbers, got dtype {v.dtype}")
    for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        if k in out and not np.all(np.isfinite(out[k])):
            row = int(np.argwhere(~np.isfinite(out[k].reshape(n, -1)))[0, 0])
            raise DatasetError(f"{where}: {k} contains NaN or inf (first at row {row})")
    for k in ("terminals", "timeouts"):
        if k in out and not np.all((out[k] == 0) | (out[k] == 1)):
            row = int(np.argwhere((out[k] != 0) & (out[k] != 1))[0, 0])
            raise DatasetError(f"{where}: {k} must be 0/1 (or boolean), got {out[k][row].item()!r} at row {row}")
    if n < 2:
        raise DatasetError(f"{where}: needs at least 2 rows, got {n}")
    return out


def read_d4rl_hdf5(path: str | Path) -> dict:
    """Raw D4RL arrays from an HDF5 file (validated)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file does not exist")
    try:
        with h5py.File(path, "r") as f:
            raw = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    except OSError as e:
        raise DatasetError(f"{path}: not a readable HDF5 file ({e})") from None
    return _validate(raw, str(path))


def qlearning_dataset(raw: dict, terminate_on_end: bool = False, max_episode_steps: int = 1000,
                      where: str = "dataset") -> dict:
    """Exactly D4RL's ``qlearning_dataset`` on validated raw arrays (see module docstring); no
    transition left (every row a final timestep) is a :class:`DatasetError` naming ``where``."""
    n = raw["rewards"].shape[0]
    terminals = raw["terminals"].astype(bool)
    if "timeouts" in raw:
        final = raw["timeouts"][: n - 1].astype(bool)
    else:  # D4RL's episode_step counter (quirk kept: after a terminal it restarts at 1, not 0)
        final = np.zeros(n - 1, bool)
        step = 0
        for i in range(n - 1):
            final[i] = step == max_episode_steps - 1
            if final[i] and not terminate_on_end:
                step = 0
                continue
            step = (0 if (terminals[i] or final[i]) else step) + 1  # D4RL: reset, then += 1 on the kept row
    keep = np.ones(n - 1, bool) if terminate_on_end else ~final
    idx = np.nonzero(keep)[0]
    if idx.size == 0:
        raise DatasetError(f"{where}: no transitions left after dropping the time-out rows and the last row "
                           f"({n} rows, every one a final timestep); check its timeouts")
    return {
        "observations": raw["observations"][idx].astype(np.float32),
        "actions": raw["actions"][idx].astype(np.float32),
        "next_observations": raw["observations"][idx + 1].astype(np.float32),
        "rewards": raw["rewards"][idx].astype(np.float32),
        "terminals": terminals[idx],
    }


def from_arrays(observations, actions, rewards, next_observations, terminals, where: str = "arrays") -> dict:
    """Validated transitions from in-memory arrays (used as they are: no qlearning_dataset shift)."""
    raw = _validate(dict(observations=observations, actions=actions, rewards=rewards,
                         next_observations=next_observations, terminals=terminals), where)
    if "next_observations" not in raw:
        raise DatasetError(f"{where}: next_observations is required")
    return {k: raw[k].astype(bool if k == "terminals" else np.float32) for k in
            ("observations", "actions", "next_observations", "rewards", "terminals")}


def read_minari(dataset_id: str, env: str | None = None) -> dict:
    """Transitions of a local Minari dataset (``pip install 'alignreg[offline]'``; download it first with
    ``minari download <id>``): per episode ``(obs[t], act[t], rew[t], obs[t+1], terminations[t])`` for every
    step, so a truncated (time-limit) step keeps its true next observation and is not terminal. A missing
    dataset, non-Box (e.g. ``Dict``) spaces, or -- with ``env`` (``data.env``) -- data recorded in another
    environment than ``env``'s evaluation environment are a :class:`DatasetError`."""
    where = f"minari:{dataset_id}"
    try:
        import minari
    except ImportError:
        raise DatasetError("data.source=minari needs the 'minari' package: pip install 'minari[hdf5]'") from None
    try:
        ds = minari.load_dataset(dataset_id)
    except FileNotFoundError:
        from minari.storage import get_dataset_path

        raise DatasetError(f"{where}: no such dataset in the local Minari folder {get_dataset_path()} "
                           f"(MINARI_DATASETS_PATH chooses it); download it with `minari download {dataset_id}` "
                           f"(`minari list remote` lists the ids, `minari list local` the downloaded ones)") from None
    import gymnasium as gym

    for name, space in (("observation", ds.observation_space), ("action", ds.action_space)):
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            kind = f"Dict with keys {', '.join(space.spaces)}" if isinstance(space, gym.spaces.Dict) else str(space)
            fix = ("record the dataset with flat observations (e.g. gymnasium.wrappers.FlattenObservation)"
                   if name == "observation" else "the TD3 learners need continuous actions")
            raise DatasetError(f"{where}: the {name} space is {kind}; alignreg needs flat Box {name}s (1-D "
                               f"vectors): {fix}")
    if env is not None and ds.env_spec is not None:
        from alignreg.offline.generate import ENV_IDS

        want = gym.spec(ENV_IDS[env]) if env in ENV_IDS else None
        if want is not None and (ds.env_spec.namespace, ds.env_spec.name) != (want.namespace, want.name):
            match = [k for k, v in ENV_IDS.items() if gym.spec(v).name == ds.env_spec.name]
            fix = f"set data.env={match[0]}" if match else f"alignreg evaluates only in {', '.join(ENV_IDS.values())}"
            raise DatasetError(f"{where}: recorded in {ds.env_spec.id}, but data.env={env} evaluates in {want.id}; "
                               f"{fix}")
    parts: dict[str, list] = {k: [] for k in ("observations", "actions", "next_observations", "rewards", "terminals")}
    for ep in ds.iterate_episodes():
        obs = np.asarray(ep.observations)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions))
        parts["rewards"].append(np.asarray(ep.rewards))
        parts["terminals"].append(np.asarray(ep.terminations))
    if not parts["observations"]:
        raise DatasetError(f"{where}: the dataset holds no episodes")
    return from_arrays(**{k: np.concatenate(v) for k, v in parts.items()}, where=where)


class OfflineData:
    """Transitions + state normalisation, as torch tensors, with uniform batch sampling."""

    def __init__(self, t: dict, normalize: bool = True, eps: float = 1e-3):
        obs = t["observations"]
        self.mean = obs.mean(0, keepdims=True) if normalize else np.zeros((1, obs.shape[1]), np.float32)
        self.std = obs.std(0, keepdims=True) + eps if normalize else np.ones((1, obs.shape[1]), np.float32)
        self.states_np = ((obs - self.mean) / self.std).astype(np.float32)
        self.states = torch.from_numpy(self.states_np)
        self.next_states = torch.from_numpy(((t["next_observations"] - self.mean) / self.std).astype(np.float32))
        self.actions_np = t["actions"].astype(np.float32)
        self.actions = torch.from_numpy(self.actions_np)
        self.rewards = torch.from_numpy(t["rewards"].astype(np.float32)).reshape(-1, 1)
        self.not_done = 1.0 - torch.from_numpy(t["terminals"].astype(np.float32)).reshape(-1, 1)
        self.size, self.state_dim = self.states.shape
        self.action_dim = self.actions.shape[1]
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "OfflineData":
        """Keep the transition tensors on ``device`` (batches are gathered there). Rows are still drawn by
        the CPU generator that :meth:`sample` gets, so a seed picks the same rows on every device."""
        self.device = torch.device(device)
        for name in ("states", "next_states", "actions", "rewards", "not_done"):
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        return ((obs - self.mean) / self.std).astype(np.float32)

    def sample(self, batch_size: int, gen: torch.Generator) -> TransitionBatch:
        idx = torch.randint(0, self.size, (batch_size,), generator=gen)
        if self.device.type != "cpu":
            idx = idx.to(self.device, non_blocking=True)
        return TransitionBatch(self.states[idx], self.actions[idx], self.rewards[idx], self.next_states[idx],
                               self.not_done[idx], idx)
