"""Two "hosts" on one machine: torchrun --nnodes 2 across two network namespaces joined by a veth pair.

Each namespace has its own network stack and address (the project's own test hosts, made and removed here);
the c10d rendezvous and gloo traffic cross the veth link. The result must equal the one-process run.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dalle_dist.config import build_config
from dalle_dist.train.stages import PriorTrainer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    shutil.which("ip") is None or os.geteuid() != 0,
    reason="needs root and iproute2 for network namespaces (launch/local/install_system_deps.sh)",
)

SUBNET = "10.231.{}"  # a /24 used only inside the two namespaces this test creates


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts():
    tag = f"dd{os.getpid() % 10000}"
    ns, veth = [f"{tag}a", f"{tag}b"], [f"{tag}va", f"{tag}vb"]
    net = SUBNET.format(os.getpid() % 200 + 20)
    addrs = [f"{net}.1", f"{net}.2"]
    try:
        for n in ns:
            sh("ip", "netns", "add", n)
        sh("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, a in zip(ns, veth, addrs):
            sh("ip", "link", "set", v, "netns", n)
            sh("ip", "-n", n, "addr", "add", f"{a}/24", "dev", v)
            sh("ip", "-n", n, "link", "set", v, "up")
            sh("ip", "-n", n, "link", "set", "lo", "up")
        yield list(zip(ns, veth, addrs))
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=30)


def test_two_node_torchrun_across_namespaces(two_hosts, tmp_path):
    steps = 4
    args = ["launch/run.py", "--config", "configs/prior/tiny.yaml", "--parallel.topology", "replicate=2,shard=2",
            "--train.steps", str(steps), "--train.log_every", "1", "--train.progress", "false",
            "--train.out_dir", str(tmp_path / "run")]  # fmt: skip
    head = two_hosts[0][2]
    procs = []
    for i, (ns, veth, addr) in enumerate(two_hosts):
        cmd = ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={veth}", "OMP_NUM_THREADS=1",
               sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--rdzv-id", "e2e", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{head}:29531",
               "--local-addr", addr, "--rdzv-conf", f"is_host={int(i == 0)}", *args]  # fmt: skip
        log = open(tmp_path / f"node{i}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
    for p, log in procs:
        p.wait(timeout=300)
        log.close()
    logs = "\n".join((tmp_path / f"node{i}.log").read_text()[-3000:] for i in range(2))
    assert all(p.returncode == 0 for p, _ in procs), logs

    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    over = {"train.steps": str(steps), "train.progress": "false", "train.out_dir": str(tmp_path / "single")}
    ref = [h["loss"] for h in PriorTrainer(build_config("prior", ["configs/prior/tiny.yaml"], over)).fit()]
    assert losses == pytest.approx(ref, rel=1e-5)
