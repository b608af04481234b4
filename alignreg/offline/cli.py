"""Command-line entry points of the offline side (wired into ``alignreg`` by ``alignreg/cli.py``).

* ``alignreg offline <config.yaml> [key=value ...]``                    train + evaluate one run
* ``alignreg data d4rl --env E --level L [--out F] [--seed S] [--size N]``  write a D4RL-format file
* ``alignreg sweep <sweep.yaml> [key=value ...]``                         seeds x datasets x algorithms on Ray

Each function takes the arguments after its subcommand and returns an exit code; configuration and
dataset problems print one line ``error: ...`` and return 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alignreg.config import ConfigError, load_config
from alignreg.stop import exit_code


def _fail(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 2


def offline_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignreg offline", description="Offline RL (TD3 + actor penalty) on D4RL-format data")
    p.add_argument("config", help="experiment YAML, e.g. configs/offline/prdc_hopper_medium.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.steps=2000")
    args = p.parse_args(argv)
    from alignreg.offline.config import OfflineConfig
    from alignreg.offline.train import train

    try:
        cfg = load_config(OfflineConfig, args.config, args.overrides)
        if not cfg.name:
            cfg.name = Path(args.config).stem
        out = cfg.trainer.out_dir.format(name=cfg.name, seed=cfg.trainer.seed)
        res = train(cfg, out)
    except ConfigError as e:
        return _fail(e)
    return exit_code(res.get("stopped"))


def data_main(argv: list[str]) -> int:
    from alignreg.offline.generate import ENV_IDS, LEVELS

    p = argparse.ArgumentParser(prog="alignreg data", description="Make datasets")
    sub = p.add_subparsers(dest="kind", required=True)
    d = sub.add_parser("d4rl", help="write a D4RL-format HDF5 file from alignreg's v5 behaviour policies")
    d.add_argument("--env", required=True, choices=list(ENV_IDS))
    d.add_argument("--level", required=True, choices=list(LEVELS))
    d.add_argument("--size", type=int, default=100_000, help="env steps per behaviour policy")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="", help="output file (default: the cache path training uses)")
    args = p.parse_args(argv)
    from alignreg.offline.config import MIN_SIZE, OfflineDataConfig
    from alignreg.offline.generate import generate_dataset
    from alignreg.offline.train import generated_path

    try:
        if args.size < MIN_SIZE:
            raise ConfigError(f"--size must be >= {MIN_SIZE} (env steps per behaviour policy), got {args.size}")
        if args.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {args.seed}")
        dc = OfflineDataConfig(env=args.env, level=args.level, size=args.size, seed=args.seed, path=args.out)
        path = generate_dataset(args.env, args.level, args.size, args.seed, generated_path(dc))
    except ConfigError as e:
        return _fail(e)
    print(f"wrote {path}")
    return 0


def sweep_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignreg sweep", description="Seeds x datasets x algorithms as Ray tasks")
    p.add_argument("config", help="sweep YAML, e.g. configs/offline/sweep_locomotion.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. seeds=[0,1]")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the table and plots from finished runs")
    args = p.parse_args(argv)
    from alignreg.offline.sweep import SweepConfig, collect_results, run_sweep, write_summary

    try:
        cfg = load_config(SweepConfig, args.config, args.overrides)
        if args.summary_only:
            out = Path(cfg.out_dir.format(name=cfg.name))
            write_summary(collect_results(out), out)
        else:
            run_sweep(cfg)
    except ConfigError as e:
        return _fail(e)
    return 0
