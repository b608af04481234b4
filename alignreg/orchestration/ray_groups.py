"""Ray actor groups with the same typed methods as the local workers (``workers.py``).

* :class:`RayCluster` joins or starts Ray, checks that the requested resources exist BEFORE any
  actor starts (one-line :class:`ConfigError` naming what is missing), and builds one placement
  group per role from ``cfg.ray``: engines (``num_engines`` bundles of ``num_cpus_per_actor`` CPUs
  and ``num_gpus_per_engine`` GPUs = the engine's tensor-parallel GPUs) and learners
  (``learner_ranks`` bundles), plus one ``reference`` bundle when ``ray.colocate_ref: false`` and a
  term needs the reference model. ``resources`` adds custom Ray resources per role, e.g.
  ``{"engine": {"node_b": 0.01}}`` pins engines to the node started with
  ``--resources='{"node_b": 1}'``.
* :class:`RayRolloutGroup`: N :class:`RolloutWorker` actors. ``generate``/``generate_scored`` split
  the prompts into N contiguous shards (engine ``i`` samples with ``seed + i``) and merge in order;
  rewards are computed inside the engine actors. ``load_weights`` ships the learner's weights by
  ``sync.transport`` (:func:`resolve_transport`): ``/dev/shm`` (``weight_sync.SharedMemoryWeights``)
  when every engine shares learner rank 0's node, the Ray object store (learner actor -> store ->
  engines, never through the driver), or ``collective``: one process group per engine (learner rank 0
  + the engine's workers; ``weight_sync.WeightGroup``, NCCL or gloo) in which rank 0 broadcasts the
  weights it staged; then verifies every engine (checksum + log-prob parity probe, ``weight_sync.verify_sync``). A dead
  engine actor is restarted by Ray (``ray.max_restarts``), re-synced with the last weights,
  re-verified, and its shard of the step is generated again with the same seed.
* :class:`RayLearnerGroup`: N :class:`LearnerWorker` actors = torch.distributed ranks (each sets
  ``MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE``; rank 0's node and a free port there are the
  rendezvous). ``train_step`` shards every mini-batch evenly over the ranks (each rank runs
  ``mini_batch_size / ranks`` rows per optimizer step, so a step equals the single-process step) and
  returns rank 0's metrics. Learner actors are not restarted: a dead rank fails the run, and
  ``trainer.resume: auto`` continues from the last checkpoint.
* Reference model: by default each learner rank holds a frozen copy (LoRA: the policy with its
  adapters off, no copy). With ``ray.colocate_ref: false`` one :class:`ReferenceActor` holds it and
  the ranks see a :class:`RemoteReference`: their no-grad pass sends each micro-batch there and gets
  the reference's final hidden states back (the fixed lm head is fetched once), so the learners'
  memory holds no second model at the cost of one round trip per micro-batch.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable, Optional

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from alignreg.config import ConfigError, RLConfig, WorkerError
from alignreg.orchestration.workers import LearnerWorker, RolloutWorker
from alignreg.rollout.base import ENGINE_STREAM, RolloutBatch, SamplingParams, mix_seed, weights_checksum

log = logging.getLogger(__name__)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PG_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 30.0  # how long a group's shutdown waits for all its actors together before killing them
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the colour codes of Ray's error texts


def _cause_line(e: BaseException) -> str:
    """``Type: message`` of what failed, on one line for a WorkerError: the exception raised inside the actor
    for a RayTaskError, else the last line of the error's text (an ActorDiedError of a failed ``__init__``
    ends with that exception), without Ray's colour codes."""
    while isinstance(e, ray.exceptions.RayTaskError) and isinstance(getattr(e, "cause", None), BaseException) \
            and e.cause is not e:
        e = e.cause
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    return f"{_ANSI.sub('', type(e).__name__)}: {lines[-1] if lines else ''}"[:300]


def _close_all(actors: list, method: str) -> None:
    """Call ``method`` on every actor at once, wait up to SHUTDOWN_TIMEOUT_S for all of them together (an
    actor stuck in a collective with a dead one never answers; one wait per actor added up to minutes),
    then kill them (without restart)."""
    refs = []
    for a in actors:
        try:
            refs.append(getattr(a, method).remote())
        except Exception:  # noqa: BLE001 - a dead actor needs no shutdown
            pass
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_TIMEOUT_S)
    for a in actors:
        ray.kill(a, no_restart=True)


def fmt_resources(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(res.items()))


def fits_a_node(bundle: dict[str, float], nodes: list[dict[str, float]]) -> bool:
    """Some node's resources hold the whole ``bundle`` (an actor or task cannot span nodes)."""
    return any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes)


def check_resources(bundles: dict[str, list[dict[str, float]]], total: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Raise a one-line ConfigError when the bundles cannot fit the cluster (totals, then per bundle)."""
    need: dict[str, float] = {}
    for role_bundles in bundles.values():
        for b in role_bundles:
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
    missing = {k: v for k, v in need.items() if v > total.get(k, 0.0) + 1e-9}
    if missing:
        have = {k: total.get(k, 0.0) for k in missing}
        raise ConfigError(
            f"ray: the actors need {fmt_resources(missing)} but the cluster has {fmt_resources(have)} (ray.num_engines, ray.learner_ranks, "
            f"ray.num_cpus_per_actor, ray.num_gpus_per_engine, ray.num_gpus_per_learner); lower them or use a bigger cluster (ray.address)")
    for role, role_bundles in bundles.items():
        for b in role_bundles:
            if not fits_a_node(b, nodes):
                raise ConfigError(f"ray: no single node has the resources of one {role} actor ({fmt_resources(b)}); "
                                  f"an actor cannot span nodes - lower ray.num_*_per_* or add a bigger node")


def _runtime_env(env: dict[str, str]) -> Optional[dict]:
    """The driver's ``runtime_env`` for ``ray.init``. Under ``ray job submit`` Ray merges it with the job's
    runtime env (passed in RAY_JOB_CONFIG_JSON_ENV_VAR) and refuses an env var set by both, so a variable
    the job sets (``launch/ray_job_submit.sh --env OMP_NUM_THREADS=8``) keeps the job's value."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job:
        try:
            taken = (json.loads(job).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):  # not the JSON Ray writes: let ray.init judge it
            taken = {}
        env = {k: v for k, v in env.items() if k not in taken}
    return {"env_vars": env} if env else None


def separate_reference(cfg: RLConfig) -> bool:
    """``ray.colocate_ref: false`` and some term needs the reference model."""
    if cfg.ray.colocate_ref:
        return False
    from alignreg.regularizers import build_regularizers

    return build_regularizers(cfg.regularizers).needs_reference()


class RayCluster:
    """Ray connection + resource check + one placement group per role (engine, learner, reference)."""

    def __init__(self, cfg: RLConfig, resources: Optional[dict[str, dict[str, float]]] = None):
        rc = cfg.ray
        extra = resources or {}
        self.bundles = {
            "engine": [self._bundle(rc.num_cpus_per_actor, rc.num_gpus_per_engine, extra.get("engine", {}))
                       for _ in range(rc.num_engines)],
            "learner": [self._bundle(rc.num_cpus_per_actor, rc.num_gpus_per_learner, extra.get("learner", {}))
                        for _ in range(rc.learner_ranks)],
        }
        if separate_reference(cfg):  # one reference actor, sized like a learner rank
            self.bundles["reference"] = [self._bundle(rc.num_cpus_per_actor, rc.num_gpus_per_learner, extra.get("reference", {}))]
        self.started = not ray.is_initialized()
        if self.started:  # the trainer has checked that rc.address answers (check_reachable)
            env = {"PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p),
                   "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(cfg.trainer.threads, 1))}
            try:
                ray.init(address=rc.address or "local", include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=os.environ.get("ALIGNREG_RAY_LOGS", "0") == "1", runtime_env=_runtime_env(env))
            except Exception as e:  # noqa: BLE001
                _raise_if_auth(e, rc.address)
                raise
        try:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            check_resources(self.bundles, ray.cluster_resources(), nodes)
            self.groups = {role: self._placement_group(role, b, rc.placement_strategy) for role, b in self.bundles.items()}
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _bundle(cpus: float, gpus: float, extra: dict[str, float]) -> dict[str, float]:
        b = {"CPU": float(cpus)}
        if gpus > 0:
            b["GPU"] = float(gpus)
        b.update({k: float(v) for k, v in extra.items()})
        return b

    @staticmethod
    def _placement_group(role: str, bundles: list[dict], strategy: str):
        pg = placement_group(bundles, strategy=strategy, name="")
        try:
            ray.get(pg.ready(), timeout=PG_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise ConfigError(f"ray: the {role} placement group ({len(bundles)} x {fmt_resources(bundles[0])}, "
                              f"ray.placement_strategy={strategy}) could not be placed within {PG_TIMEOUT_S:g} s") from None
        return pg

    def options(self, role: str, index: int, **kw) -> dict:
        b = self.bundles[role][index]
        custom = {k: v for k, v in b.items() if k not in ("CPU", "GPU")}
        return dict(num_cpus=b["CPU"], num_gpus=b.get("GPU", 0), resources=custom or None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.groups[role], placement_group_bundle_index=index), **kw)

    def close(self) -> None:
        for pg in getattr(self, "groups", {}).values():
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - the cluster may already be gone
                pass
        self.groups = {}
        if self.started and ray.is_initialized():
            ray.shutdown()


# ------------------------------------------------------------------------------------------ learners
class LearnerActor(LearnerWorker):
    """A learner rank whose model is built by :meth:`setup` once the rendezvous address is known."""

    def __init__(self):  # noqa: D107 - the worker is built in setup()
        pass

    def rendezvous(self) -> tuple[str, int]:
        from alignreg.learner.deepspeed import _free_port

        return ray.util.get_node_ip_address(), _free_port()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def setup(self, cfg: RLConfig, model_dir: str, rank: int, world: int, addr: str, port: int, reference=None) -> None:
        # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU, so the local device is always 0
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0")
        ref = RemoteReference(reference) if reference is not None else None
        LearnerWorker.__init__(self, cfg, model_dir=model_dir, ref_model=ref)

    def state_dict_kept(self, keep: bool) -> Optional[dict]:
        """``state_dict()`` (collective: every rank runs it) returned by the rank that ``keep``s it only, so
        the driver does not pull one full copy of weights and optimizer moments per rank."""
        state = self.state_dict()
        return state if keep else None

    def export_weights_checked(self, keep: bool) -> tuple[Optional[float], list]:
        """``(checksum, export_weights(keep))``, called with ``num_returns=2``: the driver waits on the small
        first value (``weights_checksum`` of what rank 0 exports, None on the other ranks), so a dead rank 0
        is seen without fetching the weights, and the sync's check needs no task of its own."""
        named = self.export_weights(keep)
        return (weights_checksum(named) if keep else None), named


class ReferenceActor:
    """The frozen reference policy in its own actor (``ray.colocate_ref: false``): the learner ranks
    send it their micro-batches and get back its final hidden states at the response positions
    (``learner.policy.response_hidden``, with the learner's autocast and shared-prompt pass); its lm head (fixed) is
    fetched once. Saves one full model copy per learner rank."""

    def __init__(self, cfg: RLConfig, model_dir: str):
        from alignreg.learner.policy import make_reference
        from alignreg.models import lm_head_and_body
        from alignreg.orchestration.workers import _load_hf, _threads

        _threads(cfg)
        self.model = make_reference(_load_hf(model_dir, cfg))
        if torch.cuda.is_available():
            self.model = self.model.to("cuda:0")
        self.device = next(self.model.parameters()).device
        self.body, self.weight, self.bias = lm_head_and_body(self.model)

    def head(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.weight.detach().cpu(), None if self.bias is None else self.bias.detach().cpu()

    @torch.no_grad()
    def response_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        prompt_len: int, response_len: int, autocast: Optional[torch.dtype], share_prompt: bool) -> torch.Tensor:
        """``learner.policy.response_hidden`` of the learner's micro-batch, run here (the same
        autocast and shared-prompt pass as a colocated reference)."""
        from alignreg.learner.policy import response_hidden

        rows = SimpleNamespace(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                               position_ids=position_ids.to(self.device), prompt_len=prompt_len, response_len=response_len)
        return response_hidden(self.body, rows, autocast, share_prompt).cpu()


class _RemoteHead:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight, self.bias = weight, bias


class _RemoteBody:
    def __init__(self, actor):
        self.actor = actor

    def response_hidden(self, batch, autocast: Optional[torch.dtype], share_prompt: bool) -> torch.Tensor:
        """Run ``learner.policy.response_hidden`` in the reference actor (picked up through
        ``lm_head_and_body``'s ``body.response_hidden``). A dead reference actor is a WorkerError that
        names it (the driver reports it as such, not as a death of this learner rank)."""
        try:
            h = ray.get(self.actor.response_hidden.remote(
                batch.input_ids.cpu(), batch.attention_mask.cpu(), batch.position_ids.cpu(), batch.prompt_len,
                batch.response_len, autocast, share_prompt))
        except ray.exceptions.RayActorError as e:
            raise WorkerError(f"the reference actor (ray.colocate_ref: false) died during a learner's reference pass "
                              f"({_cause_line(e)}); it is not restarted") from None
        return h.to(batch.input_ids.device)


class RemoteReference:
    """What a learner rank holds as its reference model when it lives in a :class:`ReferenceActor`:
    ``get_decoder()`` calls the actor (no grad), ``get_output_embeddings()`` is the head fetched
    once (moved to the learner's device). Owns no parameters of the learner's."""

    def __init__(self, actor):
        self.actor = actor
        w, b = ray.get(actor.head.remote())
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self._head = _RemoteHead(w.to(dev), None if b is None else b.to(dev))

    def get_decoder(self):
        return _RemoteBody(self.actor)

    def get_output_embeddings(self):
        return self._head

    def eval(self):
        return self

    def parameters(self):
        return iter(())


@dataclass
class RemoteWeights:
    """The learner's exported weights, living in the Ray object store (or a /dev/shm spec).

    Iterating fetches them (``Iterable[(name, tensor)]`` like a local export); a Ray group passes the
    reference on without the driver ever holding the tensors.
    """

    ref: Any = None  # ObjectRef of list[(name, tensor)]
    shm_spec: Optional[dict] = None  # weight_sync.SharedMemoryWeights spec (same node only)
    node: str = ""  # Ray node id of learner rank 0
    staged: Optional[dict] = None  # collective transport: {"meta", "checksum"} of the weights staged on rank 0
    checksum: Optional[float] = None  # object store: weights_checksum of the tensors behind ``ref``
    holder: Any = None  # collective transport: learner rank 0's actor (holds the staged weights)

    def __iter__(self):
        if self.staged is not None:
            return iter(ray.get(self.holder.staged_weights.remote()))
        if self.ref is None:
            from alignreg.orchestration.weight_sync import read_shared_weights

            return iter([(n, t.clone()) for n, t in read_shared_weights(self.shm_spec)])
        return iter(ray.get(self.ref))


class RayLearnerGroup:
    def __init__(self, cluster: RayCluster, cfg: RLConfig, model_dir: str):
        world = cfg.ray.learner_ranks
        mini = cfg.learner.mini_batch_size or cfg.batch_rows
        if mini % world:
            raise ConfigError(f"ray.learner_ranks: {world} ranks must divide the mini-batch ({mini} responses) "
                              f"so that every rank runs the same number of micro-batches")
        self.world, self.mini = world, cfg.learner.mini_batch_size  # 0: the whole batch, whatever its length
        rank_cfg = copy.deepcopy(cfg)
        rank_cfg.learner.mini_batch_size = self.mini // world  # 0 stays 0: the rank's whole share
        self.reference = None
        if "reference" in cluster.bundles:  # ray.colocate_ref: false
            self.reference = ray.remote(ReferenceActor).options(**cluster.options("reference", 0, max_restarts=0)).remote(cfg, model_dir)
        actor_cls = ray.remote(LearnerActor)
        self.actors = [actor_cls.options(**cluster.options("learner", r, max_restarts=0)).remote() for r in range(world)]
        addr, port = ray.get(self.actors[0].rendezvous.remote())
        ray.get([a.setup.remote(rank_cfg, model_dir, r, world, addr, port, self.reference) for r, a in enumerate(self.actors)])
        self.node = ray.get(self.actors[0].node_id.remote())
        self.transport = "object_store"  # set by the run from the rollout group (sync.transport resolved)

    def _all(self, method: str, *args) -> list:
        return self._get([getattr(a, method).remote(*args) for a in self.actors], method)

    def _get(self, refs: list, method: str) -> list:
        """``ray.get`` of one call per rank (Ray raises at the first failure, without waiting for ranks
        blocked in a collective with the dead one). A WorkerError a rank raised (its reference actor died)
        comes out as that one line; an actor error inside a rank's task (a RayTaskError) is no death of the rank."""
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), WorkerError):
                raise WorkerError(" ".join(_ANSI.sub("", str(e.cause)).split())) from None
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise WorkerError(f"a learner rank's actor died during {method} ({_cause_line(e)}); the learner "
                              "ranks share optimizer state and collectives, so one cannot be restarted alone") from None

    def _shards(self, n: int, mini: int) -> list[list[int]]:
        """Row indices of each rank: the r-th slice of every mini-batch."""
        per = mini // self.world
        return [[i for s in range(0, n, mini) for i in range(s + r * per, s + (r + 1) * per)] for r in range(self.world)]

    def train_step(self, batch, step: int) -> dict[str, float]:
        mini = self.mini or len(batch)  # as the local learner: 0 = the whole batch (a SCoRe batch: both attempts)
        if len(batch) % mini or mini % self.world:
            raise ValueError(f"train_step: batch of {len(batch)} rows is not a multiple of the mini-batch {mini}, "
                             f"or {self.world} ranks do not divide the mini-batch")
        parts = [batch.rows(torch.tensor(idx)) for idx in self._shards(len(batch), mini)]
        return self._get([a.train_step.remote(p, step) for a, p in zip(self.actors, parts)], "train_step")[0]

    def export_weights(self) -> RemoteWeights:
        """Full weights of rank 0 (every rank takes part: ZeRO-3 gathers), by ``transport``: written to
        /dev/shm (``shm``), put in the object store (``object_store``), or staged on rank 0 for the
        engines' weight groups (``collective``: nothing moves until the rollout group's sync)."""
        if self.transport == "collective":
            staged = self._all("stage_weights")[0]
            return RemoteWeights(staged=staged, node=self.node, holder=self.actors[0])
        if self.transport == "shm":
            specs = self._all("export_to_shm")
            return RemoteWeights(shm_spec=specs[0], node=self.node)
        calls = [a.export_weights_checked.options(num_returns=2).remote(r == 0) for r, a in enumerate(self.actors)]
        checksum = self._get([first for first, _ in calls], "export_weights")[0]
        return RemoteWeights(ref=calls[0][1], node=self.node, checksum=checksum)

    def probe_logprobs(self, prompt_ids: list[int], response_ids: list[int], temperature: float = 1.0) -> list[float]:
        return self._all("probe_logprobs", prompt_ids, response_ids, temperature)[0]

    def state_dict(self) -> dict:
        return self._get([a.state_dict_kept.remote(r == 0) for r, a in enumerate(self.actors)], "state_dict")[0]

    def load_state_dict(self, state: dict) -> None:
        ref = ray.put(state)
        self._all("load_state_dict", ref)

    def save_hf(self, path: str) -> None:
        self._all("save_hf", path)

    def shutdown(self) -> None:
        _close_all(self.actors, "close")
        self.actors = []
        if self.reference is not None:
            ray.kill(self.reference)
            self.reference = None


def _raise_if_auth(e: BaseException, address: str) -> None:
    """A cluster with token authentication refused this driver: say how to pass the token."""
    while e is not None:
        # the AuthenticationError reaches ray.init's ConnectionError as text inside its RuntimeError cause
        if isinstance(e, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(e):
            raise ConfigError(f"ray.address: the Ray cluster at {address or 'auto'} requires token authentication and "
                              "this process has no matching token; set RAY_AUTH_MODE=token and the cluster's token "
                              "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), as launch/ray_env.sh does. "
                              "(`ray start` turns token auth on by itself when ~/.ray/auth_token exists)") from None
        e = e.__cause__ or e.__context__


def check_reachable(address: str, key: str = "ray.address", local: str = "ray.address= (empty)",
                    timeout_s: float = 10.0) -> None:
    """ConfigError when ``ray.address`` names a host:port (or ``ray://host:port``) that accepts no TCP
    connection: ``ray.init`` would retry for minutes before failing. For "auto", the address Ray would
    pick (``RAY_ADDRESS``, else the last ``ray start`` recorded in Ray's temp dir, possibly stale) is
    checked. "" and "local" (a new local cluster) pass."""
    import socket

    if address in ("", "local"):
        return
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment  # how ray.init resolves "auto"

            resolved = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            raise ConfigError(f"{key}=auto: no Ray cluster is running on this machine; start one (ray start --head, "
                              f"launch/), or {local} for a new local cluster") from None
        except (ImportError, AttributeError, TypeError):  # another Ray version: leave it to ray.init
            return
        if resolved in (None, "auto"):
            return
        address = resolved
    if "://" in address and not address.startswith("ray://"):  # another scheme (a job server URL): Ray's to judge
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{key}: {address!r} is not host:port, ray://host:port or auto; {local} starts a new local cluster")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"{key}: no Ray cluster answers at {hostport} ({e.strerror or e}); start one there "
                          f"(ray start --head, launch/), use {key}=auto for the one on this machine, or {local} for a "
                          "new local cluster") from None


# ------------------------------------------------------------------------------------------ engines
class StaleEngineError(RuntimeError):
    """The engine actor does not hold the weights its group last synced: Ray restarted it (from the
    initial checkpoint) while it was idle, so no call failed. Handled like a death: re-sync, retry."""


_ENGINE_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, StaleEngineError)


class EngineActor(RolloutWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, own_process=True, **kwargs)
        self.version = 0  # weight syncs applied to this instance; a restart by Ray runs __init__ again

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def at_version(self, version: int, method: str, *args):
        """``method(*args)`` if this instance holds weights ``version``, else StaleEngineError."""
        if version != self.version:
            raise StaleEngineError(f"engine holds weights version {self.version}, the group synced {version}")
        return getattr(self, method)(*args)

    def load_at_version(self, version: int, method: str, *args) -> None:
        getattr(self, method)(*args)
        self.version = version


def resolve_transport(cfg: RLConfig, same_node: bool) -> str:
    """``sync.transport`` for this layout: ``auto`` is ``collective`` when learners and engines hold whole GPUs
    (NCCL), else ``shm`` when every engine shares learner rank 0's node, else ``object_store``. An explicit
    ``shm`` with engines on other nodes goes through the object store (a file cannot cross nodes)."""
    t = cfg.sync.transport
    if t == "auto":
        if cfg.ray.whole_gpus:
            return "collective"
        t = "shm" if not torch.cuda.is_available() else "object_store"
    return "object_store" if t == "shm" and not same_node else t


class _EngineProbe:
    """``verify_sync``'s view of engine ``i`` (calls go through the group: a death is handled)."""

    def __init__(self, group: "RayRolloutGroup", i: int):
        self.group, self.i = group, i

    def logprobs_of(self, prompt_ids, response_ids, temperature=1.0):
        return self.group._call(self.i, "logprobs_of", prompt_ids, response_ids, temperature)

    def weights_checksum(self):
        return self.group._call(self.i, "weights_checksum")


class RayRolloutGroup:
    def __init__(self, cluster: RayCluster, cfg: RLConfig, model_dir: str, learner: Optional[RayLearnerGroup] = None,
                 vocab_size: int = 0):
        self.cfg, self.model_dir, self.learner = cfg, model_dir, learner
        self.max_restarts = cfg.ray.max_restarts
        self.restarts = 0
        actor_cls = ray.remote(EngineActor)
        self.actors = [actor_cls.options(**cluster.options("engine", i, max_restarts=cfg.ray.max_restarts, max_task_retries=0))
                       .remote(cfg, model_dir, cfg.trainer.seed + i) for i in range(cfg.ray.num_engines)]
        self.nodes = ray.get([a.node_id.remote() for a in self.actors])
        self.transport = resolve_transport(cfg, self.same_node) if learner is not None else "object_store"
        if self.transport == "collective":
            from alignreg.orchestration.weight_sync import collective_backend

            self.backend = collective_backend(cfg.sync, cfg.ray)
            self.receivers = ray.get([a.weight_receivers.remote() for a in self.actors])
        self.group_ids: list[Optional[tuple]] = [None] * len(self.actors)  # collective: the group each engine joined
        self._last: Optional[RemoteWeights] = None
        self.version = 0  # weight syncs so far; every engine call checks the engine holds this version
        self._probe, self._probe_lp = None, None
        if learner is not None and cfg.sync.verify and vocab_size:
            from alignreg.orchestration.weight_sync import make_probe

            self._probe = make_probe(vocab_size, cfg.sync, cfg.trainer.seed)
        self.sync_stats: dict[str, float] = {}

    @property
    def same_node(self) -> bool:
        return self.learner is not None and all(n == self.learner.node for n in self.nodes)

    # -------------------------------------------------------------- generation
    def _call(self, i: int, method: str, *args):
        """Call engine ``i``; if its actor died: wait for Ray's restart, re-sync, call again."""
        while True:
            try:
                return ray.get(self.actors[i].at_version.remote(self.version, method, *args), timeout=self.cfg.sync.timeout_s)
            except _ENGINE_LOST:
                self._on_death(i)
            except ray.exceptions.GetTimeoutError:
                raise self._hung(i, method) from None

    def _hung(self, i: int, method: str) -> WorkerError:
        return WorkerError(f"rollout engine {i} did not answer {method} within sync.timeout_s={self.cfg.sync.timeout_s:g} s "
                           "(a hung engine; raise sync.timeout_s if its calls are legitimately that slow)")

    def _on_death(self, i: int) -> None:
        self.restarts += 1
        self.group_ids[i] = None  # the collective group lost a member: the new instance joins a new one
        if self.restarts > self.max_restarts:
            raise WorkerError(f"rollout engine {i} died and the ray.max_restarts={self.max_restarts} restarts are used "
                              "up (raise ray.max_restarts to allow more)")
        log.warning("rollout engine %d died; restart %d/%d: re-sync weights and retry", i, self.restarts, self.max_restarts)
        deadline = time.monotonic() + self.cfg.sync.timeout_s
        while True:  # the restarted actor answers once its __init__ has run again
            try:
                self.nodes[i] = ray.get(self.actors[i].node_id.remote(), timeout=self.cfg.sync.timeout_s)
                break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError) as e:  # still restarting
                if time.monotonic() > deadline or isinstance(e, ray.exceptions.GetTimeoutError):
                    raise WorkerError(f"rollout engine {i} died and did not come back within sync.timeout_s="
                                      f"{self.cfg.sync.timeout_s:g} s after its restart ({type(e).__name__})") from None
                time.sleep(0.5)
            except ray.exceptions.RayActorError as e:  # dead for good: its restart failed (__init__ raised, e.g. out of GPU memory)
                raise WorkerError(f"rollout engine {i} died and its restart failed ({_cause_line(e)})") from None
        if self._last is not None:
            restaged = self._last.staged is not None and not ray.get(self._last.holder.has_staged.remote())
            if restaged:  # synchronous loop: the learner still holds exactly the synced weights
                self._last = self.learner.export_weights()
            self._load_one(i, self._last)
            self._verify(i, self._last)
            if restaged:
                self._release_staged()

    def _split(self, prompts: list) -> list[tuple[int, int]]:
        n, k = len(prompts), len(self.actors)
        per = math.ceil(n / k) if n else 0
        return [(min(i * per, n), min((i + 1) * per, n)) for i in range(k)]

    def _shard_sampling(self, sampling: SamplingParams, i: int) -> SamplingParams:
        """Engine ``i``'s sampling: engine 0 keeps the step's seed (one engine samples as a local run does),
        the others a stream mixed from it (``seed + i`` would be engine 0's seed ``i`` steps later)."""
        if sampling.seed is None or i == 0:
            return sampling
        return SamplingParams(**{**sampling.__dict__, "seed": mix_seed(sampling.seed, ENGINE_STREAM + i)})

    def _gather(self, method: str, prompts: list, sampling: SamplingParams, *scoring) -> list:
        """Run ``method`` on every engine's shard; ``scoring`` = (records, reward) for generate_scored."""
        spans = self._split(prompts)
        refs = {}
        for i, (a, b) in enumerate(spans):
            if b > a:
                args = (prompts[a:b], self._shard_sampling(sampling, i))
                if scoring:
                    args += (scoring[0][a:b], scoring[1])
                refs[i] = (self.actors[i].at_version.remote(self.version, method, *args), args)
        out = []
        for i, (ref, args) in refs.items():
            try:
                res = ray.get(ref, timeout=self.cfg.sync.timeout_s)
            except _ENGINE_LOST:
                self._on_death(i)
                res = self._call(i, method, *args)  # the same shard, the same seed
            except ray.exceptions.GetTimeoutError:
                raise self._hung(i, method) from None
            out.append((spans[i][0], res))
        return out

    @staticmethod
    def _merge(parts: list[tuple[int, RolloutBatch]]) -> RolloutBatch:
        out = RolloutBatch()
        for offset, rb in parts:
            out.prompt_ids += rb.prompt_ids
            out.response_ids += rb.response_ids
            out.logprobs += rb.logprobs
            out.prompt_index += [offset + j for j in rb.prompt_index]
            out.finished += rb.finished
        return out

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        return self._merge(self._gather("generate", prompts, sampling))

    def generate_scored(self, prompts: list[list[int]], sampling: SamplingParams, records: list[dict],
                        reward: str) -> tuple[RolloutBatch, list[float]]:
        parts = self._gather("generate_scored", prompts, sampling, records, reward)
        rewards = [r for _, (_, rs) in parts for r in rs]
        return self._merge([(off, rb) for off, (rb, _) in parts]), rewards

    def reward_metrics(self) -> dict[str, float]:
        """The verifier counters of every engine actor, summed (an engine that cannot answer now is skipped:
        its counts are lost, not the step)."""
        refs = [a.reward_metrics.remote() for a in self.actors]
        out: dict[str, float] = {}
        for ref in refs:
            try:
                for k, v in ray.get(ref, timeout=self.cfg.sync.timeout_s).items():
                    out[k] = out.get(k, 0.0) + v
            except (*_ENGINE_LOST, ray.exceptions.GetTimeoutError):
                pass
        return out

    # -------------------------------------------------------------- weights
    def _open_group(self, i: int) -> None:
        """Learner rank 0 (group rank 0, hosting the store on its node) and engine ``i``'s workers
        (ranks 1..) form weight group ``i``; both sides join at once (each blocks until all joined)."""
        host, port = ray.get(self.learner.actors[0].rendezvous.remote())
        world, timeout = 1 + self.receivers[i], self.cfg.sync.timeout_s
        join = self.actors[i].init_weight_group.remote(self.backend, host, port, 1, world, timeout)
        host_side = self.learner.actors[0].init_weight_group.remote(i, self.backend, host, port, world, timeout)
        self._both(i, join, host_side, "init_weight_group")
        self.group_ids[i] = (host, port)

    def _both(self, i: int, engine_ref, learner_ref, method: str) -> None:
        """Wait for an engine call and the learner call it pairs with in a collective. A dead engine is
        raised as such (the caller restarts it) once the learner's half has ended too (the group is gone,
        so it fails; within sync.timeout_s at worst); a dead learner is a WorkerError; an error raised in
        the engine's half (its checks of what it received) is a one-line WeightSyncError."""
        try:
            ray.get(engine_ref, timeout=self.cfg.sync.timeout_s)
        except _ENGINE_LOST:
            ray.wait([learner_ref], timeout=self.cfg.sync.timeout_s + 10)
            raise
        except ray.exceptions.GetTimeoutError:
            raise self._hung(i, method) from None
        except ray.exceptions.RayTaskError as e:
            done, _ = ray.wait([learner_ref], timeout=5)
            if done:  # a dead learner explains a failed collective; else the engine's own error does
                try:
                    self.learner._get(done, method)
                except ray.exceptions.RayTaskError:
                    pass  # the learner's half failed with the engine's
            raise self._sync_failed(i, method, e) from None
        self.learner._get([learner_ref], method)

    @staticmethod
    def _sync_failed(i: int, method: str, e: BaseException) -> WorkerError:
        """An engine's side of a weight sync raised (a checksum mismatch, a partial load, a name it lacks)."""
        from alignreg.orchestration.weight_sync import WeightSyncError

        return WeightSyncError(f"weight sync to rollout engine {i} failed in the engine's {method} ({_cause_line(e)})")

    def _release_staged(self) -> None:
        """Drop learner rank 0's staged weights after a sync, or keep a host copy when async rollout may
        re-sync a restarted engine while the learner trains on (its weights have moved on by then)."""
        self.learner._get([self.learner.actors[0].release_staged.remote(self.cfg.trainer.async_rollout)], "release_staged")

    def _load_one(self, i: int, weights: RemoteWeights) -> None:
        if weights.staged is not None:
            # an instance Ray restarted while idle holds no group: check before the learner starts sending
            joined = self.group_ids[i] is not None and ray.get(self.actors[i].weight_group_id.remote(),
                                                               timeout=self.cfg.sync.timeout_s) == self.group_ids[i]
            if not joined:
                self._open_group(i)
            bucket = int(self.cfg.sync.bucket_mb * 2**20)
            recv = self.actors[i].load_at_version.remote(self.version, "load_weights_from_group", weights.staged["meta"],
                                                         bucket, weights.staged["checksum"])
            try:
                self._both(i, recv, self.learner.actors[0].send_staged.remote(i, bucket), "load_weights")
            except BaseException:
                self.group_ids[i] = None  # a failed collective leaves the group unusable
                raise
            return
        if weights.shm_spec is not None and self.nodes[i] == weights.node:
            call = ("load_weights_from_spec", weights.shm_spec)
        else:
            call = ("load_weights", weights.ref if weights.ref is not None else ray.put(list(weights)))
        try:
            ray.get(self.actors[i].load_at_version.remote(self.version, *call), timeout=self.cfg.sync.timeout_s)
        except _ENGINE_LOST:
            raise  # the caller restarts it
        except ray.exceptions.GetTimeoutError:
            raise self._hung(i, "load_weights") from None
        except ray.exceptions.RayTaskError as e:
            raise self._sync_failed(i, call[0], e) from None

    def _verify(self, i: int, weights: RemoteWeights) -> dict[str, float]:
        if self._probe is None:
            return {}
        from alignreg.orchestration.weight_sync import verify_sync

        return verify_sync(_EngineProbe(self, i), self._learner_probe, self._probe, self.cfg.sync,
                           expected_checksum=self._expected_checksum(weights), temperature=self.cfg.rollout.temperature)

    def _learner_probe(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The learner's probe log-probs (at the rollout temperature, as the engine's) at the weights of
        the last sync, computed once per sync: a re-sync after an engine restart may run while the
        learner has moved on (async rollout generates during the learner step)."""
        if self._probe_lp is None:
            self._probe_lp = self.learner.probe_logprobs(prompt_ids, response_ids, self.cfg.rollout.temperature)
        return self._probe_lp

    def _expected_checksum(self, weights: RemoteWeights) -> float:
        if weights.staged is not None:
            return weights.staged["checksum"]
        if weights.shm_spec is not None:
            return weights.shm_spec["checksum"]
        if weights.checksum is not None:
            return weights.checksum
        return weights_checksum(list(weights))  # in the driver: a Ray task for it could wait for a free CPU forever

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Sync every engine and verify it; returns ``sync/*`` metrics (worst engine)."""
        weights = named_tensors
        if not isinstance(weights, RemoteWeights):
            named = list(weights)
            weights = RemoteWeights(ref=ray.put(named), checksum=weights_checksum(named))
        if weights.shm_spec is not None and weights.ref is None and not all(n == weights.node for n in self.nodes):
            weights = RemoteWeights(ref=ray.put(list(weights)), node=weights.node, checksum=weights.shm_spec["checksum"])
        self._last, self._probe_lp = weights, None
        self.version += 1
        metrics: dict[str, float] = {}
        for i in range(len(self.actors)):
            try:
                self._load_one(i, weights)
            except _ENGINE_LOST:
                self._on_death(i)  # restart + re-sync with these weights
            m = self._verify(i, weights)
            for k, v in m.items():
                metrics[k] = max(metrics.get(k, v), v) if k.endswith("diff") else v
        if weights.staged is not None:
            self._release_staged()
        metrics["sync/engine_restarts"] = float(self.restarts)
        return metrics

    def weights_checksum(self) -> float:
        sums = [self._call(i, "weights_checksum") for i in range(len(self.actors))]
        if any(not math.isclose(s, sums[0], rel_tol=1e-9, abs_tol=1e-9) for s in sums):
            from alignreg.orchestration.weight_sync import WeightSyncError

            raise WeightSyncError(f"rollout engines disagree on their weights: checksums {sums}")
        return sums[0]

    def shutdown(self) -> None:
        _close_all(self.actors, "shutdown")
        self.actors = []
