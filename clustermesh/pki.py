"""Certificates and users for a cluster's etcd, and `connect` between two clusters.

Per cluster: a CA; the etcd server certificate (IP SANs of its addresses); `admin` (CN
root: the apiserver and the cluster's own agents); a remote CA and `remote` (CN remote,
issued by the remote CA: what other clusters connect with); `proxy` (CN remote, issued by
the cluster CA: the read-only endpoint's identity towards etcd). etcd runs with
client-certificate auth, so the certificate's CN is the etcd user; `etcd_auth_commands`
grants `remote` read access to what ClusterMesh shares and nothing else. etcd trusts only
the cluster CA, so a remote certificate reaches it only through the read-only endpoint
(`clustermesh.etcd_proxy`), which forwards reads and watches and refuses the rest (leases,
compaction, alarms, auth). Private keys are written 0600."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clustermesh.models import CLUSTER_CONFIG_PREFIX, HEARTBEAT_KEY, SYNCED_PREFIX

VALID_DAYS = 3650
REMOTE_USER = "remote"
REMOTE_PORT = 2479  # the read-only endpoint other clusters reach
CRL_FILE = "crl.pem"  # certificates etcd refuses (revoked VMs)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, cluster: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"plexus-{cluster}")])


KeyPair = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, cluster: str,
           *, server_ips: Iterable[str] = (), client: bool = True,
           valid_for: datetime.timedelta = datetime.timedelta(days=VALID_DAYS)) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    ips = [ipaddress.ip_address(i) for i in server_ips]
    if ips:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    b = (x509.CertificateBuilder().subject_name(_name(cn, cluster)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + valid_for)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
    if ips:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(i) for i in ips] + [x509.DNSName("localhost")]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _load_ca(d: Path, stem: str) -> KeyPair:
    key = serialization.load_pem_private_key((d / f"{stem}.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate((d / f"{stem}.crt").read_bytes())


def _make_ca(out: Path, stem: str, cn: str, cluster: str) -> None:
    if (out / f"{stem}.crt").exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn, cluster))
            .issuer_name(_name(cn, cluster)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(out / f"{stem}.key", key)
    _write_cert(out / f"{stem}.crt", cert)


def _issued_by(path: Path, ca_cert: x509.Certificate) -> bool:
    """True when `path` exists and `ca_cert` issued it (a remote certificate made before the
    remote CA existed was issued by the cluster CA, which etcd trusts: it is replaced)."""
    if not path.exists():
        return False
    return x509.load_pem_x509_certificate(path.read_bytes()).issuer == ca_cert.subject


def make_cluster_pki(cluster: str, out: Path, server_ips: list[str],
                     advertise: list[str] | None = None) -> list[Path]:
    """Create (once) the CA, server, admin and remote certificates of `cluster` in `out`.

    `advertise` are the addresses other clusters use (default: every server IP); they go
    into the `endpoints` file that `connect` hands out.
    """
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    _make_ca(out, "ca", f"plexus {cluster} CA", cluster)
    _make_ca(out, "remote-ca", f"plexus {cluster} remote CA", cluster)
    ca = _load_ca(out, "ca")
    remote_ca = _load_ca(out, "remote-ca")
    written = [out / "ca.crt"]
    for name, cn, ips, (ca_key, ca_cert) in (("server", "etcd-server", server_ips, ca),
                                             ("admin", "root", (), ca),
                                             ("proxy", REMOTE_USER, (), ca),
                                             (REMOTE_USER, REMOTE_USER, (), remote_ca)):
        if not _issued_by(out / f"{name}.crt", ca_cert):
            key, cert = _issue(ca_key, ca_cert, cn, cluster, server_ips=ips)
            _write_key(out / f"{name}.key", key)
            _write_cert(out / f"{name}.crt", cert)
        written.append(out / f"{name}.crt")
    if not (out / CRL_FILE).exists():
        write_crl(out, [])
    (out / "endpoints").write_text("".join(f"https://{ip}:{REMOTE_PORT}\n"
                                           for ip in advertise or server_ips))
    return written


RELAY_USER = "relay"  # the client certificate the relay shows every node's flow server


def make_flows_pki(cluster: str, out: Path, nodes: dict[str, str]) -> list[Path]:
    """Issue (once) from the cluster CA the relay's client certificate (`relay.crt`) and one
    server certificate per node for its flow server (`flows-<node>.crt`, its address in the
    SAN); `make_cluster_pki` made the CA. A node whose address changed gets a new one."""
    ca_key, ca_cert = _load_ca(out, "ca")
    written = []
    wanted = [(RELAY_USER, RELAY_USER, ())] + [(f"flows-{name}", f"flows-{name}", (ip,))
                                                for name, ip in sorted(nodes.items())]
    for stem, cn, ips in wanted:
        path = out / f"{stem}.crt"
        current = x509.load_pem_x509_certificate(path.read_bytes()) if path.exists() else None
        same = current is not None and current.issuer == ca_cert.subject and (
            not ips or {str(i) for i in current.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)} >= set(ips))
        if not same:
            key, cert = _issue(ca_key, ca_cert, cn, cluster, server_ips=ips, client=not ips)
            _write_key(out / f"{stem}.key", key)
            _write_cert(path, cert)
        written.append(path)
    return written


def etcd_tls_args(pki: Path) -> list[str]:
    """etcd flags for TLS with client-certificate authentication."""
    args = ["--cert-file", str(pki / "server.crt"), "--key-file", str(pki / "server.key"),
            "--trusted-ca-file", str(pki / "ca.crt"), "--client-cert-auth"]
    if (pki / CRL_FILE).exists():  # etcd reads it at every handshake: a revocation needs no restart
        args += ["--client-crl-file", str(pki / CRL_FILE)]
    return args


def issue_client(pki: Path, cn: str, cluster: str, valid_for: datetime.timedelta,
                 not_before: datetime.datetime | None = None) -> tuple[bytes, bytes, int]:
    """A client certificate of the cluster CA for etcd user `cn`: (key PEM, cert PEM, serial).
    Nothing is written: the caller hands the key to its one holder."""
    ca_key, ca_cert = _load_ca(pki, "ca")
    key, cert = _issue(ca_key, ca_cert, cn, cluster, valid_for=valid_for)
    if not_before is not None:  # only to make certificates that are already expired
        cert = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
                .public_key(cert.public_key()).serial_number(cert.serial_number)
                .not_valid_before(not_before).not_valid_after(not_before + valid_for)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM), cert.serial_number


def certify(pki: Path, cn: str, cluster: str, public_key_pem: bytes,
            valid_for: datetime.timedelta) -> tuple[bytes, int]:
    """A client certificate of the cluster CA for a key its holder made (a renewal: the
    private key never leaves the holder). Returns (cert PEM, serial)."""
    ca_key, ca_cert = _load_ca(pki, "ca")
    public_key = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ValueError("the public key to certify must be an EC key")
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn, cluster)).issuer_name(ca_cert.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + valid_for)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), cert.serial_number


def sign(pki: Path, data: bytes) -> bytes:
    """An ECDSA signature of `data` by the cluster CA (join bundles carry one)."""
    ca_key, _ = _load_ca(pki, "ca")
    return ca_key.sign(data, ec.ECDSA(hashes.SHA256()))


def write_crl(pki: Path, serials: Iterable[int]) -> None:
    """The cluster CA's revocation list: etcd refuses a handshake with any of `serials`."""
    ca_key, ca_cert = _load_ca(pki, "ca")
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
         .last_update(now - datetime.timedelta(minutes=5))
         .next_update(now + datetime.timedelta(days=VALID_DAYS)))
    for serial in sorted(set(serials)):
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now).build())
    crl = b.sign(ca_key, hashes.SHA256())
    tmp = pki / f".{CRL_FILE}.tmp"
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, pki / CRL_FILE)


def revoked_serials(pki: Path) -> set[int]:
    path = pki / CRL_FILE
    if not path.exists():
        return set()
    return {r.serial_number for r in x509.load_pem_x509_crl(path.read_bytes())}


def etcd_auth_commands(cluster: str) -> list[list[str]]:
    """etcdctl arguments that create the users and roles and turn auth on."""
    reads = ["cilium/state/", f"{CLUSTER_CONFIG_PREFIX}/{cluster}", f"{SYNCED_PREFIX}/{cluster}/",
             HEARTBEAT_KEY, "plexus/manifests/v1/"]
    cmds = [["user", "add", "root", "--no-password"], ["role", "add", "root"],
            ["user", "grant-role", "root", "root"],
            ["role", "add", REMOTE_USER]]
    for key in reads:
        prefix = key.endswith("/")
        cmds.append(["role", "grant-permission", REMOTE_USER, "read", key]
                    + (["--prefix=true"] if prefix else []))
    cmds += [["user", "add", REMOTE_USER, "--no-password"],
             ["user", "grant-role", REMOTE_USER, REMOTE_USER], ["auth", "enable"]]
    return cmds


def etcdctl_tls(pki: Path, user: str = "admin") -> list[str]:
    return ["--cacert", str(pki / "ca.crt"), "--cert", str(pki / f"{user}.crt"),
            "--key", str(pki / f"{user}.key")]


def connect(a: str, b: str, pki: Path, config_dirs: dict[str, list[Path]]) -> list[Path]:
    """Write, into each side's config directories, the file that reaches the other side."""
    written = []
    for here, there in ((a, b), (b, a)):
        src = pki / there
        if not (src / "ca.crt").exists():
            raise FileNotFoundError(f"no PKI for cluster {there} in {src}: run `clustermesh certs`")
        endpoints = [e for e in (src / "endpoints").read_text().split() if e]
        for d in config_dirs.get(here, []):
            d.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / "ca.crt", d / f"{there}.ca.crt")
            shutil.copyfile(src / f"{REMOTE_USER}.crt", d / f"{there}.client.crt")
            shutil.copyfile(src / f"{REMOTE_USER}.key", d / f"{there}.client.key")
            os.chmod(d / f"{there}.client.key", 0o600)
            tmp = d / f".{there}.tmp"
            tmp.write_text(yaml.safe_dump({
                "endpoints": endpoints,
                "trusted-ca-file": str(d / f"{there}.ca.crt"),
                "cert-file": str(d / f"{there}.client.crt"),
                "key-file": str(d / f"{there}.client.key"),
            }, sort_keys=False))
            os.replace(tmp, d / there)
            written.append(d / there)
    return written
