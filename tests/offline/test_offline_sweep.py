"""Sweep: seeds x datasets x algorithms -> results table (mean +- std) and curve plots."""
import json
import statistics

import pytest
import yaml

from alignreg.config import ConfigError, RunError, from_dict, to_dict
from alignreg.offline.cli import sweep_main
from alignreg.offline.sweep import SweepConfig, run_sweep


def write_configs(tmp_path):
    cdir = tmp_path / "configs"
    cdir.mkdir()
    for algo, regs, learner in (("td3bc", [{"name": "bc_mse"}], {}), ("bc", [{"name": "bc_mse"}], {"algo": "bc"})):
        cfg = {"data": {"source": "generated", "env": "hopper", "level": "random", "size": 2000,
                        "path": str(tmp_path / "hopper-random.hdf5"), "reference": "d4rl"},
               "learner": {"batch_size": 32, "actor_hidden": [16], "critic_hidden": [16], **learner},
               "regularizers": regs, "eval": {"every": 20, "episodes": 1},
               "trainer": {"steps": 40, "log_every": 20, "checkpoint_every": 0}}
        (cdir / f"{algo}_hopper_medium.yaml").write_text(yaml.safe_dump(cfg))
    return cdir


def test_serial_sweep_table_and_plots(tmp_path):
    cdir = write_configs(tmp_path)
    cfg = from_dict(SweepConfig, {"algos": ["bc", "td3bc"], "envs": ["hopper"], "levels": ["medium"], "seeds": [0, 1],
                                  "config_dir": str(cdir), "out_dir": str(tmp_path / "sw"), "backend": "serial",
                                  "overrides": ["data.level=random"]})
    res = run_sweep(cfg)
    assert len(res) == 4 and {r["algo"] for r in res} == {"bc", "td3bc"}
    table = (tmp_path / "sw" / "results.md").read_text()
    assert "| hopper-random |" in table and table.count("±") == 2
    # each cell: mean ± population std (ddof 0) of the final scores in the runs' own results.json
    scores = {a: [json.loads((tmp_path / "sw" / a / "hopper-medium" / f"seed{s}" / "results.json").read_text())["final_score"]
                  for s in (0, 1)] for a in ("bc", "td3bc")}
    assert all(len(set(v)) == 2 for v in scores.values())  # the seeds differ: a std of 0 would show
    stats = {a: (statistics.fmean(v), statistics.pstdev(v)) for a, v in scores.items()}
    assert f"| hopper-random | {stats['bc'][0]:.1f} ± {stats['bc'][1]:.1f} | {stats['td3bc'][0]:.1f} ± " \
           f"{stats['td3bc'][1]:.1f} |" in table, (table, stats)
    csv = (tmp_path / "sw" / "results.csv").read_text().splitlines()
    assert csv == ["dataset,algo,mean,std,n,steps"] + [f"hopper-random,{a},{m:.2f},{sd:.2f},2,40" for a, (m, sd) in stats.items()]
    assert (tmp_path / "sw" / "curves_hopper-random.png").stat().st_size > 1000
    assert (tmp_path / "sw" / "td3bc" / "hopper-medium" / "seed1" / "results.json").is_file()
    # finished runs are not repeated
    mtime = (tmp_path / "sw" / "bc" / "hopper-medium" / "seed0" / "results.json").stat().st_mtime
    run_sweep(from_dict(SweepConfig, {**to_dict(cfg), "cpus_per_task": 2}))  # run-time keys may differ
    run_sweep(from_dict(SweepConfig, {**to_dict(cfg), "overrides": ["data.level=random", "trainer.device=cpu"]}))
    assert (tmp_path / "sw" / "bc" / "hopper-medium" / "seed0" / "results.json").stat().st_mtime == mtime
    # ... but finished runs with other settings are never reused silently
    for extra, needle in (("trainer.steps=60", "trainer.steps 40 -> 60"), ("learner.alpha=5", r"learner.alpha 2.5 -> 5.0")):
        changed = from_dict(SweepConfig, {**to_dict(cfg), "overrides": ["data.level=random", extra]})
        with pytest.raises(RunError, match=r"4 of 4 runs failed: bc_hopper_medium seed 0 FAILED \(ConfigError: .*seed0 "
                                           rf"holds a finished run with other settings \({needle}\): delete that directory to run it again"):
            run_sweep(changed)
    assert (tmp_path / "sw" / "bc" / "hopper-medium" / "seed0" / "results.json").stat().st_mtime == mtime
    # the table can be rebuilt from finished runs alone (partial / interrupted sweeps)
    (tmp_path / "sw" / "results.md").unlink()
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"out_dir": str(tmp_path / "sw"), "backend": "serial"}))
    assert sweep_main([str(tmp_path / "s.yaml"), "--summary-only"]) == 0
    assert (tmp_path / "sw" / "results.md").read_text() == table


def test_summary_cells_are_mean_and_std_over_seeds(tmp_path):
    """results.md / results.csv from known final scores: mean ± population std (ddof 0) per (dataset, algo),
    ``(n=2)`` where a seed is missing, ``-`` where an algorithm has no run."""
    from alignreg.offline.sweep import write_summary

    scores = {("hopper", "medium", "bc"): [10.0, 20.0, 36.0], ("hopper", "medium", "td3bc"): [50.0, 44.5, 61.25],
              ("walker2d", "medium", "bc"): [-3.0, 7.0]}
    results = [{"env": env, "level": level, "algo": algo, "seed": seed, "final_score": v, "steps": 100,
                "reference": "d4rl", "evals": [{"step": 50, "score_mean": v / 2}, {"step": 100, "score_mean": v}]}
               for (env, level, algo), vs in scores.items() for seed, v in enumerate(vs)]
    table = write_summary(results, tmp_path)
    cells = {k: f"{statistics.fmean(v):.1f} ± {statistics.pstdev(v):.1f}" for k, v in scores.items()}
    assert cells[("hopper", "medium", "bc")] == "22.0 ± 10.7"
    assert table.splitlines()[2:] == [
        f"| hopper-medium | {cells[('hopper', 'medium', 'bc')]} | {cells[('hopper', 'medium', 'td3bc')]} |",
        f"| walker2d-medium | {cells[('walker2d', 'medium', 'bc')]} (n=2) | - |"]
    assert (tmp_path / "results.md").read_text() == table
    assert (tmp_path / "results.csv").read_text().splitlines()[1:] == [
        f"{env}-{level},{algo},{statistics.fmean(v):.2f},{statistics.pstdev(v):.2f},{len(v)},100"
        for (env, level, algo), v in scores.items()]


def test_sweep_config_errors(tmp_path, capsys):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"algos": ["nope"], "config_dir": str(tmp_path), "backend": "serial"}))
    assert sweep_main([str(p)]) == 2
    assert "no config nope_hopper_medium.yaml" in capsys.readouterr().err
    p.write_text(yaml.safe_dump({"backend": "dask"}))
    assert sweep_main([str(p)]) == 2
    assert "valid choices: 'ray', 'serial'" in capsys.readouterr().err
    p.write_text(yaml.safe_dump({"backend": "serial", "gpus_per_task": 0.5}))
    assert sweep_main([str(p)]) == 2
    assert "gpus_per_task: only the ray backend reserves GPUs" in capsys.readouterr().err
    p.write_text(yaml.safe_dump({"out_dir": "runs/{nme}"}))  # a KeyError traceback before
    assert sweep_main([str(p)]) == 2
    assert "config.out_dir: bad placeholder in 'runs/{nme}' (KeyError: 'nme'); valid placeholders: {name}" in capsys.readouterr().err
    # --summary-only with nothing finished (e.g. a mistyped name=) is an error, not an empty table
    p.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "sw" / "{name}")}))
    assert sweep_main([str(p), "name=typo", "--summary-only"]) == 2
    assert f"no finished runs under {tmp_path / 'sw' / 'typo'}" in capsys.readouterr().err
    assert not (tmp_path / "sw" / "typo").exists()


def test_summary_leaves_out_unreadable_run_results_with_a_warning(tmp_path, capsys):
    """--summary-only over a sweep where one run's results.json was cut off by a kill and another's
    lacks the summary's keys: a table of the readable runs and a warning naming each file left out
    (a json traceback before)."""
    runs = tmp_path / "sw" / "bc" / "hopper-medium"
    good = {"env": "hopper", "level": "medium", "algo": "bc", "seed": 0, "final_score": 12.5, "steps": 100,
            "reference": "d4rl", "evals": [{"step": 100, "score_mean": 12.5}]}
    for seed, text in ((0, json.dumps(good)), (1, json.dumps(good)[:40]), (2, json.dumps({"seed": 2}))):
        (runs / f"seed{seed}").mkdir(parents=True)
        (runs / f"seed{seed}" / "results.json").write_text(text)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"out_dir": str(tmp_path / "sw"), "backend": "serial"}))
    assert sweep_main([str(tmp_path / "s.yaml"), "--summary-only"]) == 0
    err = capsys.readouterr().err
    assert f"{runs / 'seed1' / 'results.json'} is unreadable" in err
    assert f"{runs / 'seed2' / 'results.json'} lacks algo, env, level, final_score" in err
    assert "| hopper-medium | 12.5 ± 0.0 |" in (tmp_path / "sw" / "results.md").read_text()
    assert [r["seed"] for r in json.loads((tmp_path / "sw" / "results.json").read_text())] == [0]


def _damage(tmp_path, seed):
    """A run whose checkpoint was damaged: it fails at once (CheckpointError), the others go on."""
    run = tmp_path / "sw" / "td3bc" / "hopper-medium" / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"not a torch file")
    return run


@pytest.mark.parametrize("backend", ["serial", pytest.param("ray", marks=pytest.mark.slow)])
def test_sweep_finishes_the_other_runs_when_one_fails(tmp_path, backend):
    if backend == "ray":
        pytest.importorskip("ray")  # the ray extra; installed in CI (alignreg[ray])
    cdir = write_configs(tmp_path)
    bad = _damage(tmp_path, 2)
    cfg = from_dict(SweepConfig, {"algos": ["td3bc"], "envs": ["hopper"], "levels": ["medium"], "seeds": [0, 1, 2],
                                  "config_dir": str(cdir), "out_dir": str(tmp_path / "sw"), "backend": backend,
                                  "num_cpus": 2, "overrides": ["data.level=random"]})
    with pytest.raises(RunError, match=r"1 of 3 runs failed: td3bc_hopper_medium seed 2 FAILED \(CheckpointError: .*"
                                       r"checkpoint.pt is not a readable torch file .*error.txt\)\. The other runs'"):
        run_sweep(cfg)
    assert "CheckpointError" in (bad / "error.txt").read_text()
    assert (bad / "checkpoint.pt").read_bytes() == b"not a torch file"  # left for the user to look at
    res = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert sorted(r["seed"] for r in res) == [0, 1] and {r["algo"] for r in res} == {"td3bc"}
    assert (tmp_path / "sw" / "results.md").read_text().count("±") == 1


def test_a_run_whose_results_a_kill_cut_off_is_finished_again(tmp_path):
    """A run's results.json was rewritten in place by the sweep: one cut off by a kill failed every later
    sweep (invalid JSON). The run is resumed (nothing left to train) and its results written again."""
    from alignreg.config import load_config
    from alignreg.offline.config import OfflineConfig
    from alignreg.offline.sweep import run_one

    oc = load_config(OfflineConfig, write_configs(tmp_path) / "bc_hopper_medium.yaml", ["trainer.steps=20"])
    oc.name = "bc_hopper_medium"
    first = run_one(oc, 0, str(tmp_path / "run"), 1)
    text = (tmp_path / "run" / "results.json").read_text()
    (tmp_path / "run" / "results.json").write_text(text[: len(text) // 2])
    again = run_one(oc, 0, str(tmp_path / "run"), 1)
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == again
    assert again["algo"] == "bc" and again["evals"] == first["evals"]


def test_a_run_no_ray_node_can_hold_is_an_error_not_a_wait():
    pytest.importorskip("ray")  # the ray extra; installed in CI (alignreg[ray])
    from alignreg.offline.sweep import check_task_fits

    nodes = [{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]
    check_task_fits(from_dict(SweepConfig, {"cpus_per_task": 8, "gpus_per_task": 0.5}), nodes)  # the second node
    with pytest.raises(ConfigError, match=r"one run reserves CPU=4, GPU=2 but no node of the Ray cluster has that "
                                          r"\(the most on one node: CPU=8, GPU=1\); lower cpus_per_task / gpus_per_task"):
        check_task_fits(from_dict(SweepConfig, {"cpus_per_task": 4, "gpus_per_task": 2}), nodes)


@pytest.mark.slow
def test_ray_sweep_refuses_a_gpu_reservation_on_a_cluster_without_gpus(tmp_path):
    pytest.importorskip("ray")  # the ray extra; installed in CI (alignreg[ray])
    import ray

    cdir = write_configs(tmp_path)
    cfg = from_dict(SweepConfig, {"algos": ["td3bc"], "envs": ["hopper"], "levels": ["medium"], "seeds": [0],
                                  "config_dir": str(cdir), "out_dir": str(tmp_path / "sw"), "backend": "ray",
                                  "num_cpus": 2, "gpus_per_task": 1, "overrides": ["data.level=random"]})
    with pytest.raises(ConfigError, match=r"one run reserves CPU=1, GPU=1 but no node .*GPU=0"):
        run_sweep(cfg)
    assert not ray.is_initialized() and not (tmp_path / "sw" / "td3bc").exists()
