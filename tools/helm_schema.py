"""Writes helm/moeserve/values.schema.json: the chart's own values, and under `cluster` the JSON schema of moeserve's
`ClusterConfig`, so that `helm install` refuses what moeserve itself would refuse (a misspelled key, a wrong type,
a value out of range) before anything starts.

    python tools/helm_schema.py           # write it
    python tools/helm_schema.py --check   # exit 1 if the file is not what ClusterConfig gives now
"""
import argparse
import json
import sys
from pathlib import Path

from moeserve.cluster.config import ClusterConfig

SCHEMA = Path(__file__).resolve().parent.parent / "helm" / "moeserve" / "values.schema.json"


def obj(properties: dict, required: tuple = ()) -> dict:
    """A closed object: a misspelled key is an error, not silently ignored."""
    return {"type": "object", "additionalProperties": False, "properties": properties,
            **({"required": list(required)} if required else {})}


STRING, BOOL = {"type": "string"}, {"type": "boolean"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
COUNT = {"type": "integer", "minimum": 0}
OPEN = {"type": "object"}  # Kubernetes objects passed through as they are (resources, tolerations' items, ...)
LIST = {"type": "array"}


def pod_group(extra: dict) -> dict:
    return obj({"gpus": COUNT, "resources": OPEN, "nodeSelector": {"type": "object",
                                                                  "additionalProperties": STRING},
                "tolerations": LIST, **extra})


def values_schema() -> dict:
    cluster = ClusterConfig.model_json_schema()
    defs = cluster.pop("$defs", {})
    # the chart sets the model's path; its default (the demo model inside this checkout) would tie the schema to
    # where the repository happens to be
    cluster["properties"]["model"].pop("default", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "moeserve chart values",
        **obj({
            "nameOverride": STRING,
            "fullnameOverride": {"type": "string", "maxLength": 47},
            "image": obj({"repository": {"type": "string", "minLength": 1}, "tag": STRING,
                          "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}, ("repository",)),
            "imagePullSecrets": {"type": "array", "items": obj({"name": STRING}, ("name",))},
            "rayVersion": STRING,
            "model": obj({
                "name": STRING,
                "path": {"type": "string", "pattern": "^/"},
                "volume": obj({"kind": {"enum": ["pvc", "hostPath"]}, "claimName": STRING, "hostPath": STRING,
                               "mountPath": {"type": "string", "pattern": "^/"}, "readOnly": BOOL}, ("kind",)),
                "copyFrom": obj({"path": STRING, "volume": OPEN}),
            }, ("path", "volume")),
            "cluster": cluster,
            "serve": obj({"host": STRING, "httpPort": PORT, "grpcPort": PORT, "maxPending": {"type": "integer", "minimum": 1},
                          "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}}),
            "head": obj({"rayStartParams": {"type": "object", "additionalProperties": STRING}, "resources": OPEN,
                         "nodeSelector": {"type": "object", "additionalProperties": STRING}, "tolerations": LIST}),
            "attention": pod_group({"replicas": {"type": "integer", "minimum": 1},
                                    "shardsPerPod": {"type": "integer", "minimum": 1}}),
            "experts": pod_group({"replicas": COUNT, "minReplicas": COUNT, "maxReplicas": {"type": "integer",
                                                                                          "minimum": 1},
                                  "groupsPerPod": {"type": "integer", "minimum": 1}}),
            "autoscaler": obj({"enabled": BOOL, "idleTimeoutSeconds": COUNT,
                               "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}}),
            "auth": obj({"enabled": BOOL, "existingSecret": STRING}),
            "upgradeStrategy": obj({"type": {"enum": ["NewCluster", "None", "NewClusterWithIncrementalUpgrade"]}}),
        }),
        "$defs": defs,
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare instead of writing")
    a = p.parse_args()
    if a.check:
        if not SCHEMA.is_file() or SCHEMA.read_text() != render():
            print(f"{SCHEMA} is out of date: run python tools/helm_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(render())
    print(f"wrote {SCHEMA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
