"""The ConfigMap ``<instance>-mailtls``: the readable, diff-able record of what is deployed.

Pure: builds the object and reads the revision back.  A table past the
ConfigMap limit (1 MiB for the whole object) is stored gzip-compressed in
``binaryData`` (``tls_policy.gz``) instead of being refused; gzip is written
with mtime 0 so the same table always gives the same bytes.
"""

from __future__ import annotations

import base64
import gzip
from typing import Any

from .render import Tables

SUFFIX = "-mailtls"
MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR = "mailtls-operator"
LABEL_INSTANCE = "mailtls.io/instance"
ANN_REVISION = "mailtls.io/revision"
COMPRESS_ABOVE = 900 * 1024  # leaves room for metadata under the 1 MiB object limit
LIMIT = 1024 * 1024


class TableTooLarge(Exception):
    """Even compressed, the tables do not fit one ConfigMap."""


def configmap_name(instance: str) -> str:
    return f"{instance}{SUFFIX}"


def _pack(name: str, text: str, data: dict[str, str], binary: dict[str, str]) -> None:
    if not text:
        return
    if len(text.encode("utf-8")) <= COMPRESS_ABOVE:
        data[name] = text
    else:
        packed = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
        binary[f"{name}.gz"] = base64.b64encode(packed).decode("ascii")


def configmap_body(namespace: str, instance: str, tables: Tables) -> dict[str, Any]:
    """The wanted ConfigMap for an instance's tables."""
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    _pack("tls_policy", tables.tls_policy, data, binary)
    _pack("transport", tables.transport, data, binary)
    size = sum(len(v) for v in data.values()) + sum(len(v) for v in binary.values())
    if size > LIMIT - 16 * 1024:
        raise TableTooLarge(
            f"{namespace}/{instance}: tables need {size} bytes even compressed; a ConfigMap "
            f"holds {LIMIT}")
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(instance),
            "namespace": namespace,
            "labels": {MANAGED_BY: OPERATOR, LABEL_INSTANCE: instance},
            "annotations": {ANN_REVISION: tables.revision},
        },
        "data": data,
    }
    if binary:
        body["binaryData"] = binary
    return body


def same_content(current: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    """Is what is stored exactly what we want (content, revision, our labels)?"""
    if current is None:
        return False
    meta = current.get("metadata") or {}
    want_meta = wanted["metadata"]
    return (
        (meta.get("annotations") or {}).get(ANN_REVISION) == want_meta["annotations"][ANN_REVISION]
        and all((meta.get("labels") or {}).get(k) == v for k, v in want_meta["labels"].items())
        and (current.get("data") or {}) == wanted.get("data", {})
        and (current.get("binaryData") or {}) == wanted.get("binaryData", {})
    )
