"""How a WireGuard device outage is kept and shown: counts, since when, the last outage."""

from __future__ import annotations

from typing import Any

from encryption.module import DeviceHealth
from plexus.commands.encrypt import _render


def shown(health: DeviceHealth) -> str:
    status: dict[str, Any] = {
        "enabled": True, "backend": "userspace (wireguard-go)", "device": "plx_wg0", "port": 51871,
        "mtu": 1420, "strict": True, "publicKey": "k" * 43 + "=", "peers": [], "refused": {},
        "deviceHealth": health.as_dict()}
    return _render(status)


def test_an_outage_is_shown_while_it_lasts_and_kept_once_over() -> None:
    health = DeviceHealth()
    assert health.as_dict() | {"lastOutage": None} == {
        "up": True, "downSince": None, "restarts": 0, "outages": 0, "lastOutage": None,
        "lastError": ""}
    assert "device up  restarts 0" in shown(health)

    outage = health.went_down("device gone")
    health.last_error = "BackendUnavailable: wireguard-go exited with 1"
    now = health.as_dict()
    assert now["up"] is False and now["downSince"] == outage.since and now["outages"] == 1
    assert now["lastOutage"]["until"] is None and now["lastOutage"]["reason"] == "device gone"
    text = shown(health)
    assert "device DOWN since" in text and "restart failing: BackendUnavailable" in text

    health.came_back()
    after = health.as_dict()
    assert after["up"] is True and after["restarts"] == 1 and after["lastError"] == ""
    assert after["lastOutage"]["until"] >= after["lastOutage"]["since"]
    assert "device up  restarts 1  last outage" in shown(health)
