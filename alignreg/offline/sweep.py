"""Seeds x datasets x algorithms as Ray tasks (one CPU task per run), then a results table and plots.

Each run is one ``alignreg offline`` config: ``<config_dir>/<algo>_<env>_<level>.yaml`` (falling back
to ``<algo>_<env>_medium.yaml`` with ``data.level`` overridden) plus the sweep's ``overrides``,
``trainer.seed`` and an output directory ``<out_dir>/<algo>/<env>-<level>/seed<seed>``. Runs whose
``results.json`` exists are not repeated when their ``config.yaml`` has the same settings (run-time
keys such as ``trainer.threads`` aside); a finished run with other settings (changed ``overrides``)
is an error naming the keys, never reused silently. Tasks return their results to the driver, which writes
``results.json`` (all runs), ``results.md`` / ``results.csv`` (final normalised score, mean +- std
over seeds) and ``curves_<env>-<level>.png`` (mean +- std over seeds per algorithm).

A run that fails does not stop the others: the summary is written from the finished runs, the
failure's whole error goes to the run's ``error.txt``, and the sweep raises RunError listing the
failed runs. ``ray_address: local`` starts a local Ray with ``num_cpus``; any other value (``auto``,
``ray://head:10001``) joins that cluster (``launch/`` has the cluster scripts). ``backend: serial``
runs the same tasks in-process without Ray.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from alignreg.config import ConfigError, RunError, _check


@dataclass
class SweepConfig:
    name: str = "sweep"  # sweep name ({name} in out_dir)
    algos: list[str] = field(default_factory=lambda: ["bc", "td3bc", "prdc", "a2pr"])  # config-file prefixes
    envs: list[str] = field(default_factory=lambda: ["hopper", "halfcheetah", "walker2d"])  # data.env values
    levels: list[str] = field(default_factory=lambda: ["medium", "medium-replay"])  # data.level values
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # trainer.seed values
    config_dir: str = "configs/offline"  # where <algo>_<env>_<level>.yaml live
    overrides: list[str] = field(default_factory=list)  # key=value overrides for every run, e.g. trainer.steps=20000
    out_dir: str = "runs/sweep/{name}"  # sweep output directory
    backend: Literal["ray", "serial"] = "ray"  # ray: one Ray task per run; serial: in-process loop
    ray_address: str = "local"  # local: start Ray here with num_cpus; else a cluster address (auto, ray://...)
    num_cpus: int = 2  # local Ray only: CPUs Ray may use
    cpus_per_task: float = 1.0  # CPUs reserved per run (torch threads = max(1, int(cpus_per_task)))
    gpus_per_task: float = 0.0  # ray: GPUs reserved per run (0.25: four runs share one); Ray hides the GPUs from a run that reserves none, so trainer.device=auto trains it on the CPU

    def validate(self, path: str) -> None:
        _check(bool(self.algos and self.envs and self.levels and self.seeds), f"{path}: algos, envs, levels and seeds must be non-empty")
        _check(self.cpus_per_task > 0, f"{path}.cpus_per_task must be > 0")
        _check(self.gpus_per_task >= 0, f"{path}.gpus_per_task must be >= 0")
        _check(self.gpus_per_task == 0 or self.backend == "ray",
               f"{path}.gpus_per_task: only the ray backend reserves GPUs (backend: serial runs each job in this process, "
               "on trainer.device); set backend: ray or gpus_per_task: 0")
        from alignreg.offline.config import check_placeholders

        check_placeholders(self.out_dir, f"{path}.out_dir", name=self.name)


def run_config(cfg: SweepConfig, algo: str, env: str, level: str):
    """The OfflineConfig of one run (seed and out_dir set by ``run_one``)."""
    from alignreg.config import load_config
    from alignreg.offline.config import OfflineConfig

    base = Path(cfg.config_dir) / f"{algo}_{env}_{level}.yaml"
    extra = []
    if not base.is_file():
        base = Path(cfg.config_dir) / f"{algo}_{env}_medium.yaml"
        extra = [f"data.level={level}"]
    if not base.is_file():
        raise ConfigError(f"sweep: no config {algo}_{env}_{level}.yaml or {algo}_{env}_medium.yaml in {cfg.config_dir}")
    oc = load_config(OfflineConfig, base, extra + list(cfg.overrides))
    oc.name = f"{algo}_{env}_{level}"
    return oc


# keys a finished run may differ in and still be reused: they do not change its results
_FREE_ON_REUSE = ("trainer.progress", "trainer.threads", "trainer.out_dir", "trainer.resume", "trainer.log_every",
                  "trainer.checkpoint_every", "trainer.device")


def _check_finished(oc, out: Path) -> None:
    """A finished run is reused only when it was trained with ``oc``'s settings."""
    from alignreg.config import describe_diff, load_yaml, stored_config_diff
    from alignreg.offline.config import OfflineConfig

    fix = "delete that directory to run it again, or set another out_dir for the sweep"
    if not (out / "config.yaml").is_file():
        raise ConfigError(f"{out} holds results.json but no config.yaml (its settings cannot be checked): {fix}")
    diffs = stored_config_diff(OfflineConfig, load_yaml(out / "config.yaml"), oc, ignore=_FREE_ON_REUSE)
    if diffs:
        raise ConfigError(f"{out} holds a finished run with other settings ({describe_diff(diffs)}): {fix}")


def run_one(oc, seed: int, out_dir: str, threads: int) -> dict:
    from alignreg.offline.train import atomic_write_text, train

    out = Path(out_dir)
    oc.trainer.seed, oc.trainer.progress, oc.trainer.threads = seed, False, threads
    if (out / "results.json").is_file():
        _check_finished(oc, out)
        try:
            return json.loads((out / "results.json").read_text())
        except ValueError:  # cut off by a kill while written in place: train() resumes and writes it again
            pass
    res = train(oc, out, log=lambda *a: None, handle_signals=False)  # a Ray task: signals are Ray's
    res["algo"] = oc.name.split("_")[0]
    atomic_write_text(out / "results.json", json.dumps(res, indent=1))
    return res


def check_task_fits(cfg: SweepConfig, nodes: list[dict[str, float]]) -> None:
    """One run's reservation (``cpus_per_task``, ``gpus_per_task``) fits some node of the Ray cluster, else a
    one-line ConfigError: Ray would keep such tasks pending without an error."""
    from alignreg.orchestration.ray_groups import fits_a_node, fmt_resources

    need = {"CPU": cfg.cpus_per_task, **({"GPU": cfg.gpus_per_task} if cfg.gpus_per_task > 0 else {})}
    if not fits_a_node(need, nodes):
        best = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in need}
        raise ConfigError(f"sweep: one run reserves {fmt_resources(need)} but no node of the "
                          f"Ray cluster has that (the most on one node: {fmt_resources(best)}); "
                          "lower cpus_per_task / gpus_per_task, or raise num_cpus (ray_address: local) or add a node")


def run_sweep(cfg: SweepConfig) -> list[dict]:
    out = Path(cfg.out_dir.format(name=cfg.name))
    jobs = []
    for env in cfg.envs:
        for level in cfg.levels:
            for algo in cfg.algos:
                oc = run_config(cfg, algo, env, level)  # validates every config before anything starts
                for seed in cfg.seeds:
                    jobs.append((oc, seed, str(out / algo / f"{env}-{level}" / f"seed{seed}")))
    threads = max(1, int(cfg.cpus_per_task))
    print(f"sweep {cfg.name}: {len(jobs)} runs -> {out}")
    results, failed = [], []

    def finished(job, get) -> None:  # a failed run does not stop the others; it is reported at the end
        try:
            r = get()
        except Exception as e:  # noqa: BLE001
            failed.append(_record_failure(job, e))
            print(f"  [{len(results) + len(failed)}/{len(jobs)}] {failed[-1]}", flush=True)
            return
        results.append(r)
        print(f"  [{len(results) + len(failed)}/{len(jobs)}] {r['algo']} {r['env']}-{r['level']} seed {r['seed']}: "
              f"score {r['final_score']:.1f}", flush=True)

    if cfg.backend == "serial":
        for job in jobs:
            finished(job, lambda job=job: run_one(job[0], job[1], job[2], threads))
    else:
        import ray

        if cfg.ray_address == "local":
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)  # always a new local instance
        else:
            from alignreg.orchestration.ray_groups import check_reachable

            check_reachable(cfg.ray_address, key="ray_address", local="ray_address=local")  # seconds, where ray.init would retry for minutes
            ray.init(address=cfg.ray_address)
        try:  # a run no node can hold would wait for it forever
            check_task_fits(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        except ConfigError:
            ray.shutdown()
            raise
        task = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task)(run_one)
        refs = {task.remote(oc, s, d, threads): (oc, s, d) for oc, s, d in jobs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            finished(refs[done[0]], lambda ref=done[0]: ray.get(ref))
        ray.shutdown()
    if results:
        write_summary(results, out)
    if failed:
        raise RunError(f"{len(failed)} of {len(jobs)} runs failed: {'; '.join(failed)}. The other runs' results are in "
                       f"{out}; fix the cause and run the sweep again (finished runs are kept, failed ones resume from "
                       "their checkpoints)")
    return results


def _record_failure(job, e: BaseException) -> str:
    """One line for the sweep's report; the whole error (with a Ray task's remote traceback) goes to the
    run's ``error.txt``."""
    import traceback

    oc, seed, out_dir = job
    cause = getattr(e, "cause", None) or e  # a Ray task error carries the original exception
    detail = "".join(traceback.format_exception(type(e), e, e.__traceback__)) + (f"\n{e}" if cause is not e else "")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "error.txt").write_text(detail)
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    return f"{oc.name} seed {seed} FAILED ({type(cause).__name__}: {first}; {Path(out_dir) / 'error.txt'})"


SUMMARY_KEYS = ("algo", "env", "level", "seed", "final_score", "steps", "evals", "reference")  # what write_summary reads


def collect_results(out: Path) -> list[dict]:
    """Results of the runs finished so far under a sweep directory (for partial or interrupted sweeps);
    none is an error (a mistyped ``name`` or ``out_dir``)."""
    found = []
    for p in sorted(Path(out).glob("*/*/seed*/results.json")):
        try:
            res = json.loads(p.read_text())
        except (OSError, ValueError) as e:  # cut off by a kill (written in place by an older version)
            print(f"warning: {p} is unreadable ({type(e).__name__}: {e}); left out of the table. Run the sweep again: "
                  "it trains that run again (or resumes it from its checkpoint)", file=sys.stderr, flush=True)
            continue
        missing = [k for k in SUMMARY_KEYS if not (isinstance(res, dict) and k in res)]
        if missing:
            print(f"warning: {p} lacks {', '.join(missing)} (not a run's results, or written by an older version); "
                  "left out of the table. Delete that run's directory and run the sweep again to redo it",
                  file=sys.stderr, flush=True)
            continue
        found.append(res)
    if not found:
        raise ConfigError(f"no finished runs under {out} (no <algo>/<env>-<level>/seed<seed>/results.json); check "
                          "the sweep's name and out_dir")
    return found


def write_summary(results: list[dict], out: Path) -> str:
    """results.json, results.md/.csv (final score mean +- population std, ddof 0, over seeds) and curve plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignreg.offline.train import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    order = ["bc", "td3bc", "bc_mse", "prdc", "a2pr"]
    algos = sorted({r["algo"] for r in results}, key=lambda a: (order.index(a) if a in order else len(order), a))
    datasets = sorted({(r["env"], r["level"]) for r in results})
    cell = {}
    for r in results:
        cell.setdefault((r["env"], r["level"], r["algo"]), []).append(r)
    lines = ["| dataset | " + " | ".join(algos) + " |", "|---|" + "---|" * len(algos)]
    csv = ["dataset,algo,mean,std,n,steps"]
    for env, level in datasets:
        row = []
        for a in algos:
            rs = cell.get((env, level, a), [])
            if not rs:
                row.append("-")
                continue
            v = np.array([r["final_score"] for r in rs])
            n_max = len({r["seed"] for r in results})
            row.append(f"{v.mean():.1f} ± {v.std():.1f}" + (f" (n={len(v)})" if len(v) < n_max else ""))
            csv.append(f"{env}-{level},{a},{v.mean():.2f},{v.std():.2f},{len(v)},{rs[0]['steps']}")
        lines.append(f"| {env}-{level} | " + " | ".join(row) + " |")
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for a in algos:
            rs = cell.get((env, level, a), [])
            if not rs:
                continue
            n = min(len(r["evals"]) for r in rs)
            x = [e["step"] for e in rs[0]["evals"][:n]]
            y = np.array([[e["score_mean"] for e in r["evals"][:n]] for r in rs])
            ax.plot(x, y.mean(0), label=a)
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.15)
        ds = [r for r in results if (r["env"], r["level"]) == (env, level)]
        seeds = len({r["seed"] for r in ds})
        ax.set_title(f"{env}-{level} ({ds[0]['reference']}, up to {seeds} seeds)", fontsize=9)
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("normalised score")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"curves_{env}-{level}.png", dpi=100)
        plt.close(fig)
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", table)
    atomic_write_text(out / "results.csv", "\n".join(csv) + "\n")
    print(table)
    return table
