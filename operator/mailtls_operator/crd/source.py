"""The CRD file itself: where it is (wheel or source tree), parsed once, its served
version's schema, and the names of the API it defines."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

CRD_FILENAME = "mailtlspolicies.mailtls.io.yaml"
GROUP = "mailtls.io"
VERSION = "v1alpha1"
PLURAL = "mailtlspolicies"
KIND = "MailTLSPolicy"


@dataclass(frozen=True, order=True)
class FieldError:
    """One refusal: the field (``spec.match``) and the reason, as a person reads it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def crd_path() -> Path:
    """Where the CRD is: inside an installed wheel, or in the source tree's ``crds/``."""
    packaged = resources.files("mailtls_operator").joinpath("crd.yaml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[3] / "crds" / CRD_FILENAME


@functools.cache
def load_crd() -> dict[str, Any]:
    """The CRD document, parsed once."""
    with crd_path().open(encoding="utf-8") as fh:
        doc: dict[str, Any] = yaml.safe_load(fh)
    return doc


def version_schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the served version."""
    for version in load_crd()["spec"]["versions"]:
        if version["name"] == VERSION:
            schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
            return schema
    raise LookupError(f"CRD has no version {VERSION}")
