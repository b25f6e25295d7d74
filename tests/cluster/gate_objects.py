"""The objects of the offline-gate differential test: the repository's validation corpus
(every example and fixture of both kinds) and hypothesis-generated objects, valid and
hostile in every field, drawn deterministically so a run is repeatable.

Each case becomes one file; the test sends every file through ``kubectl apply
--dry-run=server`` and through ``mailtls validate`` and compares the verdicts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import gate_strategies as strategies
from tests.unit import strategies as unit

REPO = Path(__file__).resolve().parents[2]
API_VERSION = "mailtls.io/v1alpha1"


@dataclass(frozen=True)
class Case:
    """One file of the differential test: where it came from and its text."""

    name: str
    """Unique, also the file's stem: ``corpus-...`` or ``gen-NNNNN``."""
    origin: str
    """The repository file (or ``generated``) it comes from."""
    text: str
    suffix: str = ".yaml"
    obj: Any = None
    """The object as generated (None for corpus files: judged from the text)."""


# --------------------------------------------------------------------------- corpus


def _doc(kind: str, spec: Any, name: str = "case", namespace: str = "mail") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _mailtls_docs(text: str) -> bool:
    return bool(re.search(r"^kind:\s*\"?MailTLS(Policy|Discovery)\b", text, re.M))


_SERVER_SET = ("uid", "resourceVersion", "generation", "creationTimestamp",
               "managedFields", "deletionTimestamp", "selfLink")


def corpus_cases(namespaces: set[str]) -> list[Case]:
    """Every valid and invalid fixture and example of the repository, one file each.

    ``namespaces`` collects the namespaces the files name (they must exist on the
    server for a dry-run create)."""
    cases: list[Case] = []
    for path in sorted((REPO / "manifests" / "examples").rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        if _mailtls_docs(text):
            cases.append(Case(f"corpus-example-{path.stem}", str(path.relative_to(REPO)), text))
    for doc_path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        blocks = re.findall(r"```ya?ml\n(.*?)```", doc_path.read_text(encoding="utf-8"), re.S)
        for i, block in enumerate(b for b in blocks if _mailtls_docs(b)):
            cases.append(Case(f"corpus-doc-{doc_path.stem}-{i}", str(doc_path.relative_to(REPO)),
                              block))
    # Argo CD health-check samples are snapshots of live objects: the fields only the
    # server sets are removed so that they can be created (their specs are the corpus).
    argocd = REPO / "deploy" / "argocd" / "resource_customizations" / "mailtls.io"
    for path in sorted(argocd.rglob("testdata/*.yaml")):
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
        for key in _SERVER_SET:
            obj.get("metadata", {}).pop(key, None)
        obj["metadata"]["name"] = f"argocd-{path.parent.parent.name}-{path.stem}".lower(
        ).replace("_", "-")  # one `mailtls validate` run judges them together
        cases.append(Case(f"corpus-argocd-{path.parent.parent.name}-{path.stem}",
                          str(path.relative_to(REPO)), yaml.safe_dump(obj, sort_keys=False)))
    invalid = yaml.safe_load((REPO / "tests" / "corpus" / "invalid.yaml").read_text())
    for entry in invalid:
        doc = _doc("MailTLSPolicy", entry["spec"], name=f"bad-{entry['name']}")
        cases.append(Case(f"corpus-invalid-{entry['name']}", "tests/corpus/invalid.yaml",
                          json.dumps(doc), suffix=".json"))
    from tests.unit.test_invalid_corpus import MODEL_ONLY
    for name, spec, _field, _reason in MODEL_ONLY:
        assert isinstance(spec, dict)
        cases.append(Case(f"corpus-model-only-{name}", "tests/unit/test_invalid_corpus.py",
                          json.dumps(_doc("MailTLSPolicy", {"level": "encrypt", **spec},
                                          name=f"bad-{name}")), suffix=".json"))
    for case in cases:
        for obj in yaml.safe_load_all(case.text):
            if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
                namespaces.add(str(obj["metadata"].get("namespace") or "default"))
    return cases


# ----------------------------------------------------------------------- generation


DRAWN = 10_000
"""Always drawn (and cached) whole; a smaller run takes the first ones."""


def _cache_file(count: int, seed_value: int) -> Path:
    """Where the drawn objects are kept between runs: drawing 10,000 with hypothesis takes
    a minute or more, reading them back a second. The key is everything the draw depends
    on (this module, the unit strategies it reuses, hypothesis's version), so the objects
    are exactly those the seed gives."""
    import hypothesis

    digest = hashlib.sha256()
    for source in (Path(strategies.__file__), Path(unit.__file__)):
        digest.update(source.read_bytes())
    digest.update(f"{hypothesis.__version__} {count} {seed_value}".encode())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mailtls" / "gate" / f"objects-{digest.hexdigest()[:16]}.json"


@functools.cache
def generated_objects(count: int, seed_value: int = 23) -> tuple[str, ...]:
    """``count`` generated objects (as JSON texts), the same on every run."""
    cache = _cache_file(count, seed_value)
    if cache.is_file():
        texts: list[str] = json.loads(cache.read_text(encoding="utf-8"))
        if len(texts) == count:
            return tuple(texts)
    drawn = strategies.draw_many(strategies.objects(), count, seed_value)
    texts = [json.dumps(o, ensure_ascii=True) for o in drawn]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(texts), encoding="utf-8")
    tmp.replace(cache)
    return tuple(texts)


def generated_cases(count: int, namespace: str, seed_value: int = 23) -> list[Case]:
    """``count`` generated objects in ``namespace``, one file each (JSON mostly, every
    fifth as YAML, so kubectl's YAML decoding is in play too)."""
    cases = []
    drawn = generated_objects(max(count, DRAWN), seed_value)[:count]
    for i, text in enumerate(drawn):
        obj = json.loads(text)
        name = f"gen-{i:05d}"
        obj["metadata"] = {"name": name, "namespace": namespace}
        if i % 5 == 4:
            text, suffix = yaml.safe_dump(obj, allow_unicode=False, sort_keys=False), ".yaml"
        else:
            text, suffix = json.dumps(obj, ensure_ascii=True), ".json"
        cases.append(Case(name, "generated", text, suffix, obj))
    return cases
