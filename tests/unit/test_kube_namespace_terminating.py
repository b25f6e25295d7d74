"""A write into a namespace being deleted is routine, not a failure with a traceback.

kube-apiserver answers 403 with the cause ``NamespaceTerminating`` (body as the real
server sent it in the image tests); the operator's worker logs one line and waits for the
deletion events instead of retrying and logging a traceback each time."""

from __future__ import annotations

import json

from mailtls_operator.kube import _terminating

REAL = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'configmaps "relay-mailtls" is forbidden: unable to create new content in '
                   "namespace t39 because it is being terminated",
        "reason": "Forbidden",
        "details": {"name": "relay-mailtls", "kind": "configmaps", "causes": [
            {"reason": "NamespaceTerminating", "message": "namespace t39 is being terminated",
             "field": "metadata.namespace"}]},
        "code": 403}


def test_the_servers_namespace_terminating_answer_is_recognised() -> None:
    assert _terminating(json.dumps(REAL).encode()) == REAL["message"]


def test_other_forbidden_answers_stay_errors() -> None:
    rbac = {**REAL, "message": "forbidden: User cannot create configmaps", "details": {}}
    assert _terminating(json.dumps(rbac).encode()) is None
    for body in (b"", b"not json", b"[]", b'{"details": {"causes": "x"}}', b"\xff"):
        assert _terminating(body) is None
