"""The RL loop on Ray actors (local cluster on this host): DeepSpeed learner ranks + rollout engine
actors, local-vs-Ray equivalence, two Ray nodes, engine death, SIGTERM + resume, resource errors.

One Ray cluster (``ray.init(num_cpus=8)``: logical CPUs, over-subscribed on purpose for tiny models)
serves the in-process tests; the SIGTERM test's subprocess driver joins it by address, the two-node
test starts its own cluster with ``ray start``. The rollout engine is vLLM when it is installed,
else the HF engine (``rollout.engine`` in ``_cfg``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from alignreg.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from alignreg.config import ConfigError, RLConfig, load_config  # noqa: E402
from alignreg.logging import read_metrics  # noqa: E402
from alignreg.orchestration.trainer import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "rl" / "tiny_grpo_siren.yaml"
HAS_DS = __import__("importlib").util.find_spec("deepspeed") is not None
FAST = [
    "warm_start.steps=0", "rollout.prompts_per_step=4", "rollout.group_size=4", "learner.micro_batch_size=8",
    "learner.lr=1e-2", "eval.every=0", "task.eval_size=4", "eval.num_samples=2", "eval.ks=[1]",
    "trainer.progress=false", "trainer.tensorboard=false", "trainer.threads=1", "trainer.steps=3",
]


def _engine() -> str:
    if os.environ.get("ALIGNREG_TEST_ENGINE"):  # force "hf" or "vllm"
        return os.environ["ALIGNREG_TEST_ENGINE"]
    try:
        from alignreg.rollout.vllm import check_vllm_version

        check_vllm_version()
        return "vllm"
    except ImportError:
        return "hf"


def _cfg(run_dir, *extra) -> RLConfig:
    engine = _engine()
    # vLLM-CPU supports head size 32/64 (not tiny-qwen2's default 16). Tied embeddings (the default):
    # the engine's packed copy of the tied head must follow each sync (vllm_worker refreshes it; without
    # that the parity probe failed here with diff 6e-3).
    model = ["model.num_heads=2", "model.num_kv_heads=1"] if engine == "vllm" else []
    return load_config(RLConfig, DEMO, FAST + model + [f"rollout.engine={engine}", f"trainer.run_dir={run_dir}", *extra])


def _rows(run_dir):
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _final_weights(run_dir) -> dict:
    return load_checkpoint(latest_checkpoint(run_dir))["learner"]["model"]


def _assert_trained(run_dir, steps=3):
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    for r in rows[1:]:
        for k in ("rollout/reward_mean", "policy/pg_loss", "loss/total", "optim/grad_norm"):
            assert k in r and torch.isfinite(torch.tensor(r[k])), (k, r)
    return rows


# ------------------------------------------------------------------------------------------ e2e
@pytest.mark.slow
@pytest.mark.skipif(not HAS_DS, reason="needs deepspeed (pip install 'alignreg[deepspeed]')")
@pytest.mark.parametrize("stage,transport", [(2, "auto"), (3, "auto"), (3, "collective")])
def test_ray_engine_and_two_deepspeed_ranks(cluster, tmp_path, stage, transport):
    # ZeRO-2 with vLLM when installed; ZeRO-3 with the HF engine (CI time: a vLLM actor starts in ~60 s), its
    # full weights gathered by both ranks for the shared-memory buffer or for rank 0's broadcast
    engine = [] if stage == 2 else ["rollout.engine=hf"]
    cfg = _cfg(tmp_path, "orchestration=ray", "learner.backend=deepspeed", f"deepspeed.zero_stage={stage}",
               "ray.learner_ranks=2", "ray.num_engines=1", "sync.verify=true", f"sync.transport={transport}", *engine)
    summary = train(cfg)
    assert summary["steps"] == 3
    rows = _assert_trained(tmp_path)
    for r in rows[1:]:  # the parity probe + checksum ran after every sync and passed
        assert r["sync/probe_max_abs_diff"] <= cfg.sync.parity_tol
        assert "sync/checksum" in r
    from transformers import AutoModelForCausalLM

    w0 = AutoModelForCausalLM.from_pretrained(tmp_path / "init_policy").state_dict()
    w3 = _final_weights(tmp_path)
    assert max(float((w3[k] - w0[k]).abs().max()) for k in w3 if k in w0) > 1e-4
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()  # save_hf under ZeRO
    for k in w3:
        if k in final:
            torch.testing.assert_close(final[k], w3[k])
    _assert_no_actors_left()  # the run shut its actors down


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DS, reason="needs deepspeed (pip install 'alignreg[deepspeed]')")
def test_ray_lora_on_zero3_ranks_engine_follows_merged_weights(cluster, tmp_path):
    """LoRA on two ZeRO-3 learner ranks, KL to the base (the policy with its adapters off): the engine
    loads the merged weights each step and the parity probe passes; only adapters train; the final
    checkpoint is the adapter and loads back to the learner's policy."""
    cfg = _cfg(tmp_path, "orchestration=ray", "learner.backend=deepspeed", "deepspeed.zero_stage=3", "ray.learner_ranks=2",
               "ray.num_engines=1", "sync.verify=true", "lora.enabled=true", "lora.r=4", "lora.alpha=8",
               "regularizers=[{name: kl_ref, coef: 0.1, params: {estimator: full}}]")
    assert train(cfg)["steps"] == 3
    rows = _assert_trained(tmp_path)
    for r in rows[1:]:
        assert r["sync/probe_max_abs_diff"] <= cfg.sync.parity_tol
    assert rows[-1]["reg/kl_ref/loss"] > 0  # the adapters moved the policy off the base
    w3 = _final_weights(tmp_path)
    from alignreg.learner.lora import base_name, load_any_policy
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(tmp_path / "init_policy")
    w0 = init.state_dict()
    lora = {k for k in w3 if "lora_" in k}
    assert lora and all(torch.equal(w3[k], w0[base_name(k)]) for k in w3 if "lora_" not in k and base_name(k) in w0)
    assert any(float(w3[k].abs().max()) > 0 for k in lora if "lora_B" in k)
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    final, _ = load_any_policy(tmp_path / "final")
    got = final.state_dict()
    for k in lora:
        torch.testing.assert_close(got[k], w3[k])
    _assert_no_actors_left()


def _assert_no_actors_left():
    from ray._private.state import actors  # GCS table (the state API needs the dashboard)

    deadline = time.time() + 30
    while time.time() < deadline:
        alive = [a for a in actors().values() if a["State"] != "DEAD"]
        if not alive:
            return
        time.sleep(1)
    raise AssertionError(f"actors still alive after the run: {alive}")


@pytest.mark.slow
def test_local_and_ray_runs_match(cluster, tmp_path):
    """HF engine, torch backend, 1 learner rank, same seed, SIREN + KL to the reference (full and
    k3): the same metrics and weights. The Ray run keeps the reference in its own actor
    (``ray.colocate_ref: false``), the local run in the learner's process.

    Tolerance: rtol 1e-4 / atol 1e-5 on metrics and 1e-5 on weights. Both runs sample with the same
    per-step seeds from identical weights (the Ray actors load the saved initial policy, the local
    run keeps it in memory); what may differ is float32 rounding between processes."""
    from ray._private.state import actors

    extra = ["rollout.engine=hf", "learner.backend=torch",
             "regularizers=[{name: siren, coef: 0.005}, {name: kl_ref, coef: 0.5, params: {estimator: full}}, "
             "{name: kl_ref, id: kl_k3, coef: 0.2, params: {estimator: k3}}]"]
    train(load_config(RLConfig, DEMO, FAST + extra + [f"trainer.run_dir={tmp_path / 'local'}"]))
    before = {k for k, a in actors().items() if a["ActorClassName"] == "ReferenceActor"}
    train(load_config(RLConfig, DEMO, FAST + extra + [f"trainer.run_dir={tmp_path / 'ray'}", "orchestration=ray",
                                                      "ray.learner_ranks=1", "sync.verify=true", "ray.colocate_ref=false"]))
    assert len({k for k, a in actors().items() if a["ActorClassName"] == "ReferenceActor"} - before) == 1
    local, remote = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert len(local) == len(remote) == 4
    assert local[-1]["reg/kl_ref/loss"] > 0 and local[-1]["reg/kl_k3/loss"] > 0
    for a, b in zip(local, remote):
        for k, v in a.items():
            if k.startswith("time/"):
                continue
            assert k in b, k
            assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (a["step"], k)
    wa, wb = _final_weights(tmp_path / "local"), _final_weights(tmp_path / "ray")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_local_and_ray_score_runs_make_one_update_per_step(cluster, tmp_path):
    """SCoRe: a batch holds both attempts (2 x prompts_per_step x group_size rows), and
    ``mini_batch_size: 0`` is one update over all of them in a Ray run as in a local one (the Ray
    group took the mini-batch as prompts_per_step x group_size and made two updates: attempt 1, then
    attempt 2 off-policy; the warm-up ran twice as fast). The entropy term gives a gradient without
    rewards; the learning rate after 2 steps of a 4-update warm-up tells the number of updates."""
    extra = ["rollout.engine=hf", "learner.backend=torch", "score.enabled=true", "score.advantage=grpo",
             "score.instruction=\" check:\"", "learner.warmup_steps=4", "learner.mini_batch_size=0", "trainer.steps=2",
             "regularizers=[{name: entropy, coef: 0.05}]"]
    train(load_config(RLConfig, DEMO, FAST + extra + [f"trainer.run_dir={tmp_path / 'local'}"]))
    train(load_config(RLConfig, DEMO, FAST + extra + [f"trainer.run_dir={tmp_path / 'ray'}", "orchestration=ray",
                                                      "ray.learner_ranks=1"]))
    local, remote = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    for rows in (local, remote):  # one update per step
        assert [r["optim/lr"] for r in rows[1:]] == pytest.approx([1e-2 / 4, 2e-2 / 4])
    for a, b in zip(local, remote):
        for k, v in a.items():
            if not k.startswith("time/"):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (a["step"], k)
    wa, wb = _final_weights(tmp_path / "local"), _final_weights(tmp_path / "ray")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300, method="thread")  # a hang sits in ray.get, which SIGALRM does not interrupt
def test_object_store_sync_with_every_cpu_held_and_a_bfloat16_hf_engine(cluster, tmp_path):
    """The actors' bundles hold all 8 CPUs of the cluster: the sync's checksum must not need a Ray task
    of its own (it waited for a free CPU forever). ``model.dtype=bfloat16``: the HF engine actor loads
    the learner's dtype (it loaded float32, and every sync failed its check)."""
    cfg = _cfg(tmp_path, "orchestration=ray", "rollout.engine=hf", "learner.backend=torch", "ray.learner_ranks=1",
               "ray.num_engines=1", "ray.num_cpus_per_actor=4", "sync.transport=object_store", "sync.verify=true",
               "model.dtype=bfloat16", "trainer.steps=2", "sync.parity_tol=1e-5")
    assert train(cfg)["steps"] == 2
    rows = _assert_trained(tmp_path, steps=2)
    for r in rows[1:]:  # same dtype and kernels; the engine's log-softmax and the learner's chunked one round apart
        assert r["sync/probe_max_abs_diff"] <= 1e-5 and "sync/checksum" in r
    assert next(iter(_final_weights(tmp_path).values())).dtype == torch.bfloat16


def _record_sync(monkeypatch) -> list:
    """Record (transport, weight groups) of every RayRolloutGroup.load_weights call."""
    from alignreg.orchestration import ray_groups

    seen, original = [], ray_groups.RayRolloutGroup.load_weights

    def load_weights(self, named):
        out = original(self, named)
        seen.append((self.transport, list(self.group_ids)))
        return out

    monkeypatch.setattr(ray_groups.RayRolloutGroup, "load_weights", load_weights)
    return seen


@pytest.mark.slow
def test_collective_transport_run_equals_the_shared_memory_run(cluster, tmp_path, monkeypatch):
    """``sync.transport: collective`` (gloo here; NCCL between GPUs) against the default (/dev/shm on one
    node), two engines, same seed: every sync verified (checksum + parity probe), the same metrics and
    the same final weights, and the weights really went through one group per engine."""
    seen = _record_sync(monkeypatch)
    common = ["orchestration=ray", "learner.backend=torch", "ray.learner_ranks=1", "ray.num_engines=2",
              "rollout.engine=hf", "sync.verify=true"]
    train(_cfg(tmp_path / "shm", *common))
    assert {t for t, _ in seen} == {"shm"}
    seen.clear()
    train(_cfg(tmp_path / "coll", *common, "sync.transport=collective", "sync.bucket_mb=0.05"))  # several buckets
    assert {t for t, _ in seen} == {"collective"} and len(seen) == 3  # one sync per step
    assert all(g is not None for _, groups in seen for g in groups) and len({g for g in seen[-1][1]}) == 2
    assert seen[0][1] == seen[-1][1]  # the groups are opened once and reused
    a, b = _assert_trained(tmp_path / "shm"), _assert_trained(tmp_path / "coll")
    for ra, rb in zip(a[1:], b[1:]):
        assert rb["sync/probe_max_abs_diff"] <= 1e-3 and rb["sync/checksum"] == ra["sync/checksum"]
        for k in ("rollout/reward_mean", "loss/total", "optim/grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-7), k
    wa, wb = _final_weights(tmp_path / "shm"), _final_weights(tmp_path / "coll")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_vllm_engine_over_the_collective_transport(cluster, tmp_path, monkeypatch):
    """The vLLM engine's workers join the group and load the broadcast through reload_weights; the parity
    probe passes after every sync and the engine follows the learner."""
    if _engine() != "vllm":
        pytest.skip("vllm-cpu not installed")
    seen = _record_sync(monkeypatch)
    cfg = _cfg(tmp_path, "orchestration=ray", "learner.backend=torch", "ray.learner_ranks=1", "sync.verify=true",
               "sync.transport=collective")
    assert train(cfg)["steps"] == 3
    assert {t for t, _ in seen} == {"collective"}
    for r in _assert_trained(tmp_path)[1:]:
        assert r["sync/probe_max_abs_diff"] <= cfg.sync.parity_tol


def test_vllm_engine_actor_runs_the_model_in_its_own_process(cluster, tmp_path):
    """vllm.executor=auto in an engine actor (tensor-parallel size 1): the model runs in the actor's
    process (vLLM's "uni" executor, no worker process beside it), generates, and takes a weight load."""
    if _engine() != "vllm":
        pytest.skip("vllm-cpu not installed")
    from alignreg.models import encode_prompts, load_policy
    from alignreg.orchestration.ray_groups import EngineActor
    from alignreg.rollout.base import SamplingParams

    cfg = _cfg(tmp_path, "orchestration=ray")
    model, tok = load_policy(cfg.model, seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    actor = ray.remote(EngineActor).options(num_cpus=1).remote(cfg, str(tmp_path / "m"), 0)
    try:
        layout = ray.get(actor.__ray_call__.remote(
            lambda self: (self.engine.executor, os.getpid(), self.engine.collective_rpc("alignreg_pid"))), timeout=300)
        assert layout[0] == "uni" and layout[2] == [layout[1]]
        prompts = encode_prompts(tok, ["sort 321=", "sort 4321="])
        sp = SamplingParams(greedy=True, max_new_tokens=4)
        before = ray.get(actor.generate.remote(prompts, sp), timeout=120)
        assert len(before.response_ids) == 2 and all(0 < len(r) <= 4 for r in before.response_ids)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ray.get(actor.load_weights.remote(list(model.state_dict().items())), timeout=120)
        after = ray.get(actor.generate.remote(prompts, sp), timeout=120)
        lp = ray.get(actor.logprobs_of.remote(prompts[0], after.response_ids[0]), timeout=120)
        from alignreg.orchestration.weight_sync import hf_logprobs_fn

        want = hf_logprobs_fn(model)(prompts[0], after.response_ids[0])
        assert max(abs(a - b) for a, b in zip(lp, want)) < 1e-3  # the engine serves the loaded weights
    finally:
        ray.kill(actor, no_restart=True)


def test_engine_shards_and_second_attempts_sample_from_their_own_streams():
    """Engine i of a Ray group and SCoRe's second attempts draw from seeds mixed out of the step's seed:
    ``seed + i`` was engine 0's seed i steps later (and ``seed + 1`` the next step's first attempts)."""
    from alignreg.orchestration.ray_groups import RayRolloutGroup
    from alignreg.rollout.base import SECOND_ATTEMPT_STREAM, SamplingParams, mix_seed

    step_seeds = [1_000_003 + s for s in range(200)]  # trainer.seed 1: consecutive per-step seeds
    shard = [RayRolloutGroup._shard_sampling(None, SamplingParams(seed=s), i).seed for s in step_seeds for i in range(8)]
    assert shard[::8] == step_seeds  # engine 0 samples as a one-process run does
    second = [mix_seed(s, SECOND_ATTEMPT_STREAM) for s in step_seeds]
    assert len(set(shard) | set(second)) == 9 * len(step_seeds)  # no stream is used twice
    assert RayRolloutGroup._shard_sampling(None, SamplingParams(seed=None), 3).seed is None


def test_auto_transport_follows_the_layout():
    from alignreg.orchestration.ray_groups import resolve_transport

    def pick(same_node, *over):
        return resolve_transport(load_config(RLConfig, DEMO, ["orchestration=ray", *over]), same_node)

    whole = ["ray.num_gpus_per_learner=1", "ray.num_gpus_per_engine=1"]
    half = ["ray.num_gpus_per_learner=0.5", "ray.num_gpus_per_engine=0.5"]
    assert pick(True, *whole) == pick(False, *whole) == "collective"  # NCCL, device to device
    assert pick(True) == "shm" and pick(False) == "object_store"  # CPU learners and engines
    assert pick(False, *half) == "object_store"  # fractional GPUs may share a device: no NCCL
    assert pick(False, "sync.transport=shm") == "object_store"  # a /dev/shm file cannot cross nodes
    assert pick(True, "sync.transport=collective") == "collective"


# ------------------------------------------------------------------------------------------ faults
@pytest.mark.slow
@pytest.mark.parametrize("async_rollout,transport", [(False, "auto"), (True, "auto"), (False, "collective"),
                                                     (True, "collective")])
def test_engine_killed_mid_run_is_restarted_and_resynced(cluster, tmp_path, async_rollout, transport):
    """Kill the engine actor as a rollout after the first sync starts; the shard is retried and the run
    completes. With async rollout the kill lands in the batch generated ahead, on the driver's rollout
    thread, while the learner actor trains. Collective transport: the restarted instance joins a new
    weight group; with async rollout it is re-synced from the host copy learner rank 0 kept of the last
    sync (the learner's own weights have moved on by then)."""

    from alignreg.orchestration import ray_groups

    cfg = _cfg(tmp_path, "orchestration=ray", "learner.backend=torch", "ray.learner_ranks=1", "ray.max_restarts=2",
               "trainer.steps=4", "rollout.engine=hf", f"trainer.async_rollout={str(async_rollout).lower()}",
               f"sync.transport={transport}",
               "rollout.temperature=0.7")  # the parity probe compares engine and learner at the rollout temperature
    killed = {}
    original = ray_groups.RayRolloutGroup.generate_scored

    def generate_scored(self, *a, **k):
        if not killed and self._last is not None:  # after the first weight sync: a real re-sync is needed
            killed["actor"] = self.actors[0]
            ray.kill(self.actors[0], no_restart=False)
            # sync: killed as the rollout is submitted, so the call fails (or meets the restarted, stale
            # instance); a 0.2 s timer was flaky: a fast rollout finished first and no call failed.
            # async: wait until Ray has restarted it, so no call fails, but the restarted instance holds
            # the initial weights; the group's weight-version check must catch it
            if async_rollout:
                deadline = time.monotonic() + 120
                while True:  # until the restarted instance (weights version 0 again) answers
                    try:
                        ray.get(self.actors[0].at_version.remote(0, "node_id"), timeout=30)
                        break
                    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                            ray_groups.StaleEngineError):
                        assert time.monotonic() < deadline, "the killed engine actor was not restarted"
                        time.sleep(0.2)
        return original(self, *a, **k)

    ray_groups.RayRolloutGroup.generate_scored = generate_scored
    try:
        summary = train(cfg)
    finally:
        ray_groups.RayRolloutGroup.generate_scored = original
    assert killed and summary["steps"] == 4
    rows = _assert_trained(tmp_path, steps=4)
    assert rows[-1]["sync/engine_restarts"] >= 1
    for r in rows[1:]:
        assert r["sync/probe_max_abs_diff"] <= cfg.sync.parity_tol
    assert [r["rollout/policy_lag"] for r in rows[1:]] == ([0.0] + [1.0] * 3 if async_rollout else [0.0] * 4)


def _kill_until_dead(actor) -> None:
    """Kill a learner actor and return once it is dead: ray.kill is asynchronous, and a call submitted
    just after it may still run (it did in CI), so poll until a call fails."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.get(actor.node_id.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        assert time.monotonic() < deadline, "the killed learner rank still answers"
        time.sleep(0.1)


def _assert_learner_death_stops_the_run(cfg, tmp_path, during: str) -> None:
    """The run fails with one line (RunError: exit 1 from the CLI) naming the dead learner's call and the
    checkpoint the same command resumes from (step 1: these runs checkpoint every step), within seconds."""
    from alignreg.config import RunError

    t0 = time.monotonic()
    with pytest.raises(RunError) as err:
        train(cfg)
    assert time.monotonic() - t0 < 120  # not a hang until a timeout
    msg = str(err.value)
    assert f"a learner rank's actor died during {during}" in msg and "\n" not in msg, msg
    assert msg.endswith(f"the latest checkpoint: {tmp_path / 'checkpoints' / 'step_00000001'} (the same command "
                        "resumes from it)"), msg


@pytest.mark.slow
def test_a_dead_learner_rank_stops_the_run_with_one_line_naming_the_checkpoint(cluster, tmp_path, monkeypatch):
    """Learner ranks share optimizer state and collectives, so a dead one is not restarted alone: the run
    stops with a RunError (one line, exit 1 from the CLI) naming the checkpoint the same command resumes from."""
    from alignreg.orchestration import ray_groups

    cfg = _cfg(tmp_path, "orchestration=ray", "learner.backend=torch", "ray.learner_ranks=1", "trainer.steps=3",
               "rollout.engine=hf", "trainer.save_every=1", "eval.every=0")
    original = ray_groups.RayLearnerGroup.train_step

    def train_step(self, batch, step):
        if step == 1:  # the second step: step 1 is checkpointed
            _kill_until_dead(self.actors[0])
        return original(self, batch, step)

    monkeypatch.setattr(ray_groups.RayLearnerGroup, "train_step", train_step)
    _assert_learner_death_stops_the_run(cfg, tmp_path, "train_step")


@pytest.mark.slow
def test_a_learner_dying_in_a_collective_sync_stops_the_run_with_one_line(cluster, tmp_path, monkeypatch):
    """``sync.transport: collective``: learner rank 0 is dead when a sync starts, so the engine waits in a
    broadcast whose sender is gone. The engine's receive fails instead of hanging, and the run stops with
    one line that names the dead learner and the checkpoint to resume from. (Killing rank 0 after its send
    was submitted raced with the send: a fast broadcast could finish first, and the death then surfaced in
    the parity probe.)"""
    from alignreg.orchestration import ray_groups

    cfg = _cfg(tmp_path, "orchestration=ray", "learner.backend=torch", "ray.learner_ranks=1", "trainer.steps=3",
               "rollout.engine=hf", "trainer.save_every=1", "eval.every=0", "sync.transport=collective",
               "sync.timeout_s=60")
    original, calls = ray_groups.RayRolloutGroup._load_one, []

    def load_one(self, i, weights):
        calls.append(i)
        if len(calls) == 2:  # the second step's sync: rank 0 is dead (not merely being killed) before it sends
            _kill_until_dead(self.learner.actors[0])
        return original(self, i, weights)

    monkeypatch.setattr(ray_groups.RayRolloutGroup, "_load_one", load_one)
    _assert_learner_death_stops_the_run(cfg, tmp_path, "load_weights")


def _bare(cls, **attrs):
    """An instance of a Ray group with only the attributes a method under test reads (no actors started)."""
    obj = object.__new__(cls)
    obj.__dict__.update(attrs)
    return obj


def _sync_cfg(timeout_s: float):
    from types import SimpleNamespace

    return SimpleNamespace(sync=SimpleNamespace(timeout_s=timeout_s))


@pytest.mark.timeout(120, method="thread")
def test_an_engine_side_sync_failure_is_a_one_line_weight_sync_error(cluster):
    """The engine's own check of what it received fails (vllm_worker's checksum, a partial load, an unknown
    name): a WeightSyncError naming the engine and the cause in one line (was a raw RayTaskError traceback,
    which the CLI does not catch), for the object-store load and for a collective's engine half."""
    from alignreg.orchestration.ray_groups import RayLearnerGroup, RayRolloutGroup, RemoteWeights
    from alignreg.orchestration.weight_sync import WeightSyncError

    class Engine:
        def load_at_version(self, version, method, *args):
            raise RuntimeError("weight transport corrupted the tensors: checksum 1.0 in the engine, 2.0 sent")

    engine = ray.remote(Engine).options(num_cpus=0).remote()
    try:
        group = _bare(RayRolloutGroup, cfg=_sync_cfg(60), version=1, nodes=["a"], actors=[engine], group_ids=[None],
                      learner=_bare(RayLearnerGroup))
        with pytest.raises(WeightSyncError) as err:
            group._load_one(0, RemoteWeights(ref=ray.put([]), node="b"))
        msg = str(err.value)
        assert msg == ("weight sync to rollout engine 0 failed in the engine's load_weights (RuntimeError: weight "
                       "transport corrupted the tensors: checksum 1.0 in the engine, 2.0 sent)"), msg
        with pytest.raises(WeightSyncError, match=r"^weight sync to rollout engine 0 failed in the engine's "
                                                  r"load_weights \(RuntimeError: weight transport corrupted"):
            group._both(0, engine.load_at_version.remote(1, "load_weights_from_group"), ray.put(None), "load_weights")
    finally:
        ray.kill(engine, no_restart=True)


@pytest.mark.timeout(120, method="thread")
def test_an_engine_whose_restart_fails_stops_at_once_with_the_cause(cluster, tmp_path):
    """Ray restarts a dead engine, but the new instance's ``__init__`` raises (a GPU out of memory): the run
    stops at once with that cause (it retried the dead actor for the whole sync.timeout_s, then dropped it)."""
    from alignreg.config import WorkerError
    from alignreg.orchestration.ray_groups import RayRolloutGroup

    class Engine:
        def __init__(self, marker):
            if os.path.exists(marker):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def node_id(self):
            return "node"

        def die(self):
            os._exit(1)

    marker = tmp_path / "restarted"
    engine = ray.remote(Engine).options(num_cpus=0, max_restarts=2, max_task_retries=0).remote(str(marker))
    try:
        assert ray.get(engine.node_id.remote(), timeout=60) == "node"
        marker.touch()
        with pytest.raises(ray.exceptions.RayActorError):  # dead once the call fails (a ray.kill lets later calls in)
            ray.get(engine.die.remote(), timeout=60)
        group = _bare(RayRolloutGroup, cfg=_sync_cfg(60), actors=[engine], nodes=[None], group_ids=[None], restarts=0,
                      max_restarts=2, _last=None)
        t0 = time.monotonic()
        with pytest.raises(WorkerError) as err:
            group._on_death(0)
        assert time.monotonic() - t0 < 30  # not sync.timeout_s
        msg = str(err.value)
        assert msg.startswith("rollout engine 0 died and its restart failed (") and "\n" not in msg, msg
        assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in msg, msg
    finally:
        ray.kill(engine, no_restart=True)


@pytest.mark.timeout(120, method="thread")
def test_a_dead_reference_actor_is_named_not_blamed_on_a_learner_rank(cluster):
    """``ray.colocate_ref: false``: the reference actor dies while a (live) learner rank's reference pass waits
    on it. The error names the reference actor, on one line without Ray's colour codes (it said that a
    learner rank's actor died)."""
    from alignreg.config import WorkerError
    from alignreg.orchestration.ray_groups import RayLearnerGroup

    class Reference:
        def node_id(self):
            return "node"

        def response_hidden(self, *args):
            return torch.zeros(1)

    class Rank:
        def reference_pass(self, reference):
            from types import SimpleNamespace

            from alignreg.orchestration.ray_groups import _RemoteBody

            ids = torch.zeros(1, 2, dtype=torch.long)
            rows = SimpleNamespace(input_ids=ids, attention_mask=ids, position_ids=ids, prompt_len=1, response_len=1)
            return _RemoteBody(reference).response_hidden(rows, None, False)

    reference = ray.remote(Reference).options(num_cpus=0).remote()
    rank = ray.remote(Rank).options(num_cpus=0).remote()
    try:
        _kill_until_dead(reference)
        with pytest.raises(WorkerError) as err:
            _bare(RayLearnerGroup)._get([rank.reference_pass.remote(reference)], "train_step")
        msg = str(err.value)
        assert msg.startswith("the reference actor (ray.colocate_ref: false) died during a learner's reference pass "
                              "(ActorDiedError: "), msg
        assert "learner rank's actor died" not in msg and "\n" not in msg and "\x1b" not in msg, msg
    finally:
        ray.kill(rank, no_restart=True)


@pytest.mark.timeout(120, method="thread")
def test_shutdown_waits_once_for_all_actors_stuck_in_a_call(cluster, monkeypatch):
    """Actors that never answer their close()/shutdown() (blocked in a collective with a dead rank): the
    groups wait SHUTDOWN_TIMEOUT_S once for all of them, then kill them (it waited 30 s per actor: about
    15 minutes of apparent hang for 32 ranks before the error was printed)."""
    from alignreg.orchestration import ray_groups

    class Stuck:
        def ping(self):
            return True

        def block(self):
            time.sleep(600)

        def close(self):
            pass

        def shutdown(self):
            pass

    monkeypatch.setattr(ray_groups, "SHUTDOWN_TIMEOUT_S", 2.0)
    for cls, n in ((ray_groups.RayLearnerGroup, 3), (ray_groups.RayRolloutGroup, 3)):
        actors = [ray.remote(Stuck).options(num_cpus=0).remote() for _ in range(n)]
        ray.get([a.ping.remote() for a in actors], timeout=60)
        for a in actors:
            a.block.remote()
        group = _bare(cls, actors=list(actors), reference=None)
        t0 = time.monotonic()
        group.shutdown()
        assert time.monotonic() - t0 < 2.0 * 2, cls.__name__  # one wait, not one per actor
        assert group.actors == []
        for a in actors:
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(a.ping.remote(), timeout=30)


def test_a_ray_job_keeps_its_own_env_vars(tmp_path, monkeypatch):
    """Under ``ray job submit --runtime-env-json`` with env vars (launch/ray_job_submit.sh --env
    OMP_NUM_THREADS=8) Ray merges the driver's runtime env with the job's and refuses a variable both set
    ("Failed to merge the Job's runtime env"): the driver leaves the job's variables to the job."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    from alignreg.orchestration import ray_groups

    job_env = {"env_vars": {"OMP_NUM_THREADS": "8", "PYTHONUNBUFFERED": "1"}, "working_dir": str(tmp_path)}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env, "metadata": {}}))
    seen = {}

    class Stop(Exception):
        pass

    def init(**kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(ray_groups.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_groups.ray, "init", init)
    with pytest.raises(Stop):
        ray_groups.RayCluster(_cfg(tmp_path, "orchestration=ray", "trainer.threads=2"))
    env = seen["runtime_env"]["env_vars"]
    assert "OMP_NUM_THREADS" not in env and env["TOKENIZERS_PARALLELISM"] == "false" and "PYTHONPATH" in env
    assert _merge_runtime_env(job_env, seen["runtime_env"]) is not None  # what ray.init does in a job
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    with pytest.raises(Stop):
        ray_groups.RayCluster(_cfg(tmp_path, "orchestration=ray", "trainer.threads=2"))
    assert seen["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"  # outside a job: as before


def _driver(run_dir, address, steps, extra=()):
    args = [f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", "orchestration=ray", f"ray.address={address}",
            "learner.backend=torch", "ray.learner_ranks=1", "trainer.save_every=1", *FAST[:-1], *extra]
    return [sys.executable, "-m", "alignreg", "rl", str(DEMO), *args]


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches_uninterrupted(cluster, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    straight, split = tmp_path / "straight", tmp_path / "split"
    steps = 10  # SIGTERM is sent once the first line is logged: 9 steps of slack for a slow signal on a loaded machine
    r = subprocess.run(_driver(straight, cluster, steps), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen(_driver(split, cluster, steps), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = split / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)  # the initial evaluation is logged: the SIGTERM handler is in, no step is done yet
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    assert "SIGTERM: checkpoint written" in out, out[-3000:]
    stopped = json.loads((split / "summary.json").read_text())
    assert stopped["preempted"] and stopped["steps"] < steps
    r = subprocess.run(_driver(split, cluster, steps), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((split / "summary.json").read_text())["steps"] == steps
    wa, wb = _final_weights(straight), _final_weights(split)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    ra = [{k: v for k, v in x.items() if not k.startswith(("time/", "sync/"))} for x in _rows(straight)]
    rb = [{k: v for k, v in x.items() if not k.startswith(("time/", "sync/"))} for x in _rows(split)]
    assert ra == rb


# ------------------------------------------------------------------------------------------ cluster
def test_missing_resources_are_one_line_config_error(cluster, tmp_path):
    from alignreg.orchestration.ray_groups import RayCluster

    cfg = _cfg(tmp_path, "orchestration=ray", "ray.learner_ranks=2", "ray.num_gpus_per_learner=1")
    with pytest.raises(ConfigError) as e:
        RayCluster(cfg)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "ray: the actors need GPU=2 but the cluster has GPU=0" in msg, msg
    assert ray.util.placement_group_table() == {} or all(
        v["state"] == "REMOVED" for v in ray.util.placement_group_table().values())  # nothing was started


@pytest.mark.slow
def test_two_ray_nodes_learners_and_engine_on_different_nodes(tmp_path):
    """``ray start --head`` (node A, resource node_a) + ``ray start --address`` (node B, node_b):
    the learner rank is pinned to A and the engine to B by custom resources; a run with each
    transport that crosses nodes (object store, collective)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    # `ray start` turns token auth on by itself when RAY_AUTH_MODE is unset and ~/.ray/auth_token exists; this
    # process (the driver) fixed its mode when Ray first read it: start the nodes and the probe in the same mode
    from ray._raylet import AuthenticationMode, get_authentication_mode

    mode = "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": mode}
    if ray.is_initialized():
        ray.shutdown()
    nodes = []  # `ray start --block` in its own session: stopping it (by its process group) stops its node
    try:
        for args in (["--head", f"--port={port}", "--include-dashboard=false", '--resources={"node_a": 1}'],
                     [f"--address=127.0.0.1:{port}", '--resources={"node_b": 1}']):
            log = open(tmp_path / f"ray_start_{len(nodes)}.log", "w")  # the reason, if a node does not come up
            nodes.append(subprocess.Popen([ray_bin, "start", "--block", "--num-cpus=2", "--disable-usage-stats", *args],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            _wait_for_nodes(f"127.0.0.1:{port}", len(nodes), tmp_path, env)
        from alignreg.orchestration import ray_groups

        # auto: the object store (no shared /dev/shm across nodes); collective: a gloo group across the nodes
        for transport, expected in (("auto", "object_store"), ("collective", "collective")):
            run_dir = tmp_path / transport
            cfg = load_config(RLConfig, DEMO, FAST + [f"trainer.run_dir={run_dir}", "orchestration=ray",
                                                      f"ray.address=127.0.0.1:{port}", "rollout.engine=hf",
                                                      "learner.backend=torch", "ray.learner_ranks=1", "trainer.steps=2",
                                                      f"sync.transport={transport}", "sync.verify=true"])
            seen = {}
            original = ray_groups.RayRolloutGroup.__init__

            def init(self, *a, **k):
                original(self, *a, **k)
                seen.update(engine_nodes=list(self.nodes), learner_node=self.learner.node, transport=self.transport,
                            node_b=[n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_b" in n["Resources"]])

            ray_groups.RayRolloutGroup.__init__ = init
            try:
                summary = train(cfg, resources={"engine": {"node_b": 0.01}, "learner": {"node_a": 0.01}})
            finally:
                ray_groups.RayRolloutGroup.__init__ = original
            assert summary["steps"] == 2 and seen["transport"] == expected
            assert seen["engine_nodes"] == seen["node_b"] and seen["learner_node"] not in seen["node_b"]
            for r in _assert_trained(run_dir, steps=2)[1:]:
                assert r["sync/probe_max_abs_diff"] <= cfg.sync.parity_tol
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for p in reversed(nodes):
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _wait_for_nodes(address: str, n: int, logs: Path, env: dict, timeout: float = 180.0) -> None:
    code = f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print(len([x for x in ray.nodes() if x['Alive']]))"
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(1)
    tails = [f.read_text()[-1500:] for f in sorted(logs.glob("ray_start_*.log"))]
    raise AssertionError(f"the Ray cluster at {address} did not reach {n} nodes; ray start output: {tails}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_token_auth_cluster_without_the_token_is_a_clear_config_error(tmp_path, monkeypatch):
    """A cluster started with token authentication, a driver without the token: one line saying how to pass it
    (ray.init's own error is a ConnectionError after retries)."""
    import secrets

    ray_bin = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    if ray.is_initialized():
        ray.shutdown()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    log = open(tmp_path / "ray_start.log", "w")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "--block" not in (tmp_path / "ray_start.log").read_text():
            time.sleep(0.5)  # `ray start` prints its --block notice once the head is up
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of this machine
        with pytest.raises(ConfigError, match=r"requires token authentication .* set RAY_AUTH_MODE=token"):
            train(_cfg(tmp_path / "run", "orchestration=ray", f"ray.address=127.0.0.1:{port}", "rollout.engine=hf"))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
