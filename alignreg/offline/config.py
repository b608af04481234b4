"""Offline-RL experiment schema (``alignreg offline <config.yaml> [key=value ...]``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignreg.config import ConfigError, RegularizerConfig, _at_least, _check

Env = Literal["hopper", "halfcheetah", "walker2d"]
Level = Literal["random", "medium", "medium-replay", "medium-expert", "expert"]
MIN_SIZE = 1000  # data.size / alignreg data --size: env steps per behaviour policy


def check_placeholders(template: str, key: str, **values) -> None:
    """``template.format(**values)`` works (an output-directory template): else one ConfigError line."""
    try:
        template.format(**values)
    except (KeyError, ValueError, IndexError, AttributeError, TypeError) as e:
        valid = ", ".join("{" + k + "}" for k in values)
        raise ConfigError(f"{key}: bad placeholder in {template!r} ({type(e).__name__}: {e}); valid placeholders: "
                          f"{valid} (write {{{{ and }}}} for literal braces)") from None


@dataclass
class OfflineDataConfig:
    source: Literal["generated", "d4rl_hdf5", "minari"] = "generated"  # generated: alignreg's v5 data (made if missing); d4rl_hdf5: a D4RL file; minari: a Minari dataset
    env: Env = "hopper"  # locomotion task; also the gymnasium v5 environment used for evaluation
    level: Level = "medium"  # generated: behaviour-policy level (D4RL naming)
    path: str = ""  # d4rl_hdf5: the file; generated: cache file ("" = <cache_dir>/<env>-<level>-v5-p<policy hash>-s<seed>-n<size>.hdf5)
    cache_dir: str = "~/.cache/alignreg/offline"  # generated: where datasets are written when path is ""
    minari_id: str = ""  # minari: dataset id, e.g. "mujoco/hopper/medium-v0" (local: `minari download <id>` first)
    size: int = 100_000  # generated: env steps per behaviour policy (medium-expert holds 2 x size)
    seed: int = 0  # generated: generation seed (same seed -> same file)
    reference: Literal["auto", "d4rl", "alignreg-v5"] = "auto"  # normalised-score references; auto: alignreg-v5 for generated data, d4rl otherwise
    normalize_states: bool = True  # (s - mean) / (std + 1e-3) over the dataset (TD3+BC, PRDC)

    def validate(self, path: str) -> None:
        _check(self.source != "d4rl_hdf5" or bool(self.path), f"{path}.path: required when source is d4rl_hdf5")
        _check(self.source != "minari" or bool(self.minari_id), f"{path}.minari_id: required when source is minari")
        _check(self.size >= MIN_SIZE, f"{path}.size must be >= {MIN_SIZE}, got {self.size}")
        _at_least(self, path, 0, "seed")


@dataclass
class OfflineLearnerConfig:
    algo: Literal["td3", "bc"] = "td3"  # td3: TD3 with the actor penalty (TD3+BC, PRDC, A2PR); bc: actor trained on the penalty alone
    alpha: float = 2.5  # TD3+BC alpha: lambda = alpha / mean|Q| scales the Q term of the actor loss (not a regularizer coef)
    discount: float = 0.99  # gamma
    tau: float = 0.005  # Polyak rate of the target networks
    policy_noise: float = 0.2  # target policy smoothing noise std (x max_action)
    noise_clip: float = 0.5  # clip of the smoothing noise (x max_action)
    policy_freq: int = 2  # actor and target updates every policy_freq critic steps
    actor_lr: float = 3e-4  # Adam learning rate of the actor
    critic_lr: float = 3e-4  # Adam learning rate of the twin critic
    batch_size: int = 256  # transitions per iteration
    actor_hidden: list[int] = field(default_factory=lambda: [256, 256])  # actor MLP widths (A2PR official: 3 x 256)
    critic_hidden: list[int] = field(default_factory=lambda: [256, 256])  # each critic's MLP widths (A2PR official: 4 x 256)

    def validate(self, path: str) -> None:
        _check(self.policy_freq >= 1, f"{path}.policy_freq must be >= 1")
        _check(self.batch_size >= 1, f"{path}.batch_size must be >= 1")
        _check(0 < self.discount <= 1, f"{path}.discount must be in (0, 1]")
        _check(0 < self.tau <= 1, f"{path}.tau must be in (0, 1]")
        _check(self.actor_lr > 0 and self.critic_lr > 0, f"{path}.actor_lr/critic_lr must be > 0")
        _at_least(self, path, 0, "policy_noise", "noise_clip")
        for name in ("actor_hidden", "critic_hidden"):
            widths = getattr(self, name)
            _check(bool(widths) and all(w >= 1 for w in widths), f"{path}.{name} must be a non-empty list of widths "
                                                                 f">= 1, got {widths}")


@dataclass
class OfflineEvalConfig:
    every: int = 5000  # evaluate every this many iterations (0 = only at the end)
    episodes: int = 10  # episodes per evaluation (deterministic policy)
    seed: int = 100  # evaluation env seeds are seed + 1000 * eval_index + episode

    def validate(self, path: str) -> None:
        _at_least(self, path, 0, "every")
        _at_least(self, path, 1, "episodes")


@dataclass
class OfflineTrainerConfig:
    steps: int = 100_000  # learner iterations (critic steps)
    seed: int = 0  # run seed (networks, batch sampling, noise)
    out_dir: str = "runs/offline/{name}-s{seed}"  # output directory; placeholders: {name} (run name, default: config file stem), {seed} (trainer.seed)
    log_every: int = 1000  # metrics line (JSONL) every this many iterations
    checkpoint_every: int = 10_000  # atomic checkpoint every this many iterations (0 = only at the end)
    resume: bool = True  # continue from out_dir/checkpoint.pt when it exists
    threads: int = 1  # torch CPU threads
    device: str = "auto"  # learner device: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N
    progress: bool = True  # tqdm progress bar

    def validate(self, path: str) -> None:
        _at_least(self, path, 0, "steps", "checkpoint_every")
        _at_least(self, path, 1, "log_every", "threads")
        check_placeholders(self.out_dir, f"{path}.out_dir", name="run", seed=self.seed)
        _check(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
               f"{path}.device: unknown device {self.device!r}; valid: auto, cpu, cuda, cuda:N")
        _check(bool(self.out_dir.strip()), f"{path}.out_dir is empty (the run would write into the current directory); name a directory")


@dataclass
class OfflineConfig:
    name: str = ""  # run name (default: the config file stem)
    data: OfflineDataConfig = field(default_factory=OfflineDataConfig)  # dataset
    learner: OfflineLearnerConfig = field(default_factory=OfflineLearnerConfig)  # TD3 base
    regularizers: list[RegularizerConfig] = field(default_factory=lambda: [RegularizerConfig(name="bc_mse")])  # exactly one actor penalty: bc_mse | prdc | a2pr (default: TD3+BC)
    eval: OfflineEvalConfig = field(default_factory=OfflineEvalConfig)  # evaluation in the v5 environment
    trainer: OfflineTrainerConfig = field(default_factory=OfflineTrainerConfig)  # loop, logs, checkpoints

    def validate(self, path: str) -> None:
        from alignreg.regularizers import build_regularizers

        terms = build_regularizers(self.regularizers, path=f"{path}.regularizers", hooks=("actor_penalty",))
        if len(terms) != 1:
            raise ConfigError(f"{path}.regularizers: exactly one active actor penalty is required (bc_mse, prdc or a2pr), got {len(terms)}")
        from alignreg.regularizers.bc_mse import BCMSE

        if self.learner.algo == "bc" and not isinstance(terms.terms[0].term, BCMSE):
            raise ConfigError(f"{path}.learner.algo: 'bc' trains the actor on bc_mse only; valid penalty: bc_mse")
