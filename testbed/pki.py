"""Certificates and keys for a throwaway control plane.

kube-apiserver serves TLS only and authenticates its admin here by a client
certificate whose organisation is ``system:masters`` (the group RBAC lets do
everything, as kubeadm's admin.conf does); the ServiceAccount issuer signs tokens with
an RSA key.  trustme makes the CA and the leaf certificates (its leaves carry both the
serverAuth and clientAuth usages, which is what the apiserver checks); the
ServiceAccount key is plain ``cryptography``.  The CA's key and client certificates for
kube-controller-manager and kube-scheduler serve the whole kwok cluster
(``testbed/cluster.py``).  Everything is written under one directory so a failed run
can be inspected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

#: The admin's user name (the certificate's CN) and the group that RBAC lets do anything.
ADMIN_USER = "mailtls-testbed-admin"
ADMIN_GROUP = "system:masters"
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
SCHEDULER_USER = "system:kube-scheduler"


@dataclass(frozen=True)
class ControlPlanePKI:
    """Paths of everything the control plane and its clients need."""

    ca_file: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_signing_key: Path
    sa_public_key: Path
    #: kwok's kubelet endpoint serves this (loopback names, same CA), so kube-apiserver
    #: verifies the "kubelet" it proxies ``pods/exec`` to, as a hardened cluster does.
    kubelet_cert: Path
    kubelet_key: Path
    #: The CA's key: kube-controller-manager signs approved CertificateSigningRequests
    #: with it (``--cluster-signing-*``), as kubeadm's does.
    ca_key: Path
    #: Client certificates of the controller-manager and the scheduler, with the user
    #: names the bootstrap RBAC policy grants (``system:kube-controller-manager``,
    #: ``system:kube-scheduler``), as kubeadm writes them.
    controller_manager_cert: Path
    controller_manager_key: Path
    scheduler_cert: Path
    scheduler_key: Path


def make_pki(directory: Path, *, service_ip: str) -> ControlPlanePKI:
    """A fresh CA, a serving certificate for loopback and ``kubernetes.default``, an
    admin client certificate and a ServiceAccount signing key pair, written to
    ``directory``.  ``service_ip`` is the first address of the service range (the
    ``kubernetes`` Service's ClusterIP), named in the serving certificate as on a
    real cluster."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="mailtls test bed")
    serving = ca.issue_cert(
        "127.0.0.1", "localhost", service_ip, "kubernetes", "kubernetes.default",
        "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
        common_name="kube-apiserver")
    admin = ca.issue_cert("admin.mailtls.invalid", common_name=ADMIN_USER,
                          organization_name=ADMIN_GROUP)
    kubelet = ca.issue_cert("127.0.0.1", "localhost", common_name="kwok-kubelet")
    controller_manager = ca.issue_cert("kube-controller-manager.mailtls.invalid",
                                       common_name=CONTROLLER_MANAGER_USER)
    scheduler = ca.issue_cert("kube-scheduler.mailtls.invalid", common_name=SCHEDULER_USER)
    pki = ControlPlanePKI(
        ca_file=directory / "ca.pem",
        serving_cert=directory / "apiserver.pem",
        serving_key=directory / "apiserver-key.pem",
        admin_cert=directory / "admin.pem",
        admin_key=directory / "admin-key.pem",
        sa_signing_key=directory / "sa-key.pem",
        sa_public_key=directory / "sa-pub.pem",
        kubelet_cert=directory / "kubelet.pem",
        kubelet_key=directory / "kubelet-key.pem",
        ca_key=directory / "ca-key.pem",
        controller_manager_cert=directory / "controller-manager.pem",
        controller_manager_key=directory / "controller-manager-key.pem",
        scheduler_cert=directory / "scheduler.pem",
        scheduler_key=directory / "scheduler-key.pem",
    )
    ca.cert_pem.write_to_path(str(pki.ca_file))
    serving.cert_chain_pems[0].write_to_path(str(pki.serving_cert))
    serving.private_key_pem.write_to_path(str(pki.serving_key))
    admin.cert_chain_pems[0].write_to_path(str(pki.admin_cert))
    admin.private_key_pem.write_to_path(str(pki.admin_key))
    kubelet.cert_chain_pems[0].write_to_path(str(pki.kubelet_cert))
    kubelet.private_key_pem.write_to_path(str(pki.kubelet_key))
    ca.private_key_pem.write_to_path(str(pki.ca_key))
    for leaf, cert, leaf_key in ((controller_manager, pki.controller_manager_cert,
                                  pki.controller_manager_key),
                                 (scheduler, pki.scheduler_cert, pki.scheduler_key)):
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(leaf_key))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pki.sa_signing_key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    pki.sa_public_key.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    for path in (pki.serving_key, pki.admin_key, pki.sa_signing_key, pki.kubelet_key,
                 pki.ca_key, pki.controller_manager_key, pki.scheduler_key):
        path.chmod(0o600)
    return pki
