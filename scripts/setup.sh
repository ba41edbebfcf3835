#!/usr/bin/env bash
# Installs what Plexus needs on Debian 12 (as root) and makes .venv. Idempotent: a second
# run checks and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

DEBS=(
  make etcd-server etcd-client bird2 gobgpd frr wireguard-tools wireguard-go
  python3-bpfcc bpftool clang llvm linux-headers-amd64 libelf1
  iproute2 iputils-ping nftables iptables ipset tcpdump iperf3 ethtool procps psmisc
  python3-venv python3-dev ca-certificates
  chromium chromium-driver fonts-dejavu-core
)

missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  step "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # no recommends: wireguard-tools would otherwise pull a whole kernel image
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian starts etcd, BIRD, gobgpd and FRR as services on install; Plexus runs its own
  # inside namespaces, and nothing of ours listens in the root namespace.
  if [ -d /run/systemd/system ]; then
    systemctl disable --now etcd.service bird.service gobgpd.service frr.service 2>/dev/null || true
  fi
else
  step "Debian packages present"
fi

# bcc compiles against the running kernel's headers; this kernel ships none, so point it
# at Debian's headers (networking programs use only the stable UAPI).
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  if [ -n "$hdr" ] && [ -n "$common" ]; then
    step "kernel $(uname -r) has no headers: bcc will use $hdr"
    mkdir -p "$kdir"
    ln -sfn "$hdr" "$kdir/build"
    ln -sfn "$common" "$kdir/source"
  else
    echo "warning: no kernel headers found for bcc" >&2
  fi
fi

# Pinned BPF maps live on a bpf filesystem; some machines do not mount one.
if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
  step "mounting the bpf filesystem at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# bcc's Python module comes from Debian, so the venv sees system site packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  step "creating .venv (Debian python, system site packages)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.plexus-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  step "installing plexus and its test tools into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
else
  step ".venv up to date"
fi
step "setup done"
