"""tc clsact attachment through pyroute2: replace in place, so there is no window."""

from __future__ import annotations

from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from plexus.core.netlink import AGENT_NETNS, Netlink

INGRESS = "ffff:fff2"
EGRESS = "ffff:fff3"
TC_PRIORITY = 1  # of our filter on each clsact hook of a pod's host veth
TC_HANDLE = 1
ARPHRD_NONE = 0xFFFE  # a TUN device's link type: its packets start at the IP header


def ifindex(ifname: str, netlink: Netlink = AGENT_NETNS) -> int | None:
    """One ioctl, not a netlink dump: policy entries look their veth up one by one."""
    return netlink.ifindex(ifname)


Program = tuple[int, str]  # fd and name


def attach(ifname: str, from_pod: Program, to_pod: Program,
           netlink: Netlink = AGENT_NETNS, uplink: bool = False,
           l3: tuple[Program, Program] | None = None) -> int:
    """Attach both programs to a host veth; returns its ifindex. Replacing is atomic.

    `uplink`: the endpoint's own interface (an enrolled host's), where what leaves the
    endpoint passes tc egress, not ingress as on a pod's host-side veth. `l3`: the pair
    to attach instead when the interface has no link header (a TUN device)."""
    with netlink.route() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"interface {ifname} is gone")
        idx = int(found[0])
        if l3 is not None and ipr.get_links(idx)[0]["ifi_type"] == ARPHRD_NONE:
            from_pod, to_pod = l3
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: adopted from a previous run
                raise
        hooks = ((EGRESS, from_pod), (INGRESS, to_pod)) if uplink else \
            ((INGRESS, from_pod), (EGRESS, to_pod))
        for parent, (fd, name) in hooks:
            ipr.tc("replace-filter", "bpf", idx, f":{TC_HANDLE:x}", fd=fd, name=name, parent=parent,
                   classid=1, direct_action=True, prio=TC_PRIORITY)
        return idx


def attach_ingress(ifname: str, program: Program, netlink: Netlink = AGENT_NETNS) -> int:
    """Attach one program to tc ingress of `ifname` (a tunnel device); returns its ifindex."""
    with netlink.route() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"interface {ifname} is gone")
        idx = int(found[0])
        try:
            ipr.tc("add", "clsact", idx)
        except NetlinkError as e:
            if e.code != 17:  # EEXIST: adopted from a previous run
                raise
        fd, name = program
        ipr.tc("replace-filter", "bpf", idx, f":{TC_HANDLE:x}", fd=fd, name=name, parent=INGRESS,
               classid=1, direct_action=True, prio=TC_PRIORITY)
        return idx


def detach(ifname: str, netlink: Netlink = AGENT_NETNS) -> None:
    with netlink.route() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return
        try:
            ipr.tc("del", "clsact", found[0])
        except NetlinkError as e:
            if e.code not in (2, 22):  # nothing attached
                raise


def attached(program: str | bytes, netlink: Netlink = AGENT_NETNS,
             skip: frozenset[str] = frozenset()) -> list[str]:
    """The interfaces (other than `skip`) whose tc ingress runs `program`; a dump of each
    one's filters, so `skip` holds the interfaces known to carry it."""
    if isinstance(program, bytes):
        program = program.decode()
    out = []
    with netlink.route() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name in skip:
                continue
            try:
                filters = ipr.get_filters(index=link["index"], parent=INGRESS)
            except NetlinkError as e:
                if e.code in (2, 19, 22):  # no clsact here, or the link went meanwhile
                    continue
                raise
            if any(_program_name(f) == program for f in filters):
                out.append(str(name))
    return out


def _program_name(tc_filter: Any) -> str | None:
    options = tc_filter.get_attr("TCA_OPTIONS")
    if options is None or not hasattr(options, "get_attr"):
        return None
    name = options.get_attr("TCA_BPF_NAME")
    if isinstance(name, bytes):
        name = name.decode()
    return str(name) if name is not None else None
