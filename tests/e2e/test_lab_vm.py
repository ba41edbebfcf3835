"""The lab's VM (plx-vm1, 172.31.3.10) enrolled into east: known to every node of both clusters,
a WireGuard peer of each, only WireGuard between it and pods on the wire, policy on its uplink
and its WireGuard device, withdrawn when silent and back on return, gone when revoked, and
bundles that must be refused refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from plexus.core.client import Client, ClientError
from plexus.lab import ops
from plexus.lab.lab import VM_LEASE, Lab, State
from plexus.lab.topology import pod_netns
from tests.e2e.labs import apply_in, plexus
from tests.support import echo, echo_server, wait_until

VM_NS = "plx-vm1"
VM_IP = "172.31.3.10"
MARKER = "PLEXUS-VM-SECRET-MARKER"

VM_POLICY = """
apiVersion: plexus.io/v1
kind: PlexusNetworkPolicy
metadata: {name: db-from-west-clients, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: vmclient, io.cilium.k8s.policy.cluster: west}}]
      toPorts: [{ports: [{port: 5432, protocol: TCP}]}]
"""



def vm(lab: Lab) -> Any:
    return lab.topo.vms[0]


def vm_status(lab: Lab) -> dict[str, Any]:
    return dict(Client(lab.vm_socket(vm(lab)), timeout=5).get("/v1/vm"))


def listed() -> dict[str, dict[str, Any]]:
    r = plexus("vm", "list", "-o", "json")
    assert r.returncode == 0, r.stderr
    return {row["name"]: row for row in json.loads(r.stdout)}


def known_by(lab: Lab) -> dict[str, int | None]:
    """Per node of both clusters: the VM's identity in its ipcache (None: not there)."""
    out: dict[str, int | None] = {}
    for n in lab.topo.nodes():
        rows = Client(lab.socket(n), timeout=5).get("/v1/clustermesh/tables/endpoints")
        out[n.key] = next((r["identity"] for r in rows if r["ip"] == VM_IP), None)
    return out


def test_the_vm_is_enrolled_and_every_node_of_both_clusters_knows_it(lab: Lab) -> None:
    row = listed()["vm1"]
    assert (row["cluster"], row["ip"], row["state"]) == ("east", VM_IP, "joined")
    assert row["labels"] == {"app": "db", "env": "lab"}
    ident = row["identity"]
    assert ident is not None and 1 << 16 <= ident < 2 << 16  # east's identity range
    assert set(known_by(lab).values()) == {ident}
    # a WireGuard peer of every node, and every node one of its peers
    for n in lab.topo.nodes():
        st = Client(lab.socket(n), timeout=5).get("/v1/encryption/status")
        peer = next(p for p in st["peers"] if p["node"] == "east/vm1")
        assert peer["endpoint"].startswith(VM_IP) and f"{VM_IP}/32" in peer["allowedIPs"]
    r = plexus("status", "--socket", str(lab.vm_socket(vm(lab))))
    assert r.returncode == 0 and "vmagent" in r.stdout and "joined" in r.stdout, r.stderr
    st = Client(lab.vm_socket(vm(lab)), timeout=5).get("/v1/encryption/status")
    assert {p["node"] for p in st["peers"]} == {n.key.replace("-", "/") for n in lab.topo.nodes()}
    # its key material is its own and private
    for f in ("etcd/client.key", "vmagent.yaml", "bundle.yaml"):
        assert os.stat(lab.vm_dir(vm(lab)) / f).st_mode & 0o777 == 0o600, f


@contextmanager
def vm_leg_capture(lab: Lab, name: str) -> Iterator[Callable[[], tuple[str, str]]]:
    """tcpdump on the router's leg to the VM; yields a reader of (payload text, headers)."""
    host = vm(lab)
    path = lab.root / f"{name}-{host.router_link}.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", "plx-router", "tcpdump", "--immediate-mode",
                             "-Z", "root", "-i", host.router_link, "-n", "-U", "-s", "0", "-w",
                             str(path)], stderr=subprocess.DEVNULL)
    try:
        def capturing() -> bool:
            ops.run("ping", "-c", "1", "-W", "1", host.segment.gateway, ns=VM_NS, check=False)
            return path.exists() and path.stat().st_size > 24

        wait_until(capturing, 15, what="tcpdump capturing")

        def read() -> tuple[str, str]:
            text = subprocess.run(["tcpdump", "-r", str(path), "-n", "-A"], capture_output=True,
                                  text=True, errors="replace").stdout
            headers = subprocess.run(["tcpdump", "-r", str(path), "-n"], capture_output=True,
                                     text=True).stdout
            return text, headers

        yield read
    finally:
        dump.terminate()
        dump.wait(10)


def test_a_policy_selecting_app_db_admits_the_west_client_and_no_other(lab: Lab,
                                                                       tmp_path: Path) -> None:
    lab.pod_add("west", "n1", "vmcl", {"app": "vmclient"})
    lab.pod_add("west", "n2", "vmother", {"app": "vmother"})
    client = pod_netns(lab.topo.node("west", "n1"), "vmcl")
    other = pod_netns(lab.topo.node("west", "n2"), "vmother")
    with echo_server(VM_NS, "tcp", 5432):
        assert wait_until(lambda: echo(other, "tcp", VM_IP, 5432, "x", timeout=1), 30,
                          what="open before any policy selects the VM")
        r = apply_in("east", VM_POLICY, tmp_path)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: not echo(other, "tcp", VM_IP, 5432, "x", timeout=1), 30,
                   what="the other west pod denied once the VM is selected")
        client_ip = lab.pods()[client]["ip"]
        # both ways between the pod and the VM, only WireGuard on the wire; the VM's policy
        # judged what its WireGuard device decrypted
        with vm_leg_capture(lab, "vm-wire") as read:
            assert echo(client, "tcp", VM_IP, 5432, MARKER)
            assert not echo(other, "tcp", VM_IP, 5432, MARKER, timeout=1)
            with echo_server(client, "udp", 7003):
                assert wait_until(partial(echo, VM_NS, "udp", client_ip, 7003, MARKER), 15,
                                  what="the VM reaches the west pod")
        text, headers = read()
        assert MARKER not in text
        assert "51871: UDP" in headers, headers.splitlines()[:20]
        for ip in (client_ip, lab.pods()[other]["ip"]):
            assert f" {ip}." not in headers and f" {ip} " not in headers, ip
        # the host's datapath shows it: conntrack has the client's connection
        r = plexus("bpf", "ct", "list", "--socket", str(lab.vm_socket(vm(lab))), "-o", "json")
        assert r.returncode == 0, r.stderr
        assert lab.pods()[client]["ip"] in r.stdout
        # the VM itself still reaches the mesh (its agent, WireGuard) under the policy
        assert vm_status(lab)["state"] == "joined"
    plexus("delete", "-f", str(next(tmp_path.glob("*.yaml"))), "--lab", "east")


VM_SERVICE = """
apiVersion: v1
kind: Service
metadata:
  name: vmlb
  namespace: default
  annotations: {service.cilium.io/global: "true", service.cilium.io/affinity: none}
spec:
  clusterIP: 10.96.1.30
  selector: {app: vmlb}
  ports:
    - {name: tcp, port: 80, targetPort: 8080, protocol: TCP}
"""


def test_the_vm_reaches_a_global_service_with_backends_in_both_clusters(lab: Lab,
                                                                       tmp_path: Path) -> None:
    from contextlib import ExitStack

    from tests.support import whoami, whoami_server

    backends = {"vmlbe": ("east", "n2"), "vmlbw": ("west", "n1")}
    ips = {name: lab.pod_add(c, n, name, {"app": "vmlb"})["ip"] for name, (c, n) in backends.items()}
    with ExitStack() as stack:
        for name, (c, n) in backends.items():
            stack.enter_context(whoami_server(pod_netns(lab.topo.node(c, n), name), "tcp", 8080,
                                              name))
        for cluster in ("east", "west"):
            r = apply_in(cluster, VM_SERVICE, tmp_path)
            assert r.returncode == 0, r.stderr
        seen: set[str | None] = set()

        def more() -> bool:
            for conn in whoami(VM_NS, "tcp", "10.96.1.30", 80, conns=8, timeout=1):
                seen.update(conn)
            return set(backends) <= seen

        wait_until(more, 60, interval=0.5, what="the VM's connections to both clusters' backends")
        assert seen - {None} == set(backends)
        # translated on the VM's WireGuard device: requests and replies cross the wire encrypted
        with vm_leg_capture(lab, "vm-service") as read:
            answered = [c for c in whoami(VM_NS, "tcp", "10.96.1.30", 80, conns=8, timeout=1) if c[0]]
        text, headers = read()
        assert answered, "the VM's connections to the service while capturing"
        assert not [name for name in backends if name in text], "a backend's answer in the clear"
        assert "51871: UDP" in headers, headers.splitlines()[:20]
        for ip in ("10.96.1.30", *ips.values()):
            assert f" {ip}." not in headers and f" {ip} " not in headers, (ip, headers.splitlines()[:20])


def test_forged_expired_and_foreign_bundles_are_refused_on_the_host(lab: Lab, tmp_path: Path) -> None:
    good = lab.vm_dir(vm(lab)) / "bundle.yaml"
    data = yaml.safe_load(good.read_text())
    data["labels"] = {"app": "web"}
    forged = tmp_path / "forged.yaml"
    forged.write_text(yaml.safe_dump(data))
    os.chmod(forged, 0o600)
    r = subprocess.run(["ip", "netns", "exec", VM_NS, *_plexus_argv(), "vm", "join", str(forged),
                        "--state-dir", str(tmp_path / "s")], capture_output=True, text=True)
    assert r.returncode == 2 and "signature: does not match" in r.stderr, r.stderr
    r = subprocess.run(["ip", "netns", "exec", VM_NS, *_plexus_argv(), "vm", "join", str(good),
                        "--name", "vm2", "--state-dir", str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not 'vm2'" in r.stderr, r.stderr
    # a bundle for this VM on another host: its address is not there
    r = subprocess.run(["ip", "netns", "exec", "plx-ext", *_plexus_argv(), "vm", "join", str(good),
                        "--state-dir", str(tmp_path / "s")], capture_output=True, text=True)
    assert r.returncode == 2 and "is no address of this host" in r.stderr, r.stderr
    assert not (tmp_path / "s").exists()
    assert vm_status(lab)["state"] == "joined"


def _plexus_argv() -> list[str]:
    import sys
    return [sys.executable, "-m", "plexus"]


def test_wireguard_restarted_on_the_vm_gets_its_programs_back_and_carries_pod_traffic(
        lab: Lab) -> None:
    device = lab.vm_wg_device(vm(lab))
    pid_file = lab.vm_dir(vm(lab)) / "state" / "wireguard-go.pid"

    def programs() -> str:
        return "".join(ops.run("tc", "filter", "show", "dev", device, hook, ns=VM_NS,
                               check=False).stdout for hook in ("ingress", "egress"))

    def index() -> int:
        out = ops.run("ip", "-o", "link", "show", "dev", device, ns=VM_NS, check=False).stdout
        return int(out.split(":", 1)[0]) if out[:1].isdigit() else 0

    assert "from_pod_l3" in programs() and "to_pod_l3" in programs()
    before, old = index(), int(pid_file.read_text())
    os.kill(old, signal.SIGKILL)  # the lab's VM's wireguard-go, by the pid its agent recorded
    # its agent starts it again: a new device, with a new index, and its programs on it
    wait_until(lambda: index() not in (0, before) and "from_pod_l3" in programs()
               and "to_pod_l3" in programs(), 20, interval=0.2,
               what=lambda: f"the new device's programs: {programs()!r}, index {index()}")
    assert int(pid_file.read_text()) != old
    lab.pod_add("west", "n2", "vmwg", {"app": "vmwg"})
    pod = pod_netns(lab.topo.node("west", "n2"), "vmwg")
    with echo_server(VM_NS, "tcp", 5433), vm_leg_capture(lab, "vm-wg-restart") as read:
        assert wait_until(lambda: echo(pod, "tcp", VM_IP, 5433, MARKER, timeout=1), 20,
                          what="the west pod reaches the VM after its WireGuard restarted")
    text, headers = read()
    assert MARKER not in text and "51871: UDP" in headers


def test_the_vm_killed_is_withdrawn_from_both_clusters_within_its_lease_and_comes_back(
        lab: Lab) -> None:
    state = State.load(lab.state_path)
    proc = state.processes["vmagent-vm1"]
    os.kill(proc.pid, signal.SIGKILL)
    wait_until(lambda: set(known_by(lab).values()) == {None}, VM_LEASE + 2, interval=0.2,
               what=f"the silent VM withdrawn from every node within {VM_LEASE} + 2 s")
    assert listed()["vm1"]["state"] == "lost"
    # `plexus lab vm join` starts the agent again (the VM is enrolled: no new bundle)
    bundle = (lab.vm_dir(vm(lab)) / "bundle.yaml").read_bytes()
    r = plexus("lab", "vm", "join", "vm1")
    assert r.returncode == 0 and "VM joined" in r.stdout, r.stdout + r.stderr
    assert (lab.vm_dir(vm(lab)) / "bundle.yaml").read_bytes() == bundle
    assert None not in known_by(lab).values()
    assert listed()["vm1"]["state"] == "joined"
    r = plexus("lab", "vm", "join", "vm9")
    assert r.returncode == 1 and "no lab VM 'vm9'" in r.stderr, r.stderr


def test_zz_the_vm_revoked_cannot_write_and_is_gone_from_the_mesh(lab: Lab) -> None:
    r = plexus("vm", "delete", "vm1", "--cluster", "east")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: set(known_by(lab).values()) == {None}, 15, interval=0.2,
               what="the revoked VM gone from every node")
    assert "vm1" not in listed()
    for n in lab.topo.nodes():
        st = Client(lab.socket(n), timeout=5).get("/v1/encryption/status")
        assert all(p["node"] != "east/vm1" for p in st["peers"]), n.key
    # its certificate no longer writes, or even connects
    d = lab.vm_dir(vm(lab))
    c = lab.topo.cluster("east")
    r = subprocess.run(["ip", "netns", "exec", VM_NS, "etcdctl", "--endpoints", c.etcd_urls[0],
                        "--dial-timeout", "3s", "--command-timeout", "5s", "--cacert",
                        str(d / "etcd" / "ca.crt"), "--cert", str(d / "etcd" / "client.crt"),
                        "--key", str(d / "etcd" / "client.key"), "put",
                        "plexus/vms/v1/east/vm1/host/node", "{}"], capture_output=True, text=True)
    assert r.returncode != 0
    wait_until(lambda: _refused(lab), 30, what="the host's agent reports it")


def _refused(lab: Lab) -> bool:
    try:
        st = vm_status(lab)
    except ClientError:
        return False
    return st["state"] in ("refused", "retrying") and bool(st["lastError"])
