"""``mailtls run`` as a user runs it: a subprocess, the current kubeconfig, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import urllib.request
from pathlib import Path

import kubernetes.client
import pytest

from testbed.apiserver import ApiServer

pytestmark = pytest.mark.integration
MAILTLS = str(Path(sys.executable).with_name("mailtls"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def kubeconfig(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: emu, cluster: {{server: "{url}"}}}}]
users: [{{name: dev, user: {{token: not-checked}}}}]
contexts: [{{name: emu, context: {{cluster: emu, user: dev}}}}]
current-context: emu
""")
    return path


async def start(tmp_path: Path, url: str, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig(tmp_path, url))}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return await asyncio.create_subprocess_exec(
        MAILTLS, "run", *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status, resp.read().decode()


async def test_run_uses_the_current_kubeconfig_and_serves_health_and_metrics(
        apiserver: ApiServer, kube_client: kubernetes.client.ApiClient, tmp_path: Path) -> None:
    health, metrics = free_port(), free_port()
    url = str(apiserver.url).rstrip("/")
    proc = await start(tmp_path, url, "--health", f"127.0.0.1:{health}",
                       "--metrics", f"127.0.0.1:{metrics}", "--debounce", "0.1")
    try:
        await apiserver.wait_until(lambda: apiserver.watch_count("mailtlspolicies") > 0, 20)
        custom = kubernetes.client.CustomObjectsApi(kube_client)
        await asyncio.to_thread(
            custom.create_namespaced_custom_object, "mailtls.io", "v1alpha1", "mail",
            "mailtlspolicies",
            {"apiVersion": "mailtls.io/v1alpha1", "kind": "MailTLSPolicy",
             "metadata": {"name": "p", "namespace": "mail"},
             "spec": {"destinations": ["a.example"], "level": "encrypt",
                      "instances": ["relay"]}})
        cm = await apiserver.wait_until(
            lambda: apiserver.get_object("v1/configmaps", "mail", "relay-mailtls"), 20)
        assert "a.example encrypt\n" in cm["data"]["tls_policy"]
        status, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{health}/healthz")
        assert status == 200
        status, text = await asyncio.to_thread(get, f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200 and "mailtls_configmap_writes_total" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
    assert proc.returncode == 0


async def test_run_without_the_crd_says_so_and_exits(
        apiserver: ApiServer, kube_client: kubernetes.client.ApiClient, tmp_path: Path) -> None:
    ext = kubernetes.client.ApiextensionsV1Api(kube_client)
    await asyncio.to_thread(ext.delete_custom_resource_definition, "mailtlspolicies.mailtls.io")
    proc = await start(tmp_path, str(apiserver.url).rstrip("/"), "--health",
                       f"127.0.0.1:{free_port()}", "--metrics", "off")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode != 0
    assert b"CRD mailtlspolicies.mailtls.io is not installed" in out
    # --log-format json (the default): every log line is one real JSON object
    records = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("is not installed" in r["message"] for r in records)
