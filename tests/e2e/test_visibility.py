"""Visibility across the mesh in the lab: every node's flows through each cluster's relay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from plexus.cni.ops import in_netns
from plexus.lab import ops
from plexus.lab.lab import Lab, State
from plexus.lab.topology import pod_netns
from tests.e2e.labs import apply_in, plexus
from tests.support import ECHO_CLIENT, echo, echo_server, wait_until

SERVICE = """
apiVersion: v1
kind: Service
metadata:
  name: vweb
  namespace: default
  annotations: {service.cilium.io/global: "true", service.cilium.io/affinity: none}
spec:
  clusterIP: VIP
  selector: {app: vweb}
  ports:
    - {name: tcp, port: 80, targetPort: 8080, protocol: TCP}
"""
EAST_VIP, WEST_VIP = "10.96.1.30", "10.96.2.30"
POLICY = """apiVersion: plexus.io/v1
kind: PlexusNetworkPolicy
metadata: {name: vweb-from-vclient, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: vweb}}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: vclient}
      toPorts:
        - ports: [{port: 8080, protocol: TCP}]
"""



@pytest.fixture(scope="module")
def traffic(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A web pod in east behind a global service, an allowed and a denied client in west."""
    tmp = tmp_path_factory.mktemp("visibility")
    lab.pod_add("east", "n1", "vweb", {"app": "vweb"})
    lab.pod_add("west", "n1", "vcl", {"app": "vclient"})
    lab.pod_add("west", "n2", "vbad", {"app": "vbad"})
    for cluster, vip in (("east", EAST_VIP), ("west", WEST_VIP)):
        r = apply_in(cluster, SERVICE.replace("VIP", vip), tmp)
        assert r.returncode == 0, r.stderr
    r = apply_in("east", POLICY, tmp)
    assert r.returncode == 0, r.stderr
    nss = {name: pod_netns(lab.topo.node(c, n), name) for name, c, n in
           (("vweb", "east", "n1"), ("vcl", "west", "n1"), ("vbad", "west", "n2"))}
    with ExitStack() as stack:
        stack.enter_context(echo_server(nss["vweb"], "tcp", 8080))
        wait_until(lambda: echo(nss["vcl"], "tcp", WEST_VIP, 80, "x", timeout=1), 60,
                   what="west client reaches the east service")
        yield nss


def relay_flows(cluster: str, *filters: str, last: int = 1000) -> list[dict[str, Any]]:
    r = plexus("observe", "--lab", cluster, "--last", str(last), "-o", "json", *filters)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_relay_shows_both_ends_of_a_west_pod_to_east_service_flow(lab: Lab, traffic: dict[str, str]) -> None:
    assert echo(traffic["vcl"], "tcp", WEST_VIP, 80, "both ends")
    assert not echo(traffic["vbad"], "tcp", WEST_VIP, 80, "denied", timeout=1)

    def both_ends() -> bool:
        docs = relay_flows("east", "--pod", "default/vweb")
        nodes = {(d["flow"]["node_name"], d["flow"]["verdict"], d["flow"]["traffic_direction"])
                 for d in docs if "flow" in d}
        return {("west/n1", "TRANSLATED", "EGRESS"), ("west/n1", "FORWARDED", "EGRESS"),
                ("east/n1", "FORWARDED", "INGRESS"), ("east/n1", "DROPPED", "INGRESS")} <= nodes

    wait_until(both_ends, 30, what="both ends' verdicts through east's relay")
    docs = [d for d in relay_flows("east", "--pod", "default/vweb") if "flow" in d]
    flows = [d["flow"] for d in docs]
    # merged in time order
    assert [f["time"] for f in flows] == sorted(f["time"] for f in flows)
    translated = next(f for f in flows if f["verdict"] == "TRANSLATED")
    assert translated["source"]["pod_name"] == "vcl" and translated["source"]["cluster_name"] == "west"
    assert translated["destination"]["pod_name"] == "vweb"
    assert translated["destination"]["cluster_name"] == "east"
    assert translated["destination_service"] == {"name": "vweb", "namespace": "default"}
    denied = next(f for f in flows if f["verdict"] == "DROPPED")
    assert denied["node_name"] == "east/n1" and denied["drop_reason_desc"] == "POLICY_DENIED"
    assert denied["source"]["pod_name"] == "vbad" and denied["source"]["cluster_name"] == "west"
    assert denied["l4"]["TCP"]["destination_port"] == 8080

    # west's relay sees the same mesh; filters work through it
    west = relay_flows("west", "--verdict", "DROPPED", "--from-pod", "default/vbad")
    assert west and all(d["flow"]["source"]["pod_name"] == "vbad" for d in west)
    compact = plexus("observe", "--lab", "west", "--last", "5", "--to-pod", "default/vweb")
    assert compact.returncode == 0 and "default/vweb" in compact.stdout, compact.stderr

    r = plexus("relay", "status", "--lab", "east", "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    st = json.loads(r.stdout)
    assert st["connected"] == 4 and {n["name"] for n in st["nodes"]} == {
        "east/n1", "east/n2", "west/n1", "west/n2"}
    assert st["flows"] >= len(flows) and st["lost"] == 0


def test_a_down_node_is_reported_not_fatal(lab: Lab, traffic: dict[str, str]) -> None:
    state = State.load(lab.state_path)
    agent = state.processes["agent-west-n2"]
    ops.stop(agent.pid, agent.marker)
    try:
        def west_n2_down() -> bool:
            st = json.loads(plexus("relay", "status", "--lab", "east", "-o", "json").stdout)
            states = {n["name"]: n["state"] for n in st["nodes"]}
            return states.get("west/n2") == "down" and st["connected"] == 3
        wait_until(west_n2_down, 30, what="west/n2 reported down, the others connected")
        r = plexus("relay", "status", "--lab", "east")
        assert r.returncode == 1 and "west/n2" in r.stdout and "down" in r.stdout
        # the others still stream
        assert echo(traffic["vcl"], "tcp", WEST_VIP, 80, "still")
        before = len(relay_flows("east", "--from-pod", "default/vcl"))
        assert echo(traffic["vcl"], "tcp", WEST_VIP, 80, "again")
        wait_until(lambda: len(relay_flows("east", "--from-pod", "default/vcl")) > before, 15,
                   what="new flows through the relay while a node is down")
    finally:
        lab.start("agent-west-n2")

    def all_connected() -> bool:
        st = json.loads(plexus("relay", "status", "--lab", "east", "-o", "json").stdout)
        return bool(st["connected"] == 4)
    wait_until(all_connected, 30, what="west/n2 connected again")




# ---- the web page, in Debian's headless Chromium ----------------------------------------------
RELAY_URL = "http://127.0.0.1:4245/"  # east's relay, on its control plane's loopback
RED = "rgb(214, 40, 40)"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $PLEXUS_SCREENSHOTS, or the test's temporary directory."""
    d = Path(os.environ.get("PLEXUS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def browser(netns: str) -> Iterator[Any]:
    """Chromium and its driver inside `netns` (this thread's sockets too, while it lasts)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    with in_netns(f"/var/run/netns/{netns}"):
        opts = Options()
        opts.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1500,1000", "--no-first-run", "--disable-extensions"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            yield driver
        finally:
            driver.quit()


def rows(driver: Any) -> list[dict[str, str]]:
    got: list[dict[str, str]] = driver.execute_script(
        "return [...document.querySelectorAll('#flows tr.flow')].map(r => ({verdict: r.dataset.verdict, "
        "node: r.dataset.node, source: r.dataset.source, text: r.textContent}))")
    return got


def test_web_page_map_table_red_drops_and_filters(lab: Lab, traffic: dict[str, str], shots: Path) -> None:
    r = plexus("relay", "url", "--lab", "east")
    assert r.returncode == 0 and r.stdout.strip() == RELAY_URL, r.stdout + r.stderr
    assert echo(traffic["vcl"], "tcp", WEST_VIP, 80, "for the page")
    with browser("plx-east-cp") as driver:
        driver.get(RELAY_URL)
        # the lab's clusters and pods, as groups and identities of the map
        def mapped() -> bool:
            got = driver.execute_script(
                "return {groups: [...document.querySelectorAll('#map g.group')].map(g => "
                "g.dataset.cluster + '/' + g.dataset.namespace), names: [...document.querySelectorAll("
                "'#map g.node')].map(n => n.dataset.name), status: document.getElementById('status')"
                ".dataset.connected}")
            return ({"east/default", "west/default"} <= set(got["groups"])
                    and {"vweb", "vclient", "vbad"} <= set(got["names"]) and got["status"] == "4")
        wait_until(mapped, 20, what="the map shows both clusters' pods, the status 4 nodes")
        assert driver.find_elements("css selector", "#map path.edge.FORWARDED")
        assert any("vweb" in r["text"] for r in rows(driver))
        driver.save_screenshot(str(shots / "visibility-map.png"))

        # a denied packet is a red row within a second of the packet itself
        driver.execute_script("""
            window.seenDrop = null;
            new MutationObserver((ms, obs) => {
              for (const m of ms) for (const n of m.addedNodes) {
                if (n.nodeType === 1 && n.dataset && n.dataset.verdict === 'DROPPED' && !window.seenDrop) {
                  window.seenDrop = {at: performance.timeOrigin + performance.now(), time: n.dataset.time,
                                     color: getComputedStyle(n.querySelector('td.verdict')).color};
                  obs.disconnect();
                }
              }
            }).observe(document.getElementById('flows'), {childList: true});""")
        client = subprocess.Popen(["ip", "netns", "exec", traffic["vbad"], sys.executable, "-c", ECHO_CLIENT,
                                   "tcp", WEST_VIP, "80", "denied", "1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: driver.execute_script("return window.seenDrop"), 10, interval=0.05,
                       what="a DROPPED row on the page")
        finally:
            client.wait(15)
        seen = driver.execute_script("return window.seenDrop")
        from bpf.flows import parse_time

        delay = seen["at"] / 1000 - parse_time(seen["time"]) / 1e9
        assert 0 <= delay < 1.0, f"the drop took {delay:.3f}s from packet to page"
        assert seen["color"] == RED
        driver.save_screenshot(str(shots / "visibility-drop.png"))

        # a filter narrows the table (the CLI's flags)
        everything = rows(driver)
        box = driver.find_element("id", "filter")
        box.clear()
        box.send_keys("--from-pod default/vcl --not --verdict TRANSLATED")
        driver.find_element("id", "apply").click()

        def narrowed() -> bool:
            rs = rows(driver)
            return bool(rs) and all(r["source"].endswith("default/vcl") and r["verdict"] != "TRANSLATED"
                                    for r in rs)
        wait_until(narrowed, 10, what="only vcl's non-translation flows")
        assert len(rows(driver)) < len(everything)
        driver.save_screenshot(str(shots / "visibility-filtered.png"))

        # a bad filter is refused with the reason, as the CLI refuses it
        box.clear()
        box.send_keys("--ip not-an-ip")
        driver.find_element("id", "apply").click()
        wait_until(lambda: "not an IP" in driver.find_element("id", "filter-error").text, 10,
                   what="the relay's reason shown")

        # clicking a red edge filters on its two ends and its verdict
        driver.find_element("id", "clear").click()
        wait_until(lambda: driver.find_elements("css selector", "#map path.edge.DROPPED"), 10,
                   what="a red edge")
        edge = driver.find_element("css selector", "#map path.edge.DROPPED")
        driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", edge)
        wait_until(lambda: rows(driver) and all(r["verdict"] == "DROPPED" for r in rows(driver)), 10,
                   what="only the edge's drops")
        assert "--verdict DROPPED" in driver.find_element("id", "filter").get_attribute("value")
        assert "--from-identity" in driver.find_element("id", "filter").get_attribute("value")
