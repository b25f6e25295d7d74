"""The example Postfix image, run as the example Deployment runs it: the init loader
``load-tables`` (uid 65532, read-only root, no capabilities) compiles the ConfigMap's
table into the tables emptyDir, then the entrypoint starts Postfix (root, read-only
root, only the capabilities the Deployment adds), and real mail obeys the table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import SmtpSink, plain_sink
from tests.images.harness import PostfixPod
from tests.images.pods import POSTFIX_IMAGE, podman

pytestmark = pytest.mark.images


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    sink = plain_sink().start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture
def postfix_pod(images: None, tmp_path: Path, sink: SmtpSink) -> Iterator[PostfixPod]:
    pod = PostfixPod(tmp_path, routes={"plain.example.test": f"smtp:{sink.nexthop}"})
    try:
        yield pod
    finally:
        pod.stop()


async def poll_logs(pod: PostfixPod, text: str, timeout: float = 30) -> str:
    assert pod.container is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while text not in (logs := await asyncio.to_thread(pod.container.logs)):
        if loop.time() > deadline:
            raise AssertionError(f"no {text!r} in the Postfix log within {timeout} s:\n"
                                 f"{logs[-4000:]}")
        await asyncio.sleep(0.3)
    return logs


def test_postfix_image_has_lmdb(images: None) -> None:
    result = podman("run", "--rm", "--entrypoint", "postconf", POSTFIX_IMAGE, "-m")
    assert "lmdb" in result.stdout.decode().split()


async def test_example_pod_loads_the_table_starts_postfix_and_enforces_it(
        postfix_pod: PostfixPod, sink: SmtpSink) -> None:
    table = (f"# revision: 0123456789abcdef\n{sink.nexthop} encrypt\n"
             "mailtls-revision.invalid secure match=rev-0123456789abcdef\n")
    postfix_pod.lay_out({"tls_policy": table})

    loaded = await asyncio.to_thread(postfix_pod.load_tables)
    assert "mailtls: loaded tls_policy from /etc/mailtls/tls_policy (revision " \
           "0123456789abcdef)" in loaded
    assert "mailtls: loaded transport from (none: empty table)" in loaded
    tables = postfix_pod.volumes.path("tables")
    assert (tables / "tls_policy.lmdb").stat().st_uid == 65532  # written by the init user

    container = await asyncio.to_thread(postfix_pod.start)
    modules = (await asyncio.to_thread(container.exec, "postconf", "-m")).stdout.decode()
    assert "lmdb" in modules.split()
    assert await asyncio.to_thread(postfix_pod.query, sink.nexthop) == "encrypt"
    probe = await asyncio.to_thread(container.exec, "sh", "-c",
                                    "touch /etc/probe 2>&1; grep -E '^(Uid|CapEff|NoNewPrivs)'"
                                    " /proc/1/status")
    out = probe.stdout.decode()
    assert "Read-only file system" in out  # readOnlyRootFilesystem
    assert "Uid:\t0\t" in out  # master runs as root, as the Deployment says
    # Exactly the Deployment's capabilities: CHOWN DAC_OVERRIDE FOWNER KILL SETGID SETUID
    # NET_BIND_SERVICE (bits 0 1 3 5 6 7 10), and no privilege escalation.
    assert "CapEff:\t00000000000004eb" in out and "NoNewPrivs:\t1" in out

    await asyncio.to_thread(postfix_pod.send, "user@plain.example.test")
    await poll_logs(postfix_pod, "TLS is required, but was not offered")
    assert sink.messages == []

    # What the operator's rollout does, by hand: a new table, compiled, swapped (no reload
    # for an lmdb TLS-policy change: DESIGN §7), then the deferred mail released.  (A
    # `postfix reload && postqueue -f` raced: the flush reached the qmgr being replaced.)
    fixed = table.replace(" encrypt\n", " may\n")
    result = await asyncio.to_thread(
        container.exec, "sh", "-c",
        "cd /var/lib/mailtls && cat > .tls_policy.new && postmap lmdb:.tls_policy.new "
        "&& mv -f .tls_policy.new.lmdb tls_policy.lmdb && mv -f .tls_policy.new tls_policy "
        "&& postqueue -f", stdin=fixed.encode())
    assert result.returncode == 0, result.stderr.decode()
    await poll_logs(postfix_pod, "status=sent")
    assert [m.rcpt_tos for m in sink.messages] == [("user@plain.example.test",)]
