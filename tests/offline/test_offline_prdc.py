"""PRDC: exact k-th neighbour (== float64 brute force) and the actor penalty's value and gradient."""
import numpy as np
import pytest
import torch

from alignreg.offline.batch import ActorPenaltyBatch, OfflineSetup
from alignreg.offline.nn_search import JointNearestNeighbour
from alignreg.regularizers import build_regularizers
from alignreg.config import RegularizerConfig


def brute_force(states, actions, beta, qi, pi, k):
    """k-th nearest (index, squared distance) in float64 over all points."""
    P = np.hstack([beta * states.astype(np.float32), actions]).astype(np.float32).astype(np.float64)
    q = np.hstack([(beta * states[qi].astype(np.float32)).astype(np.float32).astype(np.float64), pi])
    d2 = ((q[:, None, :] - P[None]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")[:, k - 1]
    return order, d2[np.arange(len(qi)), order], d2


def dataset(rng, n=4000, S=6, A=3):
    # trajectory-like states (random walk) + clusters of exact duplicates, as in real data
    s = np.cumsum(rng.normal(0, 0.05, (n, S)), 0).astype(np.float32)
    s[100:120] = s[100]
    s = (s - s.mean(0)) / (s.std(0) + 1e-3)
    a = np.tanh(rng.normal(size=(n, A))).astype(np.float32)
    return s.astype(np.float32), a


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("spread", [0.02, 0.5, 2.0])  # near the data (certified) ... far (fallback)
def test_neighbour_equals_brute_force(k, spread):
    rng = np.random.default_rng(k)
    s, a = dataset(rng)
    nn = JointNearestNeighbour(s, a, beta=2.0, k=k, num_candidates=16)
    qi = rng.integers(0, len(s), 256)
    qi[:10] = np.arange(100, 110)  # duplicated states
    pi = np.clip(a[qi] + rng.normal(0, spread, a[qi].shape), -1, 1)
    idx, d2 = nn.query(torch.from_numpy(qi), torch.from_numpy(pi).float())
    pi32 = torch.from_numpy(pi).float().double().numpy()
    ref_idx, ref_d2, all_d2 = brute_force(s, a, 2.0, qi, pi32, k)
    np.testing.assert_allclose(d2.numpy(), ref_d2, rtol=1e-9, atol=1e-12)
    # indices equal except where distances tie; then the returned index has the same distance
    got_d = all_d2[np.arange(len(qi)), idx.numpy()]
    np.testing.assert_allclose(got_d, ref_d2, rtol=1e-9, atol=1e-12)
    assert (idx.numpy() == ref_idx).mean() > 0.9
    if spread == 2.0:
        assert nn.last_certified < 1.0  # the fallback path ran


def test_query_without_indices_and_official_approach_agree():
    rng = np.random.default_rng(5)
    s, a = dataset(rng, n=2000)
    nn = JointNearestNeighbour(s, a, beta=2.0, k=1)
    qi = rng.integers(0, len(s), 64)
    pi = torch.from_numpy(np.clip(a[qi] + rng.normal(0, 0.3, a[qi].shape), -1, 1)).float()
    i1, d1 = nn.query(torch.from_numpy(qi), pi)
    i2, d2 = nn.query(None, pi, torch.from_numpy(2.0 * s[qi]))
    i3 = nn.official_query(2.0 * s[qi], pi.numpy())
    np.testing.assert_allclose(d1.numpy(), d2.numpy(), rtol=1e-6)
    ref = ((nn.points[i3] - np.hstack([2.0 * s[qi], pi.numpy()])) ** 2).sum(1)
    np.testing.assert_allclose(d1.numpy(), ref, rtol=1e-5)


def test_candidate_lists_cached_and_rebuilt_when_unreadable(tmp_path):
    rng = np.random.default_rng(3)
    s, a = dataset(rng, n=1500)
    logs: list[str] = []
    first = JointNearestNeighbour(s, a, beta=2.0, num_candidates=16, cache_dir=str(tmp_path), cache_min_rows=0,
                                  log=logs.append)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and not logs  # built (too small to report progress) and written
    again = JointNearestNeighbour(s, a, beta=2.0, num_candidates=16, cache_dir=str(tmp_path), cache_min_rows=0,
                                  log=logs.append)
    assert logs == [f"prdc: candidate lists from cache {files[0]}"]
    assert torch.equal(first.cand, again.cand) and torch.equal(first.cand_ds2, again.cand_ds2)
    files[0].write_bytes(b"not a numpy file")
    rebuilt = JointNearestNeighbour(s, a, beta=2.0, num_candidates=16, cache_dir=str(tmp_path), cache_min_rows=0,
                                    log=logs.append)
    assert "unreadable cache file" in logs[-1] and torch.equal(first.cand, rebuilt.cand)
    assert np.load(files[0])["cand"].shape == (1500, 16)  # rewritten
    other = JointNearestNeighbour(s * 1.5, a, beta=2.0, num_candidates=16, cache_dir=str(tmp_path), cache_min_rows=0)
    assert len(list(tmp_path.glob("*.npz"))) == 2 and other.cand.shape == (1500, 16)  # other data: its own file
    small = JointNearestNeighbour(s, a, beta=2.0, num_candidates=8, cache_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists() and small.cand.shape == (1500, 8)  # under cache_min_rows: not cached


@pytest.mark.parametrize("dims", [2, 4, 6])  # lists in the top principal axes of the 6-D state: still exact
def test_projected_candidate_lists_stay_exact(dims):
    rng = np.random.default_rng(dims)
    s, a = dataset(rng, n=3000)
    full = JointNearestNeighbour(s, a, beta=2.0, k=1, num_candidates=32)
    nn = JointNearestNeighbour(s, a, beta=2.0, k=1, num_candidates=32, list_dims=dims)
    assert nn.list_dims == dims and full.list_dims == 6
    qi = rng.integers(0, len(s), 512)
    pi = np.clip(a[qi] + rng.normal(0, 0.1, a[qi].shape), -1, 1)
    idx, d2 = nn.query(torch.from_numpy(qi), torch.from_numpy(pi).float())
    _, ref_d2, _ = brute_force(s, a, 2.0, qi, torch.from_numpy(pi).float().double().numpy(), 1)
    np.testing.assert_allclose(d2.numpy(), ref_d2, rtol=1e-9, atol=1e-12)
    # the bound R_i never exceeds the true squared state distance of any non-candidate
    s64 = (2.0 * s.astype(np.float32)).astype(np.float32).astype(np.float64)
    for i in qi[:32]:
        d = ((s64 - s64[i]) ** 2).sum(1)
        outside = np.setdiff1d(np.arange(len(s)), nn.cand[i].numpy())
        assert d[outside].min() >= nn.radius2[i].item()
    cert = nn.last_certified
    full.query(torch.from_numpy(qi), torch.from_numpy(pi).float())
    assert 0.0 < cert <= full.last_certified + 1e-12  # fewer axes: a weaker, still valid, certificate


@pytest.mark.parametrize("k", [1, 2])
def test_tree_only_search_when_the_candidate_build_is_too_slow(k):
    rng = np.random.default_rng(11)
    s, a = dataset(rng, n=25_000)
    logs: list[str] = []
    nn = JointNearestNeighbour(s, a, beta=2.0, k=k, num_candidates=8, max_build_s=0.0, log=logs.append)
    assert nn.cand is None and "would take" in logs[0] and "max_index_build_s=0" in logs[0]
    qi = rng.integers(0, len(s), 128)
    pi = np.clip(a[qi] + rng.normal(0, 0.3, a[qi].shape), -1, 1)
    idx, d2 = nn.query(torch.from_numpy(qi), torch.from_numpy(pi).float())
    _, ref_d2, _ = brute_force(s, a, 2.0, qi, torch.from_numpy(pi).float().double().numpy(), k)
    np.testing.assert_allclose(d2.numpy(), ref_d2, rtol=1e-9, atol=1e-12)
    assert nn.last_certified == 0.0


def test_prdc_penalty_value_and_gradient_float64():
    rng = np.random.default_rng(7)
    s, a = dataset(rng, n=1500, S=4, A=2)
    terms = build_regularizers([RegularizerConfig(name="prdc", params={"beta": 2.0, "k": 2})], hooks=("actor_penalty",))
    term = terms.terms[0].term
    term.setup(OfflineSetup(s, a, 4, 2, 1.0, 0))
    qi = rng.integers(0, len(s), 128)
    pi = torch.tensor(np.clip(a[qi] + rng.normal(0, 0.2, a[qi].shape), -1, 1), dtype=torch.float64, requires_grad=True)
    batch = ActorPenaltyBatch(torch.from_numpy(s[qi]), torch.from_numpy(a[qi]), pi, None, torch.from_numpy(qi), 1)
    loss, m = term.actor_penalty(batch)
    loss.backward()
    ref_idx, _, _ = brute_force(s, a, 2.0, qi, pi.detach().numpy(), 2)
    a_nn = a[ref_idx].astype(np.float64)
    p = pi.detach().numpy()
    assert loss.item() == pytest.approx(((p - a_nn) ** 2).mean(), rel=1e-12)
    np.testing.assert_allclose(pi.grad.numpy(), 2 * (p - a_nn) / p.size, rtol=1e-12)
    assert 0.0 <= m["certified"] <= 1.0


def test_prdc_setup_reports_index_build_decisions_below_the_cache_size(tmp_path, capsys):
    # 25k rows: below the cache threshold (100k) but large enough that the build time is estimated;
    # the fall-back to the tree-only search must be visible, not silent
    rng = np.random.default_rng(5)
    s, a = dataset(rng, n=25_000)
    params = {"beta": 2.0, "num_candidates": 8, "max_index_build_s": 0.0, "index_cache": str(tmp_path)}
    term = build_regularizers([RegularizerConfig(name="prdc", params=params)], hooks=("actor_penalty",)).terms[0].term
    term.setup(OfflineSetup(s, a, 6, 3, 1.0, 0))
    out = capsys.readouterr().out
    assert term.index.cand is None
    assert "would take" in out and "no candidate lists within max_index_build_s" in out
    assert list(tmp_path.iterdir()) == []  # nothing cached below 100k rows


def test_overlapped_search_gives_the_serial_run_bit_for_bit():
    """overlap_search: the search for the actor step runs on a side thread during the critic update, from
    pi(s) computed before it. The run is identical to searching in the actor step; a prefetch whose pi(s)
    no longer matches is discarded and the search is redone. Without the overlap the learner runs no
    pi(s) pass for it."""
    from alignreg.offline.datasets import OfflineData
    from alignreg.offline.td3 import TD3Learner

    rng = np.random.default_rng(3)
    s, a = dataset(rng, n=3000, S=5, A=2)
    data = OfflineData({"observations": s, "actions": a, "next_observations": np.roll(s, -1, 0),
                        "rewards": rng.normal(size=len(s)).astype(np.float32), "terminals": np.zeros(len(s), bool)})
    runs = []
    for overlap in (True, False):
        torch.manual_seed(0)
        terms = build_regularizers([RegularizerConfig(name="prdc", params={"num_candidates": 8, "overlap_search": overlap})],
                                   hooks=("actor_penalty",))
        L = TD3Learner(data.state_dim, data.action_dim, actor_hidden=[32, 32], critic_hidden=[32, 32], penalties=terms)
        L.setup(OfflineSetup(data.states_np, data.actions.numpy(), data.state_dim, data.action_dim, 1.0, 0))
        calls = []
        hook = L.actor.register_forward_hook(lambda m, a, o: calls.append(1))
        gen = torch.Generator().manual_seed(1)
        metrics = [L.train_step(data.sample(64, gen)) for _ in range(30)]
        hook.remove()
        runs.append((L, terms.terms[0].term, metrics, len(calls)))
    (fast, term, m_fast, fast_calls), (slow, slow_term, m_slow, slow_calls) = runs
    assert term.prefetch_used == 15 and slow_term.prefetch_used == 0  # every actor step (policy_freq 2) took it
    assert fast_calls - slow_calls == 15  # one no-grad pi(s) per actor step, only with the overlap
    for (n, p), q in zip(fast.state_dict()["actor"].items(), slow.state_dict()["actor"].values()):
        assert torch.equal(p, q), n
    assert [m.get("reg/prdc/nn_dist") for m in m_fast] == [m.get("reg/prdc/nn_dist") for m in m_slow]
    # a stale prefetch (pi changed after it started) is not used
    b = data.sample(64, torch.Generator().manual_seed(9))
    with torch.no_grad():
        pi = fast.actor(b.states)
    term.prefetch_actor_penalty(b.states, b.indices, pi + 0.5)
    loss, _ = term.actor_penalty(ActorPenaltyBatch(b.states, b.actions, pi, None, b.indices, 1))
    ref_idx, _, _ = brute_force(data.states_np, data.actions.numpy(), 2.0, b.indices.numpy(), pi.double().numpy(), 1)
    assert term.prefetch_used == 15
    assert loss.item() == pytest.approx(((pi.numpy() - data.actions.numpy()[ref_idx]) ** 2).mean(), rel=1e-6)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("spread", [0.02, 2.0])
def test_brute_search_equals_brute_force_over_several_chunks(k, spread):
    """search=brute (the GPU path; here on the CPU): the matrix-product scan with its exact re-rank gives the
    float64 brute-force answer, also when the points come in many chunks and without any candidate list."""
    rng = np.random.default_rng(10 + k)
    s, a = dataset(rng)
    nn = JointNearestNeighbour(s, a, beta=2.0, k=k, search="brute")
    assert nn.cand is None and nn._joint_tree is None  # nothing built
    qi = rng.integers(0, len(s), 256)
    qi[:10] = np.arange(100, 110)  # duplicated states
    pi = torch.from_numpy(np.clip(a[qi] + rng.normal(0, spread, a[qi].shape), -1, 1)).float()
    ref_idx, ref_d2, all_d2 = brute_force(s, a, 2.0, qi, pi.double().numpy(), k)
    for chunk_bytes in (None, 8 * 256 * 100):  # one chunk; 40 chunks of 100 points
        q = torch.cat([nn.scaled[torch.from_numpy(qi)], pi.double()], 1)
        idx, d2 = nn._brute(q, chunk_bytes)
        np.testing.assert_allclose(d2.numpy(), ref_d2, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(all_d2[np.arange(len(qi)), idx.numpy()], ref_d2, rtol=1e-12, atol=1e-14)
        assert (idx.numpy() == ref_idx).mean() > 0.9
    idx2, d2b = nn.query(torch.from_numpy(qi), pi)  # the query API: same answer
    np.testing.assert_allclose(d2b.numpy(), ref_d2, rtol=1e-12, atol=1e-14)
    assert nn.brute_rescans == 0  # no near-ties in these data: the error bound never sent a row to the rescan


@pytest.mark.parametrize("k", [1, 3])
def test_brute_search_rescans_rows_whose_kth_neighbour_ties_beyond_the_kept_set(k):
    """Exact copies of one (s, a) pair (30 inside one chunk, 30 across a chunk boundary) and queries on them:
    the error bound cannot tell the copies apart, so those rows are scanned again in the difference form."""
    rng = np.random.default_rng(4)
    s, a = dataset(rng, n=2000)
    s[500:530], a[500:530] = s[500], a[500]
    s[390:420], a[390:420] = s[390], a[390]  # chunks of 400 points below: 390-399 | 400-419
    nn = JointNearestNeighbour(s, a, beta=2.0, k=k, search="brute")
    qi = np.array([500, 7, 1500, 390])
    pi = torch.from_numpy(a[qi] + 0.01).float()
    q = torch.cat([nn.scaled[torch.from_numpy(qi)], pi.double()], 1)
    idx, d2 = nn._brute(q, chunk_bytes=8 * 4 * 400)
    _, ref_d2, all_d2 = brute_force(s, a, 2.0, qi, pi.double().numpy(), k)
    np.testing.assert_allclose(d2.numpy(), ref_d2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(all_d2[np.arange(4), idx.numpy()], ref_d2, rtol=1e-12, atol=1e-14)
    assert nn.brute_rescans == 2  # the two tied rows, not the others


@pytest.mark.parametrize("k", [1, 3])
def test_lists_with_the_scan_fallback_equal_brute_force(k):
    """The GPU's lists search (uncertified rows answered by the exact scan instead of the KD-tree), here on
    the CPU: the same exact answers, and the far rows did take the fallback."""
    rng = np.random.default_rng(20 + k)
    s, a = dataset(rng)
    nn = JointNearestNeighbour(s, a, beta=2.0, k=k, num_candidates=16, fallback="scan")
    assert nn.fallback == "scan" and nn.cand is not None and nn._joint_tree is None
    qi = rng.integers(0, len(s), 256)
    spread = np.where(np.arange(256) % 2 == 0, 0.01, 2.0)[:, None]  # half near the data, half far
    pi = torch.from_numpy(np.clip(a[qi] + rng.normal(0, 1.0, a[qi].shape) * spread, -1, 1)).float()
    idx, d2 = nn.query(torch.from_numpy(qi), pi)
    _, ref_d2, all_d2 = brute_force(s, a, 2.0, qi, pi.double().numpy(), k)
    np.testing.assert_allclose(d2.numpy(), ref_d2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(all_d2[np.arange(len(qi)), idx.numpy()], ref_d2, rtol=1e-12, atol=1e-14)
    assert 0.0 < nn.last_certified < 1.0 and nn._joint_tree is None  # some rows scanned; no tree built
    i2, d2b = nn.query(None, pi, nn.scaled[torch.from_numpy(qi)])  # no row indices: the scan answers
    np.testing.assert_allclose(d2b.numpy(), ref_d2, rtol=1e-12, atol=1e-14)


def test_brute_search_trains_the_lists_run_bit_for_bit_and_search_key_is_checked():
    from alignreg.config import ConfigError
    from alignreg.offline.datasets import OfflineData
    from alignreg.offline.td3 import TD3Learner

    rng = np.random.default_rng(8)
    s, a = dataset(rng, n=3000, S=5, A=2)
    data = OfflineData({"observations": s, "actions": a, "next_observations": np.roll(s, -1, 0),
                        "rewards": rng.normal(size=len(s)).astype(np.float32), "terminals": np.zeros(len(s), bool)})
    actors = []
    for search in ("lists", "brute"):
        torch.manual_seed(0)
        terms = build_regularizers([RegularizerConfig(name="prdc", params={"num_candidates": 8, "search": search})],
                                   hooks=("actor_penalty",))
        L = TD3Learner(data.state_dim, data.action_dim, actor_hidden=[32, 32], critic_hidden=[32, 32], penalties=terms)
        L.setup(OfflineSetup(data.states_np, data.actions_np, data.state_dim, data.action_dim, 1.0, 0))
        assert terms.terms[0].term.index.search == search
        gen = torch.Generator().manual_seed(1)
        for _ in range(40):
            L.train_step(data.sample(64, gen))
        actors.append(L.actor.state_dict())
    for n, p in actors[0].items():
        assert torch.equal(p, actors[1][n]), n
    # auto on a CPU learner: the lists
    term = build_regularizers([RegularizerConfig(name="prdc", params={"num_candidates": 8})], hooks=("actor_penalty",)).terms[0].term
    term.setup(OfflineSetup(data.states_np, data.actions_np, data.state_dim, data.action_dim, 1.0, 0, "cpu"))
    assert term.index.search == "lists" and term.index.cand is not None
    with pytest.raises(ConfigError, match="search: unknown search 'gpu'; valid choices: auto, lists, brute"):
        build_regularizers([RegularizerConfig(name="prdc", params={"search": "gpu"})], hooks=("actor_penalty",))
