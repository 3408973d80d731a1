"""Validate KServe resources (ServingRuntime, ClusterServingRuntime, InferenceService) offline.

    python tests/deploy_kserve_check.py deploy/kserve/*.yaml     (PYTHONPATH: the kserve package)

KServe's own Python SDK describes every field of its resources: each generated model class in
`kserve.models` lists its attributes with their JSON names and types (`attribute_map`,
`openapi_types`), and its setters refuse a missing required field. This walks a resource
through those classes: a field the class does not have, a value of the wrong type, or a
missing required field is an error. The Kubernetes types that KServe embeds (containers,
probes, metadata, ...) are checked against the Kubernetes JSON schema of the same release
that kubernetes-validate checks the plain manifests with, in its strict form (no unknown
fields).

The `kserve` package cannot be installed beside mobiserve (it pins protobuf < 7; mobiserve needs
7), so tests/test_deploy.py installs it with --no-deps into a folder of its own and runs this
script with that folder on PYTHONPATH. Only `kserve.models` is imported, through a bare package
object: kserve's __init__ would import its model server (fastapi, uvicorn, ...), which the
models do not need. Prints one line per resource; exits 1 if any resource is invalid.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import jsonschema
import referencing
import yaml
from kubernetes_validate import utils as kv_utils

K8S_VERSION = "1.37"
KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
DEFS_URI = "https://kubernetes.io/api/_definitions.json"


def load_kserve_models() -> types.ModuleType:
    spec = importlib.util.find_spec("kserve")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the kserve package is not on PYTHONPATH")
    package = types.ModuleType("kserve")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["kserve"] = package
    import kserve.models

    models: types.ModuleType = kserve.models
    return models


class K8sSchemas:
    """Kubernetes type definitions from kubernetes-validate's strict schemas."""

    def __init__(self, version: str = K8S_VERSION) -> None:
        schema_dir = f"v{version}.0-local-strict"
        defs = kv_utils.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
        self.names: set[str] = set(defs["$defs"])
        resource = referencing.Resource.from_contents(defs)
        self.registry: referencing.Registry = referencing.Registry().with_resource(DEFS_URI, resource)

    def definition(self, type_name: str) -> str | None:
        """The schema definition of an SDK type name: V1Container, K8sIoApiAppsV1DeploymentStrategy, ..."""
        if type_name.endswith("Quantity"):  # ResourceQuantity, V1beta1MetricQuantity: int-or-string
            return "io.k8s.apimachinery.pkg.api.resource.Quantity"
        if m := re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d+(?:(?:alpha|beta)\d+)?)(\w+)", type_name):
            group, version, name = m.groups()
            candidates = [f"io.k8s.api.{group.lower()}.{version.lower()}.{name}"]
        elif m := re.fullmatch(r"(V\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w+)", type_name):
            version, name = m.group(1).lower(), m.group(2)
            candidates = [f"io.k8s.api.core.{version}.{name}", f"io.k8s.apimachinery.pkg.apis.meta.{version}.{name}"]
            candidates += sorted(n for n in self.names if n.endswith(f".{version}.{name}"))
        else:
            return None
        return next((c for c in candidates if c in self.names), None)

    def errors(self, definition: str, value: Any, where: str) -> list[str]:
        schema = {"$id": "https://kubernetes.io/api/check.json", "$ref": f"/api/_definitions.json#/$defs/{definition}"}
        validator = jsonschema.Draft202012Validator(schema, registry=self.registry)
        return [
            f"{where}{''.join(f'.{p}' if isinstance(p, str) else f'[{p}]' for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(value)
        ]


class Checker:
    def __init__(self, models: types.ModuleType, k8s: K8sSchemas) -> None:
        self.models = models
        self.k8s = k8s

    def check(self, doc: dict[str, Any]) -> list[str]:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in KINDS:
            return [f"not a KServe resource this checker knows: apiVersion={key[0]} kind={key[1]}"]
        return self.value(doc, KINDS[key], doc["kind"])

    def value(self, value: Any, type_name: str, where: str) -> list[str]:
        if m := re.fullmatch(r"list\[(.+)\]", type_name):
            if not isinstance(value, list):
                return [f"{where}: expected a list, got {type(value).__name__}"]
            return [e for i, item in enumerate(value) for e in self.value(item, m.group(1), f"{where}[{i}]")]
        if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
            if not isinstance(value, dict):
                return [f"{where}: expected a mapping, got {type(value).__name__}"]
            return [e for k, item in value.items() for e in self.value(item, m.group(1), f"{where}.{k}")]
        primitive = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "datetime": (str,)}
        if type_name in primitive:
            ok = isinstance(value, primitive[type_name]) and (type_name == "bool" or not isinstance(value, bool))
            return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
        if type_name == "object":
            return []
        cls = getattr(self.models, type_name, None)
        if cls is not None:
            return self.model(value, cls, where)
        definition = self.k8s.definition(type_name)
        if definition is None:
            return [f"{where}: type {type_name} is neither a kserve model nor a Kubernetes type"]
        return self.k8s.errors(definition, value, where)

    def model(self, value: Any, cls: type, where: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{where}: expected a {cls.__name__} mapping, got {type(value).__name__}"]
        attr_of = {json_key: attr for attr, json_key in cls.attribute_map.items()}  # type: ignore[attr-defined]
        errors = [f"{where}: unknown field {key!r} for {cls.__name__}" for key in value if key not in attr_of]
        present = {attr_of[k]: v for k, v in value.items() if k in attr_of}
        for attr, item in present.items():
            errors += self.value(item, cls.openapi_types[attr], f"{where}.{cls.attribute_map[attr]}")  # type: ignore[attr-defined]
        try:
            cls(**present)  # the generated setters refuse a missing required field
        except (ValueError, TypeError) as exc:
            errors.append(f"{where}: {cls.__name__}: {exc}")
        return errors


def main(paths: list[str]) -> int:
    checker = Checker(load_kserve_models(), K8sSchemas())
    failed = False
    for path in paths:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if doc is None:
                continue
            name = f"{path}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            errors = checker.check(doc)
            failed |= bool(errors)
            print(json.dumps({"resource": name, "errors": errors}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
