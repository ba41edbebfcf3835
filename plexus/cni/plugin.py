"""The CNI plugin: ADD, DEL, CHECK, VERSION (spec 1.0).

Runs per pod in the node's network namespace, as a container runtime calls it: the
command and the pod in environment variables, the network config as JSON on stdin, the
result (or a spec error with a code) as JSON on stdout. Imports stay light: it starts once
per pod.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plexus.cni import errors as E
from plexus.cni import ops
from plexus.cni.errors import CniError
from plexus.cni.ipam import Ipam
from plexus.core.client import Client, ClientError

SUPPORTED_VERSIONS = ["0.4.0", "1.0.0"]
CONFIG_FIELDS = {"cniVersion", "name", "type", "agentSocket", "args", "prevResult",
                 "runtimeConfig", "capabilities", "ipam", "dns", "mtu", "cniVersions",
                 "disableCheck"}
CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?$")


@dataclass
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    config: dict[str, Any]
    cni_args: dict[str, str] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(self.config.get("cniVersion", "1.0.0"))

    @property
    def namespace(self) -> str:
        return self.cni_args.get("K8S_POD_NAMESPACE", "default")

    @property
    def pod_name(self) -> str:
        return self.cni_args.get("K8S_POD_NAME", self.container_id[:12])

    def labels(self) -> dict[str, str]:
        labels = ((self.config.get("args") or {}).get("plexus") or {}).get("labels") or {}
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise CniError(E.INVALID_CONFIG, "args.plexus.labels must be a map of strings")
        for k, v in labels.items():
            if not NAME_RE.match(k.split("/")[-1]) or (v and not NAME_RE.match(v)):
                raise CniError(E.INVALID_CONFIG, f"invalid label {k}={v}")
        return dict(labels)


def _env(name: str, required: bool = True) -> str:
    value = os.environ.get(name, "")
    if required and not value:
        raise CniError(E.INVALID_ENV, f"environment variable {name} is missing")
    if any(ord(c) < 0x20 for c in value):
        raise CniError(E.INVALID_ENV, f"environment variable {name} has control characters")
    return value


def parse_cni_args(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, raw.split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(E.INVALID_ENV, f"CNI_ARGS entry {part!r} is not KEY=VALUE")
        out[key] = value
    for key in ("K8S_POD_NAMESPACE", "K8S_POD_NAME"):
        if key in out and not NAME_RE.match(out[key]):
            raise CniError(E.INVALID_ENV, f"CNI_ARGS {key}={out[key]!r} is not a valid name")
    return out


def read_request(stdin: str) -> Request:
    command = _env("CNI_COMMAND")
    try:
        config = json.loads(stdin) if stdin.strip() else None
    except ValueError as e:
        raise CniError(E.DECODE_FAILURE, "network configuration is not valid JSON", str(e)) from None
    if not isinstance(config, dict):
        raise CniError(E.DECODE_FAILURE, "network configuration must be a JSON object")
    version = config.get("cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(E.INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    if command == "VERSION":
        return Request(command, "", "", "", config)
    unknown = sorted(set(config) - CONFIG_FIELDS)
    if unknown:
        raise CniError(E.INVALID_CONFIG, f"unknown network config field(s): {', '.join(unknown)}")
    for key in ("name", "type", "agentSocket"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise CniError(E.INVALID_CONFIG, f"network config field {key} must be a non-empty string")
    if command not in ("ADD", "DEL", "CHECK"):
        raise CniError(E.INVALID_ENV, f"CNI_COMMAND {command!r} is not supported",
                       "supported: ADD, DEL, CHECK, VERSION")
    container_id = _env("CNI_CONTAINERID")
    if not CONTAINER_ID_RE.match(container_id):
        raise CniError(E.INVALID_ENV, f"CNI_CONTAINERID {container_id!r} has invalid characters")
    ifname = _env("CNI_IFNAME")
    if len(ifname) > 15 or "/" in ifname or not ifname.isprintable() or " " in ifname:
        raise CniError(E.INVALID_ENV, f"CNI_IFNAME {ifname!r} is not a valid interface name")
    netns = _env("CNI_NETNS", required=command != "DEL")
    return Request(command, container_id, netns, ifname, config,
                   parse_cni_args(_env("CNI_ARGS", required=False)))


def _agent(req: Request) -> tuple[Client, dict[str, Any]]:
    client = Client(req.config["agentSocket"], timeout=10)
    try:
        node = client.get("/v1/node")
    except ClientError as e:
        raise CniError(E.AGENT_UNAVAILABLE, "the Plexus agent is not reachable", str(e)) from None
    return client, node


def _result(req: Request, link: ops.PodLink | None, ip: str) -> dict[str, Any]:
    return {
        "cniVersion": req.version,
        "interfaces": [
            {"name": link.host_ifname if link else "", "mac": link.host_mac if link else ""},
            {"name": req.ifname, "mac": link.pod_mac if link else "", "sandbox": req.netns},
        ],
        "ips": [{"address": f"{ip}/32", "gateway": ops.GATEWAY, "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": ops.GATEWAY}],
        "dns": {},
    }


def cmd_add(req: Request) -> dict[str, Any]:
    labels = req.labels()
    if not os.path.exists(req.netns):
        raise CniError(E.INVALID_ENV, f"CNI_NETNS {req.netns} does not exist")
    client, node = _agent(req)
    ipam = Ipam(Path(node["stateDir"]) / "ipam", node["pod_cidr"])
    ip = ipam.allocate(req.container_id, req.ifname)
    host_if = ops.host_ifname(req.container_id, req.ifname)
    try:
        link = ops.add(req.netns, req.ifname, host_if, ip, int(node.get("mtu", 1500)))
        try:
            client.post("/v1/endpoints", {
                "container_id": req.container_id, "ip": ip, "namespace": req.namespace,
                "pod_name": req.pod_name, "labels": labels, "host_ifname": host_if,
                "netns": req.netns, "ifname": req.ifname})
        except ClientError as e:
            code = E.AGENT_REFUSED if e.status >= 400 else E.AGENT_UNAVAILABLE
            raise CniError(code, "the agent did not register the endpoint", str(e)) from None
    except BaseException:
        ops.remove(host_if)
        ipam.release(req.container_id, req.ifname)
        raise
    return _result(req, link, ip)


def cmd_del(req: Request) -> None:
    host_if = ops.host_ifname(req.container_id, req.ifname)
    ops.remove(host_if)
    client = Client(req.config["agentSocket"], timeout=10)
    try:
        node = client.get("/v1/node")
    except ClientError as e:
        # Without the agent we cannot find the IPAM store or deregister: the runtime
        # retries DEL, so say "try again" rather than leak the address.
        raise CniError(E.TRY_AGAIN_LATER, "the Plexus agent is not reachable", str(e)) from None
    Ipam(Path(node["stateDir"]) / "ipam", node["pod_cidr"]).release(req.container_id, req.ifname)
    client.delete(f"/v1/endpoints/{req.container_id}")


def cmd_check(req: Request) -> None:
    client, node = _agent(req)
    ip = Ipam(Path(node["stateDir"]) / "ipam", node["pod_cidr"]).lookup(req.container_id, req.ifname)
    if ip is None:
        raise CniError(E.UNKNOWN_CONTAINER, f"container {req.container_id} has no address")
    prev = req.config.get("prevResult") or {}
    prev_ips = [str(ipaddress.ip_interface(i["address"]).ip) for i in prev.get("ips", [])
                if isinstance(i, dict) and "address" in i]
    problems = ops.check(req.netns, req.ifname, ops.host_ifname(req.container_id, req.ifname), ip)
    if prev_ips and ip not in prev_ips:
        problems.append(f"prevResult says {prev_ips}, IPAM holds {ip}")
    registered = {e["container_id"]: e for e in client.get("/v1/endpoints")}
    if req.container_id not in registered:
        problems.append("endpoint is not registered with the agent")
    elif registered[req.container_id]["ip"] != ip:
        problems.append(f"agent has {registered[req.container_id]['ip']}, IPAM holds {ip}")
    if problems:
        raise CniError(E.NETLINK_FAILURE, "pod network is not as configured", "; ".join(problems))


def run(stdin: str) -> tuple[int, dict[str, Any] | None]:
    version = "1.0.0"
    try:
        req = read_request(stdin)
        version = req.version
        if req.command == "VERSION":
            return 0, {"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}
        if req.command == "ADD":
            return 0, cmd_add(req)
        if req.command == "DEL":
            cmd_del(req)
        else:
            cmd_check(req)
        return 0, None
    except CniError as e:
        return 1, e.as_dict(version)
    except ClientError as e:
        return 1, CniError(E.AGENT_UNAVAILABLE, "agent request failed", str(e)).as_dict(version)
    except Exception as e:  # never a traceback instead of a spec error
        return 1, CniError(E.IO_FAILURE, f"{type(e).__name__}: {e}").as_dict(version)


def main() -> int:
    code, out = run(sys.stdin.read())
    if out is not None:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    return code
