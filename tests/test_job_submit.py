"""`ray job submit` end to end, as a user runs it: a Ray head on 127.0.0.1 with token auth, the jobs/
scripts submitted with `--working-dir .` (mine -> pretrain -> evaluate), shards and Ray Train's run
folders on a file:// URI, MLflow in a sqlite file; a submit without the token is refused.

The head is a real `ray start --head` in its own process group and temp dir; only that group is
stopped (never `ray stop`, which would end every Ray process on the machine). Slow (~2-3 min here).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import msrc_sample

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
LOOPBACK = {"127.0.0.1", "::1"}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_address(text: str) -> tuple[str, int]:
    """'0100007F:1F90' (little-endian words, as /proc/net/tcp writes them) -> ('127.0.0.1', 8080)."""
    import ipaddress

    host, port = text.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address), int(port, 16)


def head_env(token: str | None) -> dict[str, str]:
    """The environment of the head and of an authorised client: RAY_AUTH_MODE set explicitly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    # the venv first on PATH, as in a shell where it is active: the job's `python` is resolved on the head
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", PATH=f"{Path(RAY).parent}:{env.get('PATH', '')}")
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    else:
        env.update(RAY_AUTH_MODE="disabled")
    return env


class Head:
    """A `ray start --head` bound to loopback (see clusters/README.md for the flags), stopped by its group."""

    def __init__(self, tmp: Path, token: str, cpus: int = 2):
        self.tmp, self.token = tmp, token
        self.dashboard = free_port()
        env = {**head_env(token), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # keeps the node IP on loopback
        command = [
            RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--port={free_port()}", f"--dashboard-port={self.dashboard}", f"--ray-client-server-port={free_port()}",
            # fixed defaults (52365, 8080) collide with any other Ray head on the machine: free ports instead
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--num-cpus={cpus}", "--num-gpus=0", f"--temp-dir={tmp}", "--disable-usage-stats",
        ]  # fmt: skip
        t0 = time.monotonic()
        # its own session: every head process (GCS, raylet, dashboard, agents, workers) is in this group
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.pgid = proc.pid
        out, _ = proc.communicate(timeout=180)
        self.start_s = time.monotonic() - t0
        assert proc.returncode == 0, out

    def pids(self) -> list[int]:
        """The live processes of the head's process group (from /proc)."""
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == self.pgid:
                out.append(int(stat.parent.name))
        return out

    def listening(self) -> list[tuple[int, str, int]]:
        """(pid, address, port) of every TCP socket the head's processes listen on (/proc/net/tcp*)."""
        sockets = {}
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A":  # LISTEN
                    sockets[cols[9]] = decode_address(cols[1])
        found = []
        for pid in self.pids():
            try:
                links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            except OSError:
                continue
            for link in links:
                inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
                if inode in sockets:
                    found.append((pid, *sockets[inode]))
        return found

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def stop(self) -> None:
        if self.pgid is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.5)
            if not self.pids():
                return


@pytest.fixture(scope="module")
def head():
    tmp = Path(tempfile.mkdtemp(prefix="dsj", dir="/tmp"))  # short: Ray's socket paths live under it
    h = Head(tmp, secrets.token_hex(32))
    try:
        h.ready_s = wait_for_job_agent(h)
        yield h
    finally:
        h.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for_job_agent(head: Head, timeout: float = 120) -> float:
    """Seconds until the head accepts a job: right after `ray start` its job agent may not be registered
    yet ("No available agent to submit job, please try again later"), as a user also sees."""
    t0 = time.monotonic()
    for attempt in range(1000):
        rc, out, _ = submit(head, f"warm-up-{attempt}", ["-c", "print('ready')"], head.token, timeout=120)
        if rc == 0:
            return time.monotonic() - t0
        assert "No available agent" in out, out[-2000:]
        assert time.monotonic() - t0 < timeout, f"the head accepted no job within {timeout} s: {out[-500:]}"
        time.sleep(3)
    raise AssertionError("unreachable")


def submit(head: Head, job_id: str, args: list[str], token: str | None, timeout: int = 600):
    """`ray job submit --working-dir .` from the repository root; (return code, output, seconds)."""
    command = [
        RAY, "job", "submit", "--address", head.address, "--submission-id", job_id, "--working-dir", ".",
        "--runtime-env-json", '{"excludes": [".venv", "outputs", ".git"]}', "--", "python", *args,
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, env=head_env(token), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def job_status(head: Head, job_id: str) -> str:
    proc = subprocess.run(
        [RAY, "job", "status", "--address", head.address, job_id],
        env=head_env(head.token), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    for line in (proc.stdout + proc.stderr).splitlines():  # "Job 'mine' succeeded", "Job 'x' failed", ...
        if f"Job '{job_id}' " in line:
            return re.sub(r"\x1b\[[0-9;]*m", "", line).rsplit(" ", 1)[-1].upper()
    return proc.stdout + proc.stderr


def test_every_head_service_listens_on_loopback_only(head):
    listening = head.listening()
    print(
        f"\nhead started in {head.start_s:.1f} s, accepted jobs {head.ready_s:.1f} s later; "
        f"{len(listening)} listening sockets: {sorted(listening)}"
    )
    assert len(listening) >= 4  # GCS, raylet, dashboard, client server, agents
    assert {ip for _, ip, _ in listening} <= LOOPBACK, listening


def test_submit_without_the_token_is_refused(head):
    rc, out, _ = submit(head, "no-token", ["-c", "print('ran')"], token=None, timeout=120)
    assert rc != 0
    assert "ran" not in out
    assert any(s in out for s in ("Authentication required", "401", "Unauthenticated", "unauthorized")), out[-2000:]


def test_mine_pretrain_evaluate_through_job_submit(head, tmp_path_factory):
    import torch
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("jobs")
    images = msrc_sample(tmp, 12)
    work, shards, runs = tmp / "work", (tmp / "mined").as_uri(), (tmp / "runs").as_uri()
    common = [f"workdir={work}"]
    timings = {}

    rc, out, timings["mine"] = submit(
        head, "mine", ["jobs/mine.py", "--input", str(images), "--output", shards, "--config", "demo", *common],
        head.token,
    )  # fmt: skip
    assert rc == 0 and job_status(head, "mine") == "SUCCEEDED", out[-3000:]
    assert "mined 12 images, 0 errors" in out
    assert len(list((tmp / "mined" / "shards").glob("*.parquet"))) >= 1

    steps = ["pretrain.steps=20", "pretrain.log_every=5", "pretrain.checkpoint_every=10", "pretrain.warmup_steps=2"]
    rc, out, timings["pretrain"] = submit(
        head, "pretrain",
        ["jobs/pretrain.py", "--config", "demo", "--data", shards, *steps, f"pretrain.storage_path={runs}", *common],
        head.token,
    )  # fmt: skip
    assert rc == 0 and job_status(head, "pretrain") == "SUCCEEDED", out[-3000:]
    # demo asks 1 worker x 2 CPUs; the 2-CPU head keeps one CPU for the ingest instead of hanging
    assert "running with pretrain.cpus_per_worker=1" in out
    assert "pretrained hiergroup for 20 steps" in out
    checkpoint = work / "checkpoints" / "demo"
    state = torch.load(checkpoint / "model.pt", weights_only=True, map_location="cpu")
    assert state and all(torch.is_tensor(v) for v in state.values())
    run_folders = sorted(p.name for p in (tmp / "runs" / "demo").glob("checkpoint_*"))
    assert len(run_folders) >= 1, list((tmp / "runs").rglob("*"))[:20]  # Ray Train wrote to the file:// URI

    rc, out, timings["evaluate"] = submit(
        head, "evaluate",
        ["jobs/evaluate.py", "--checkpoint", str(checkpoint), "--data", "synthetic", "--protocols", "dataset_kmeans",
         "evaluate.baselines=[]", "evaluate.diagnostics=[]", "data.num_images=8", *common],
        head.token,
    )  # fmt: skip
    assert rc == 0 and job_status(head, "evaluate") == "SUCCEEDED", out[-3000:]

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs_by_stage = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            runs_by_stage.setdefault(run.data.tags.get("stage"), []).append(run)
    assert {"mine", "pretrain", "evaluate"} <= set(runs_by_stage), sorted(map(str, runs_by_stage))
    pretrain_run = runs_by_stage["pretrain"][0]
    assert pretrain_run.info.status == "FINISHED"
    assert client.get_metric_history(pretrain_run.info.run_id, "loss")[-1].step == 20
    print("\njob timings (s, submit to SUCCEEDED): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
