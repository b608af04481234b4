"""``alignreg`` command line: ``rl``, ``offline``, ``data``, ``sweep``, ``regularizers``.

Config problems print one line (``error: <key>: <problem>; valid ...``) and exit with code 2.
"""
from __future__ import annotations

import argparse
import errno
import sys

from alignreg.config import ConfigError, RunError
from alignreg.stop import exit_code

USAGE = """usage: alignreg <command> [args]

commands:
  rl CONFIG [key=value ...]        train an LLM policy with GRPO + regularizers
  sft CONFIG [key=value ...]       supervised cold start with TRL (writes a checkpoint rl starts from)
  eval CHECKPOINT [--data F] [...] greedy / pass@k / maj@k / self-correction metrics of a checkpoint
  offline CONFIG [key=value ...]   offline RL (TD3 + actor penalty) on D4RL-format data
  data d4rl --env ENV --level LVL  generate a D4RL-format dataset from gymnasium MuJoCo
  sweep CONFIG [...]               seeds x datasets x algorithms as Ray tasks
  regularizers                     list registered regularizers and their parameters
"""


def _rl(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alignreg rl", description="GRPO-family RL with pluggable regularizers")
    p.add_argument("config", help="YAML experiment file (configs/rl/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. learner.lr=1e-5")
    args = p.parse_args(argv)
    from alignreg.config import RLConfig, load_config
    from alignreg.orchestration.trainer import train

    cfg = load_config(RLConfig, args.config, args.overrides)
    summary = train(cfg)
    first, last = summary.get("initial_eval", {}), summary.get("final_eval", {})
    print(f"run dir: {cfg.trainer.run_dir}")
    if summary.get("preempted"):
        print(f"stopped at step {summary['steps']} of {cfg.trainer.steps} ({summary['stop_signal']}); the values "
              "below are from the last evaluation; the same command resumes the run")
    for k in sorted(set(first) | set(last)):
        a, b = first.get(k), last.get(k)
        print(f"  {k:24s} {'' if a is None else f'{a:.3f}':>8s} -> {'' if b is None else f'{b:.3f}':>8s}")
    return exit_code(summary.get("stop_signal"))


def _regularizers(argv: list[str]) -> int:
    from alignreg.regularizers import REGULARIZERS
    from alignreg.regularizers.base import params_doc

    for name in REGULARIZERS.names():
        cls = REGULARIZERS.get(name)
        print(f"{name:12s} hooks={','.join(cls.kind):20s} {params_doc(cls)}")
    return 0


def _lazy(module: str, func: str):
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(module).__dict__[func](argv)

    return run


COMMANDS = {
    "rl": _rl,
    "regularizers": _regularizers,
    "sft": _lazy("alignreg.sft", "sft_main"),
    "eval": _lazy("alignreg.evaluate", "eval_main"),
    "offline": _lazy("alignreg.offline.cli", "offline_main"),
    "data": _lazy("alignreg.offline.cli", "data_main"),
    "sweep": _lazy("alignreg.offline.cli", "sweep_main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"error: unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return cmd(argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f" writing {e.filename!r}" if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: {e.strerror}{where}; make room and run the same command again (a run resumes from its "
                  "last complete checkpoint)", file=sys.stderr)
            return 1
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            print(f"error: {e.strerror}: {e.filename!r}; check its permissions, or use paths you can read and write "
                  "(for outputs: trainer.run_dir / trainer.out_dir / output_dir / --out)", file=sys.stderr)
            return 1
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
            print(f"error: {e.strerror}: {e.filename!r}; check the path (a missing directory, or a file where a "
                  "directory is expected or the other way round)", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
