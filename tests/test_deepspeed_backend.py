"""DeepSpeed ZeRO-2/3 backend == the single-process torch backend.

Two gloo ranks (spawned with torch.multiprocessing) each train on half of the batch with the
DeepSpeed backend; gradients (summed over ranks, read before the update), gradient norms and
weights after two optimizer steps must equal one process training on the whole batch with
:class:`TorchBackend`. Adam is invariant to the gradient scale, so the gradients themselves are
compared: a missing world-size factor would pass a weights-only test.

ZeRO-3 runs with ``stage3_param_persistence_threshold: 0`` so that every parameter of the tiny
model - including the tied embedding / lm-head weight that the learner reads outside any module's
forward - really is partitioned (by default small parameters stay replicated and the lm-head
problem would be invisible).

Tolerance: rtol 1e-4 / atol 1e-6 on gradients; atol 1e-4 on weights (1% of one lr=1e-2 step: Adam's
g / (sqrt(v) + eps) amplifies float32 summation-order differences of near-zero gradient entries;
observed max 3e-5). The only differences are the summation order of the reductions. The same
worker then resumes a fresh engine from the backend's checkpoint and takes a third step, which must
match the uninterrupted torch run.

With LoRA (PEFT adapters on every linear layer, ZeRO-2 and ZeRO-3; the reference is the policy with
its adapters off, as in LoRA runs): the same comparison over the adapter weights, the frozen base
weights must not move, ``export_weights`` must be the merged
``W + scale B A`` under the base names (what engines load) equal to the torch run's, and the
checkpoint must resume.
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("deepspeed")

from alignreg.config import LoRAConfig, RLConfig, from_dict  # noqa: E402
from alignreg.learner.lora import BaseModelView, apply_lora, merged_weights  # noqa: E402
from alignreg.learner.policy import PolicyLearner, TorchBackend  # noqa: E402
from alignreg.models import build_tokenizer  # noqa: E402
from alignreg.regularizers import build_regularizers  # noqa: E402
from tests.test_learner import ALL_TERMS, _batch, _model, _perturbed_ref  # noqa: E402

TERMS = ALL_TERMS[:3]  # kl_ref full + k3 (reference model), entropy: every stats path with a gradient
# Batches share each group's prompt, so the learner's shared-prompt pass (two decoder calls through a
# key/value cache per forward) runs under ZeRO-3's parameter gathering.
STEPS = 2


def _cfg(stage: int, grad_clip: float = 0.0, lora: bool = False, offload: bool = False) -> RLConfig:
    cfg = from_dict(RLConfig, {
        "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 6, "temperature": 0.9},
        "algorithm": {"loss_agg_mode": "seq-mean-token-mean"},
        "learner": {"micro_batch_size": 3, "lr": 1e-2, "grad_clip": grad_clip, "warmup_steps": 2, "backend": "deepspeed"},
        "deepspeed": {"zero_stage": stage, "offload_optimizer": offload},
        "regularizers": TERMS,
    })
    cfg.lora = LoRAConfig(enabled=lora, r=4, alpha=8.0)
    return cfg


def _policy(tok, cfg: RLConfig, seed: int = 0):
    """(policy, reference): a perturbed copy of the model; with LoRA the policy is wrapped and the
    reference is None: :func:`_ref` makes the base view (the policy with its adapters off)."""
    model = _model(tok, seed=seed)
    if not cfg.lora.enabled:
        return model, _perturbed_ref(model)
    torch.manual_seed(seed)  # the adapters' random A init
    return apply_lora(model, cfg.lora), None


def _ref(ref, backend):
    if ref is not None:
        return ref
    if hasattr(backend, "learner_model"):  # DeepSpeed: the PeftModel inside the engine, the ZeRO-3 head view
        return BaseModelView(backend.module, backend.learner_model)
    return BaseModelView(backend.model)


def _capture_grads(backend, store: list):
    """Record the full (rank-reduced) gradients right before each optimizer update."""
    from deepspeed.utils import safe_get_full_grad

    opt = backend.engine.optimizer
    inner = opt.step

    def step(*a, **k):
        store.append({n: safe_get_full_grad(p).detach().clone() for n, p in backend.module.named_parameters() if p.requires_grad})
        return inner(*a, **k)

    opt.step = step


def _ds_worker(rank: int, world: int, port: int, stage: int, out_dir: str, lora: bool = False, offload: bool = False):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from alignreg.learner.deepspeed import DeepSpeedBackend

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = _cfg(stage, lora=lora, offload=offload)
    model, ref = _policy(tok, cfg)
    backend = DeepSpeedBackend(model, cfg, ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    if stage == 3:  # the test is only meaningful if the head weight really is partitioned
        assert backend.module.get_output_embeddings().weight.numel() == 0
    grads, norms = [], []
    _capture_grads(backend, grads)
    learner = PolicyLearner(backend.learner_model, cfg, build_regularizers(cfg.regularizers), ref_model=_ref(ref, backend),
                            backend=backend)
    for step in range(STEPS):
        batch = _batch(tok, seed=step, shared=True)
        half = len(batch) // world
        norms.append(learner.train_step(batch.rows(slice(rank * half, (rank + 1) * half)), step)["optim/grad_norm"])
    weights = dict(backend.export_weights())
    state = learner.state_dict()
    # resume: a fresh engine loads the checkpoint and takes one more step
    fresh = DeepSpeedBackend(_policy(tok, cfg, seed=1)[0], cfg, ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    resumed = PolicyLearner(fresh.learner_model, cfg, build_regularizers(cfg.regularizers), ref_model=_ref(ref, fresh), backend=fresh)
    resumed.load_state_dict(state)
    batch = _batch(tok, seed=STEPS, shared=True)
    half = len(batch) // world
    resumed.train_step(batch.rows(slice(rank * half, (rank + 1) * half)), STEPS)
    after_resume = dict(fresh.export_weights())
    if rank == 0:
        torch.save({"grads": grads, "norms": norms, "weights": weights, "state": state, "resumed": after_resume},
                   os.path.join(out_dir, "ds.pt"))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    # DeepSpeed's engines keep references to the gloo groups, so the groups' C++ worker threads can
    # outlive destroy_process_group and be torn down during interpreter finalization, where they
    # may abort the process ("terminate called without an active exception", SIGABRT on rank 1,
    # seen once in CI). The rank's work is done and its file closed: leave without finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _Capture(TorchBackend):
    def __init__(self, *a):
        super().__init__(*a)
        self.grads = []

    def apply_update(self) -> float:
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})
        return super().apply_update()


def _torch_reference(lora: bool = False):
    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = _cfg(2, lora=lora)
    model, ref = _policy(tok, cfg)
    backend = _Capture(model, cfg)
    learner = PolicyLearner(model, cfg, build_regularizers(cfg.regularizers), ref_model=_ref(ref, backend), backend=backend)
    norms = [learner.train_step(_batch(tok, seed=s, shared=True), s)["optim/grad_norm"] for s in range(STEPS)]
    weights = dict(merged_weights(model)) if lora else {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(learner.state_dict())  # AdamW's state_dict references live tensors
    learner.train_step(_batch(tok, seed=STEPS, shared=True), STEPS)
    after = dict(merged_weights(model)) if lora else {n: p.detach().clone() for n, p in model.named_parameters()}
    return backend.grads, norms, weights, state, after


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage,lora,offload", [(2, False, False), (3, False, False), (2, True, False), (3, True, False),
                                                (2, False, True), (3, False, True)],
                         ids=["zero2", "zero3", "zero2-lora", "zero3-lora", "zero2-offload", "zero3-offload"])
def test_zero_two_ranks_match_single_process_torch(stage, lora, offload, tmp_path):
    mp.start_processes(_ds_worker, args=(2, _free_port(), stage, str(tmp_path), lora, offload), nprocs=2, join=True,
                       start_method="spawn")
    ds = torch.load(tmp_path / "ds.pt", weights_only=False)
    grads, norms, weights, state, after = _torch_reference(lora)
    if lora:
        base = dict(_policy(build_tokenizer(), _cfg(2))[0].named_parameters())  # the untrained base weights
        assert set(ds["weights"]) == set(base), "LoRA export must use the base model's names"
        assert all(set(g) and all("lora_" in n for n in g) for g in ds["grads"]), "only adapters have gradients"
        for key in ("weights", "resumed"):  # merged: the base moved only through B A on adapted layers
            moved = {n for n, w in ds[key].items() if not torch.equal(w, base[n].detach())}
            assert moved and all(n.endswith("proj.weight") for n in moved), sorted(moved)[:4]
        frozen = {k: v for k, v in state["model"].items() if "base_layer" in k}
        assert frozen and all(torch.equal(ds["state"]["model"][k], v) for k, v in frozen.items())  # checkpoint holds the base
    assert len(ds["grads"]) == STEPS and len(grads) == STEPS + 1
    for s in range(STEPS):
        for name, g in grads[s].items():
            torch.testing.assert_close(ds["grads"][s][name], g, rtol=1e-4, atol=1e-6, msg=f"step {s} grad {name}")
    torch.testing.assert_close(torch.tensor(ds["norms"]), torch.tensor(norms), rtol=1e-4, atol=1e-6)
    for name, w in weights.items():
        torch.testing.assert_close(ds["weights"][name], w.detach(), rtol=1e-5, atol=1e-4, msg=name)
    # checkpoints have the torch backend's layout: same keys, same AdamW moments
    assert ds["state"]["scheduler"]["last_epoch"] == state["scheduler"]["last_epoch"]
    assert set(ds["state"]["model"]) == set(state["model"])  # tied aliases too: a torch backend / eval loads it strictly
    for name, w in state["model"].items():
        torch.testing.assert_close(ds["state"]["model"][name], w, rtol=1e-5, atol=1e-4, msg=name)
    for i, s in state["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ds["state"]["optimizer"]["state"][i][k], s[k], rtol=1e-4, atol=1e-7)
    # a fresh engine resumed from that checkpoint continues like the uninterrupted torch run
    for name, w in after.items():
        torch.testing.assert_close(ds["resumed"][name], w, rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.slow
def test_a_nonfinite_update_is_skipped_under_deepspeed_as_under_torch(tmp_path):
    """DeepSpeed skips an update whose gradients overflow (weights, Adam state and schedule unchanged), so
    the learner counts it like the torch backend's skip instead of stopping the run; more than
    learner.max_nonfinite_updates in a row still stop it. One ZeRO-3 rank, in a child process."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import torch
        from alignreg.config import RLConfig, from_dict
        from alignreg.learner.deepspeed import DeepSpeedBackend
        from alignreg.learner.policy import PolicyLearner
        from alignreg.models import build_tokenizer
        from alignreg.regularizers import build_regularizers
        from tests.test_learner import _batch, _model
        tok = build_tokenizer()
        cfg = from_dict(RLConfig, {"learner": {"lr": 1e-2, "backend": "deepspeed", "micro_batch_size": 16,
                                               "max_nonfinite_updates": 1}, "deepspeed": {"zero_stage": 3}})
        be = DeepSpeedBackend(_model(tok), cfg)
        learner = PolicyLearner(be.learner_model, cfg, build_regularizers([]), backend=be)
        bad = _batch(tok)
        bad.advantages[3] = float("nan")
        w0 = dict(be.export_weights())
        m = learner.train_step(bad, 0)
        assert m["optim/nonfinite_skipped"] == 1.0, m
        assert all(torch.equal(w0[k], v) for k, v in be.export_weights()), "weights moved"
        assert be.scheduler.last_epoch == 0
        m = learner.train_step(_batch(tok), 1)
        assert m["optim/nonfinite_skipped"] == 0.0 and be.scheduler.last_epoch == 1
        learner.train_step(bad, 2)
        try:
            learner.train_step(bad, 3)
        except FloatingPointError as e:
            assert "2 updates in a row" in str(e), e
            print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-1500:] + out.stderr[-3000:]


def _spawn(fn, args, timeout_s: float = 300):
    """``mp.start_processes`` that fails (kills the ranks) instead of hanging on a collective mismatch."""
    import time

    ctx = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish in {timeout_s:.0f} s (a collective mismatch between them?)")


def _uneven_prompts_batch(tok):
    """8 rows: rows 0-3 (rank 0's half) in pairs that share a prompt, rows 4-7 (rank 1's) all distinct."""
    from alignreg.learner.batch import collate

    g = torch.Generator().manual_seed(0)
    V, n = len(tok), 8
    prompts = [torch.randint(3, V, (3,), generator=g).tolist() for _ in range(n)]
    prompts[1], prompts[3] = prompts[0], prompts[2]
    responses = [torch.randint(3, V, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return collate(prompts, responses, [[-1.0] * len(r) for r in responses], torch.ones(n), torch.randn(n, generator=g),
                   [0, 0, 1, 1, 2, 3, 4, 5], tok.pad_token_id)


def _uneven_cfg() -> RLConfig:
    cfg = _cfg(3)
    cfg.learner.micro_batch_size = 2
    return cfg


def _uneven_worker(rank: int, world: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from alignreg.learner.deepspeed import DeepSpeedBackend

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = _uneven_cfg()
    model, ref = _policy(tok, cfg)
    backend = DeepSpeedBackend(model, cfg, ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    grads = []
    _capture_grads(backend, grads)
    learner = PolicyLearner(backend.learner_model, cfg, build_regularizers(cfg.regularizers), ref_model=ref, backend=backend)
    batch = _uneven_prompts_batch(tok)
    norm = learner.train_step(batch.rows(slice(rank * 4, rank * 4 + 4)), 0)["optim/grad_norm"]
    if rank == 0:
        torch.save({"grads": grads, "norm": norm}, os.path.join(out_dir, "ds.pt"))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see _ds_worker


@pytest.mark.slow
def test_zero3_ranks_with_and_without_shared_prompts(tmp_path):
    """learner.share_prompt under ZeRO-3: rank 0's micro-batches share prompts (a prompt pass, then the
    responses: two decoder calls), rank 1's do not (one call). Each decoder call gathers the weight
    partitions collectively, so the ranks must agree on the path: a rank making fewer calls paired its
    gathers with the other rank's next ones (gloo: 'collective mismatch' abort; NCCL: a hang). Gradients
    and norm equal one process on the whole batch."""
    _spawn(_uneven_worker, (2, _free_port(), str(tmp_path)))
    ds = torch.load(tmp_path / "ds.pt", weights_only=False)
    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = _uneven_cfg()
    model, ref = _policy(tok, cfg)
    backend = _Capture(model, cfg)
    learner = PolicyLearner(model, cfg, build_regularizers(cfg.regularizers), ref_model=ref, backend=backend)
    norm = learner.train_step(_uneven_prompts_batch(tok), 0)["optim/grad_norm"]
    assert len(ds["grads"]) == 1
    for name, g in backend.grads[0].items():
        torch.testing.assert_close(ds["grads"][0][name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(ds["norm"], norm, rtol=1e-4, atol=1e-6)
