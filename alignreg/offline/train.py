"""The offline training loop: data -> TD3 learner with one actor penalty -> evals, logs, checkpoints.

Outputs in ``trainer.out_dir``: ``config.yaml``, ``metrics.jsonl`` (training metrics averaged over
``log_every`` iterations), ``evals.jsonl`` (return and normalised score), ``checkpoint.pt`` (atomic,
resumable: learner + penalty state, optimizers, RNG states), ``results.json`` and ``curve.png``.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from alignreg.checkpoint import read_state, save_durable
from alignreg.config import ConfigError, describe_diff, save_config, stored_config_diff, to_dict
from alignreg.logging import truncate_jsonl
from alignreg.offline.batch import OfflineSetup
from alignreg.offline.config import OfflineConfig, OfflineDataConfig
from alignreg.offline.datasets import OfflineData, qlearning_dataset, read_d4rl_hdf5, read_minari
from alignreg.runlock import RunLock
from alignreg.stop import GracefulStop


def generated_path(d: OfflineDataConfig) -> Path:
    if d.path:
        return Path(d.path).expanduser()
    from alignreg.offline.generate import policy_version

    return Path(d.cache_dir).expanduser() / f"{d.env}-{d.level}-v5-p{policy_version(d.env)}-s{d.seed}-n{d.size}.hdf5"


def check_generated_file(path: Path, env: str) -> None:
    """A generated file must come from the behaviour policies shipped now: its normalised scores use
    the references measured with them."""
    import h5py

    from alignreg.offline.generate import policy_version

    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as e:
        raise ConfigError(f"data.path: cannot read {path} as HDF5 ({e}); delete it to have it generated again") from e
    if attrs.get("generator") != "alignreg":
        return  # a file alignreg did not write: read as D4RL data
    have, want = attrs.get("behaviour_policies", "an older alignreg's"), policy_version(env)
    if have != want:
        raise ConfigError(f"data.path: {path} was generated with {have} behaviour policies, but this alignreg "
                          f"ships {want} (and measured its reference scores with them); delete the file to "
                          f"have it generated again, or set data.path to a new file")


def load_transitions(d: OfflineDataConfig, log=print) -> tuple[dict, str]:
    """Transitions for ``d`` and the reference set for normalised scores."""
    if d.source == "minari":
        return read_minari(d.minari_id), "d4rl" if d.reference == "auto" else d.reference
    if d.source == "generated":
        path = generated_path(d)
        if not path.is_file():
            from alignreg.offline.generate import generate_dataset

            log(f"generating {d.env}-{d.level} ({d.size} steps/policy, seed {d.seed}) -> {path}")
            generate_dataset(d.env, d.level, d.size, d.seed, path, log=log)
        else:
            check_generated_file(path, d.env)
        ref = "alignreg-v5"
    else:
        path, ref = Path(d.path).expanduser(), "d4rl"
    return qlearning_dataset(read_d4rl_hdf5(path)), ref if d.reference == "auto" else d.reference


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_durable(obj, tmp)
    except OSError:
        tmp.unlink(missing_ok=True)  # the previous checkpoint stays as it was
        raise
    os.replace(tmp, path)


def plot_curve(evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = [e["step"] for e in evals]
    y, s = np.array([e["score_mean"] for e in evals]), np.array([e["score_std"] for e in evals])
    ax.plot(x, y)
    ax.fill_between(x, y - s, y + s, alpha=0.2)
    ax.set_xlabel("gradient steps")
    ax.set_ylabel("normalised score")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_learner(cfg: OfflineConfig, state_dim: int, action_dim: int):
    from alignreg.offline.td3 import TD3Learner
    from alignreg.regularizers import build_regularizers

    L = cfg.learner
    terms = build_regularizers(cfg.regularizers, path="regularizers", hooks=("actor_penalty",))
    return TD3Learner(state_dim, action_dim, actor_hidden=L.actor_hidden, critic_hidden=L.critic_hidden,
                      actor_lr=L.actor_lr, critic_lr=L.critic_lr, discount=L.discount, tau=L.tau,
                      policy_noise=L.policy_noise, noise_clip=L.noise_clip, policy_freq=L.policy_freq,
                      alpha=L.alpha, algo=L.algo, penalties=terms)


# keys a resume may change: they do not change what is trained
_FREE_ON_RESUME = ("name", "trainer.steps", "trainer.out_dir", "trainer.resume", "trainer.threads", "trainer.progress",
                   "trainer.log_every", "trainer.checkpoint_every", "eval.", "data.path")


def _check_resume(cfg: OfflineConfig, state: dict, ckpt: Path) -> None:
    """A resume continues the run in the checkpoint: same data, algorithm, networks and seed."""
    done = int(state["learner"]["it"])
    if done > cfg.trainer.steps:
        raise ConfigError(f"trainer.steps={cfg.trainer.steps} is below the iteration of {ckpt} ({done}); set "
                          f"trainer.steps >= {done}, or start a new run in another trainer.out_dir")
    if "config" not in state:
        return
    diffs = stored_config_diff(OfflineConfig, state["config"], cfg, ignore=_FREE_ON_RESUME)
    if diffs:
        raise ConfigError(f"{ckpt} was trained with different settings: {describe_diff(diffs)}. A resume continues "
                          "that run; use its values (config.yaml next to it) or start a new run in another "
                          "trainer.out_dir")


def data_fingerprint(transitions: dict) -> str:
    """SHA-256 of the transitions' arrays (keys sorted): a resume refuses data other than the run's."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(transitions):
        a = np.ascontiguousarray(transitions[k])
        h.update(f"{k}{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def train(cfg: OfflineConfig, out_dir: str | Path, log=print, handle_signals: bool = True) -> dict:
    """Train (or resume) one offline run into ``out_dir``; returns the results (also ``results.json``).

    ``handle_signals``: SIGTERM or a first Ctrl-C finishes the current iteration, writes the checkpoint and
    returns ``{"stopped": <signal>, "steps": ...}`` without a final evaluation (``alignreg.stop``); sweeps
    running as Ray tasks pass False and leave the signals to Ray. One process per ``out_dir``
    (:class:`~alignreg.runlock.RunLock`)."""
    with RunLock(out_dir, key="trainer.out_dir"):
        return _train(cfg, out_dir, log, handle_signals)


def _train(cfg: OfflineConfig, out_dir: str | Path, log, handle_signals: bool) -> dict:
    T = cfg.trainer
    torch.set_num_threads(T.threads)
    out = Path(out_dir)
    ckpt = out / "checkpoint.pt"
    state = None
    if T.resume and ckpt.is_file():
        state = read_state(ckpt, fix="restore it from a copy to resume; or move it away (to keep it) and run "
                                     "again to start over from step 0, or set another trainer.out_dir")
        _check_resume(cfg, state, ckpt)
    elif not T.resume and (ckpt.is_file() or (out / "results.json").is_file()):
        raise ConfigError(f"trainer.resume=false: {str(out)!r} already holds a run (checkpoint.pt / results.json); "
                          "pick another trainer.out_dir for a new run (or delete that directory), or resume it "
                          "with trainer.resume=true")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    transitions, ref = load_transitions(cfg.data, log)
    fingerprint = data_fingerprint(transitions)
    if state is not None and state.get("data_fingerprint", fingerprint) != fingerprint:  # older checkpoints: none
        raise ConfigError(f"the dataset changed since {ckpt} was written (same data settings, other transitions: "
                          f"a file at data.path replaced or edited?); restore the data the run was trained on, or "
                          "start a new run in another trainer.out_dir")
    data = OfflineData(transitions, normalize=cfg.data.normalize_states)
    torch.manual_seed(T.seed)
    learner = build_learner(cfg, data.state_dim, data.action_dim)
    learner.setup(OfflineSetup(data.states_np, data.actions.numpy(), data.state_dim, data.action_dim, 1.0, T.seed))
    gen = torch.Generator().manual_seed(T.seed)
    evals: list[dict] = []
    resumed_acc: dict[str, list[float]] = {}
    if state is not None:
        learner.load_state_dict(state["learner"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        evals = state["evals"]
        resumed_acc = state.get("acc", {})
        for f in ("metrics.jsonl", "evals.jsonl"):
            truncate_jsonl(out / f, learner.it)
        log(f"resumed from {ckpt} at step {learner.it}")
    else:
        for f in ("metrics.jsonl", "evals.jsonl"):
            (out / f).unlink(missing_ok=True)
    from alignreg.offline.generate import make_env

    env = make_env(cfg.data.env)

    def do_eval(step: int) -> None:
        r = evaluate(learner.actor, env, cfg.eval.episodes, cfg.eval.seed + 1000 * len(evals), data.mean,
                     data.std, cfg.data.env, ref)
        r = {"step": step, **r}
        evals.append(r)
        with open(out / "evals.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")

    from alignreg.offline.evaluate import evaluate
    from tqdm import tqdm

    acc: dict[str, list[float]] = defaultdict(list, resumed_acc)

    def save() -> None:  # ``acc``: a resume between two metrics lines averages the same iterations
        _atomic_save({"learner": learner.state_dict(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                      "evals": evals, "acc": dict(acc), "config": to_dict(cfg), "data_fingerprint": fingerprint}, ckpt)

    t0, start = time.time(), learner.it
    bar = tqdm(range(learner.it, T.steps), initial=learner.it, total=T.steps, disable=not T.progress,
               desc=cfg.name or "offline", dynamic_ncols=True)
    with GracefulStop() if handle_signals else contextlib.nullcontext() as stop:
        for _ in bar:
            m = learner.train_step(data.sample(cfg.learner.batch_size, gen))
            step = learner.it
            for k, v in m.items():
                acc[k].append(v)
            if step % T.log_every == 0:
                rec = {"step": step, **{k: float(np.mean(v)) for k, v in acc.items()},
                       "steps_per_s": (step - start) / max(time.time() - t0, 1e-9)}
                acc.clear()
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if cfg.eval.every and step % cfg.eval.every == 0 and step < T.steps:
                do_eval(step)
                bar.set_postfix(score=f"{evals[-1]['score_mean']:.1f}")
            if stop is not None and stop.requested and step < T.steps:
                save()
                bar.close()
                log(f"{stop.name}: checkpoint written at iteration {step} of {T.steps} ({ckpt}); run the same "
                    "command again to resume")
                return {"name": cfg.name, "steps": step, "stopped": stop.name, "checkpoint": str(ckpt)}
            if T.checkpoint_every and step % T.checkpoint_every == 0 and step < T.steps:
                save()
    bar.close()
    wall = time.time() - t0
    if not evals or evals[-1]["step"] != learner.it:
        do_eval(learner.it)
    save()
    algo = "bc" if cfg.learner.algo == "bc" else cfg.regularizers[0].name
    results = {"name": cfg.name, "env": cfg.data.env, "level": cfg.data.level, "source": cfg.data.source,
               "algo": algo, "seed": T.seed, "steps": learner.it, "reference": ref,
               "final_score": evals[-1]["score_mean"], "final_return": evals[-1]["return_mean"],
               "best_score": max(e["score_mean"] for e in evals),
               "steps_per_s": (learner.it - start) / max(wall, 1e-9), "evals": evals}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_curve(evals, out / "curve.png", f"{cfg.name or algo}: {cfg.data.env}-{cfg.data.level} ({ref})")
    log(f"final normalised score ({ref}) {results['final_score']:.1f}, return {results['final_return']:.1f}; "
        f"results in {out / 'results.json'}")
    return results
