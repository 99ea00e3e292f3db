"""Rendering the chart offline and checking what it renders against KubeRay's CRDs, made strict."""
import copy
import functools
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "moeserve"
CRDS = ROOT.parent / "shared" / "kuberay-crds"


def render(values: dict, name: str = "demo", namespace: str = "serving") -> dict[str, list[dict]]:
    """template file name -> the YAML documents it renders (NOTES.txt as one string)."""
    import helm_python
    out = helm_python.Chart.load(str(CHART)).render(values, name=name, namespace=namespace)
    return {Path(path).name: (text if path.endswith(".txt") else [d for d in yaml.safe_load_all(text) if d])
            for path, text in out.items()}


def strict(schema: dict) -> dict:
    """A copy of an OpenAPI schema in which every object that lists its properties allows no others: CRDs accept
    unknown fields (the API server drops them), so a misspelled key would otherwise pass."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)
    close(schema)
    return schema


@functools.cache
def crd_validator(kind: str):
    """A validator of the strict ray.io/v1 schema of a KubeRay kind ("RayService", "RayCluster"). Made once per
    kind: reading a CRD (about 1 MB of YAML) and checking its schema take seconds each."""
    import jsonschema
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader",
                                                                                       yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = strict(version["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(document: dict) -> None:
    crd_validator(document["kind"]).validate(document)
