"""End to end, what KubeRay would do with the chart, on this machine: a Ray cluster whose head and worker node types
are the rendered RayService's groups (their `ray start` parameters and resources, the expert group's
`moeserve-expert` included, min/max replicas as the autoscaler's limits) under Ray's real autoscaler
(`AutoscalingCluster`, every node a real raylet); the rendered serveConfigV2 deployed through Serve's REST API, as
KubeRay's operator does; the ConfigMap's cluster YAML where its volume would be mounted. The expert groups need
more `moeserve-expert` than the one expert pod at install offers, so the autoscaler must add a pod before the
application runs. Then an HTTP and a gRPC request answer with the engine's text; under load the scaling policy asks
for a node's worth of expert groups more, the autoscaler launches a third expert pod and the groups start there;
idle, they are removed and the autoscaler takes the pod back.

`AutoscalingCluster` runs `ray stop --force`, which ends every Ray process on the machine: this module runs after
the modules that start clusters of their own have stopped them, and never beside another Ray.
"""
import json
import os
import secrets
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
ray = pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")
pytest.importorskip("helm_python")
from ray.cluster_utils import AutoscalingCluster  # noqa: E402

from moeserve.cluster import DEMO_MODEL, LLM, SamplingParams  # noqa: E402
from moeserve.cluster.api.stubs import GenerationStub, pb2  # noqa: E402
from tests.helm.chart import render, validate  # noqa: E402

pytestmark = pytest.mark.slow
HTTP_PORT, GRPC_PORT, DASHBOARD = 18631, 19631, "http://127.0.0.1:8265"
VALUES = {
    "model": {"path": str(DEMO_MODEL), "volume": {"kind": "hostPath", "hostPath": str(DEMO_MODEL.parent),
                                                  "mountPath": str(DEMO_MODEL.parent)}},
    "cluster": {"dtype": "float32", "expert_groups": 4, "redundant_experts": 4, "topology": "cpu-local",
                "engine": {"kv_cache_tokens": 4096},
                # a handful of requests decoding is load enough; the single requests of the first tests are not
                "scaling": {"max_expert_groups": 6, "target_tokens_per_s": 150, "interval_s": 3}},
    "serve": {"host": "127.0.0.1", "httpPort": HTTP_PORT, "grpcPort": GRPC_PORT, "maxPending": 16},
    "head": {"resources": {"limits": {"cpu": "1", "memory": "2Gi"}}},
    "attention": {"gpus": 0, "shardsPerPod": 2, "resources": {"limits": {"cpu": "1", "memory": "4Gi"}}},
    "experts": {"gpus": 0, "groupsPerPod": 2, "minReplicas": 1, "replicas": 1, "maxReplicas": 3,
                "resources": {"limits": {"cpu": "1", "memory": "4Gi"}}},
    "autoscaler": {"idleTimeoutSeconds": 6},
}


def node_resources(rayStartParams: dict, offered: dict, container: dict) -> dict:
    """What a pod of this group offers Ray: its CPUs (`num-cpus`, else the container's CPU limit), its GPUs and
    the group's custom resources."""
    cpus = rayStartParams.get("num-cpus", container["resources"]["limits"]["cpu"])
    resources = {"CPU": int(cpus), "object_store_memory": 100 * 2**20, **{k: int(v) for k, v in offered.items()}}
    if int(rayStartParams.get("num-gpus", 0)):
        resources["GPU"] = int(rayStartParams["num-gpus"])
    return resources


class RenderedCluster(AutoscalingCluster):
    """Ray's fake multi-node autoscaler with the node types of a rendered RayService."""

    def __init__(self, service: dict, idle_timeout_s: float):
        cluster = service["spec"]["rayClusterConfig"]
        head = cluster["headGroupSpec"]
        self.worker_types = {
            g["groupName"]: {"resources": node_resources(g["rayStartParams"], g.get("resources", {}),
                                                         g["template"]["spec"]["containers"][0]),
                             "node_config": {}, "min_workers": g["minReplicas"], "max_workers": g["maxReplicas"]}
            for g in cluster["workerGroupSpecs"]}
        self.idle_timeout_s = idle_timeout_s
        head_resources = node_resources(head["rayStartParams"], {}, head["template"]["spec"]["containers"][0])
        super().__init__(head_resources, self.worker_types)

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        # the wheel lacks fake_multi_node/example.yaml, which the base class reads: the config is built here
        empty = {key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                     "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                                     "rsync_exclude", "rsync_filter")}
        return {
            "cluster_name": "moeserve-chart", "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "available_node_types": {**worker_node_types, "ray.head.default": {
                "resources": head_resources, "node_config": {}, "max_workers": 0}},
            "head_node_type": "ray.head.default", "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_s / 60, "auth": {"ssh_user": "ray"}, "docker": {},
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, **empty,
        }


def request(method: str, url: str, body=None, timeout: float = 30) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "content-type": "application/json", "authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text else {}


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception:  # noqa: BLE001  (not up yet)
            pass
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    docs = render(VALUES, name="e2e")
    service = docs["rayservice.yaml"][0]
    validate(service)
    # the ConfigMap, where the pods would mount it
    mounted = tmp_path_factory.mktemp("configmap") / "cluster.yaml"
    mounted.write_text(docs["configmap.yaml"][0]["data"]["cluster.yaml"])
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    serve_config["applications"][0]["args"]["config"] = str(mounted)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the `ray` command
    temp = tmp_path_factory.mktemp("ray")
    cluster = RenderedCluster(service, idle_timeout_s=VALUES["autoscaler"]["idleTimeoutSeconds"])
    cluster.start(override_env={"RAY_TMPDIR": str(temp)})
    try:
        ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
        wait_for(lambda: request("GET", f"{DASHBOARD}/api/serve/applications/"), 60, "the dashboard")
        request("PUT", f"{DASHBOARD}/api/serve/applications/", serve_config)  # what KubeRay's operator sends
        status = wait_for(lambda: (lambda s: s if s["applications"].get("moeserve", {}).get("status") == "RUNNING"
                                   else None)(request("GET", f"{DASHBOARD}/api/serve/applications/")),
                          300, "the moeserve application to run")
        yield cluster, status
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_the_autoscaler_brought_an_expert_pod_and_the_groups_run_there(deployed):
    cluster, status = deployed
    alive = [n for n in ray.nodes() if n["Alive"]]
    expert_nodes = [n for n in alive if n["Resources"].get("moeserve-expert")]
    assert len(expert_nodes) == 2  # min 1 at install; the four groups needed a second pod's two slots
    assert ray.cluster_resources()["moeserve-expert"] == 4
    assert ray.available_resources().get("moeserve-expert", 0) == 0  # every slot of both pods holds a group
    attention = [n for n in alive if n["Resources"].get("moeserve-attention")]
    assert len(attention) == 1 and status["applications"]["moeserve"]["status"] == "RUNNING"


def test_http_and_grpc_answer_with_the_engines_text(deployed):
    engine = LLM()
    expected = engine.generate(["def fibonacci("], SamplingParams(max_tokens=16, temperature=0))[0]
    body = {"model": "moeserve-demo", "prompt": "def fibonacci(", "max_tokens": 16, "temperature": 0}
    req = urllib.request.Request(f"http://127.0.0.1:{HTTP_PORT}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as response:
        assert json.loads(response.read())["choices"][0]["text"] == expected.text
    stub = GenerationStub(grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}"))
    reply = stub.Generate(pb2.GenerateRequest(prompt="def fibonacci(", max_tokens=16, temperature=0), timeout=120)
    assert reply.text == expected.text and list(reply.token_ids) == expected.token_ids


def cluster_status() -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{HTTP_PORT}/v1/cluster", timeout=30) as response:
        return json.loads(response.read())


def expert_nodes() -> list:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("moeserve-expert")]


def test_under_load_a_node_of_expert_groups_is_added_and_idle_it_goes(deployed):
    import threading
    prompts = ["def fibonacci(", "import os\n", "class Stack:\n", "def add(a, b):\n", "x = [1, 2, 3]\n",
               "for i in range(10):\n"]
    expected = [o.text for o in LLM().generate(prompts, SamplingParams(max_tokens=200, temperature=0,
                                                                       ignore_eos=True))]
    texts = [None] * len(prompts)

    def complete(i: int) -> None:
        body = {"model": "moeserve-demo", "prompt": prompts[i], "max_tokens": 200, "temperature": 0,
                "ignore_eos": True}
        req = urllib.request.Request(f"http://127.0.0.1:{HTTP_PORT}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as response:
            texts[i] = json.loads(response.read())["choices"][0]["text"]

    assert cluster_status()["expert_groups"] == 4 and len(expert_nodes()) == 2
    threads = [threading.Thread(target=complete, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    status = wait_for(lambda: (lambda s: s if s["expert_groups"] == 6 else None)(cluster_status()), 180,
                      "the policy to add a node of expert groups")
    assert len(expert_nodes()) == 3  # the autoscaler launched a pod for them
    added = {a["ray_node"] for a in status["actors"] if a["name"] in ("expert-group-4", "expert-group-5")}
    assert len(added) == 1 and added <= {n["NodeID"] for n in expert_nodes()}
    for t in threads:
        t.join(300)
    assert texts == expected  # while the groups were added
    wait_for(lambda: cluster_status()["expert_groups"] == 4, 120, "the policy to remove the idle groups")
    wait_for(lambda: len(expert_nodes()) == 2, 120, "the autoscaler to take the idle pod back")
