"""The cluster config: one pydantic model from YAML, with errors that name the key."""
import pytest
from pydantic import ValidationError

from moeserve.cluster import DEMO_MODEL, ClusterConfig
from moeserve.kernels.errors import ConfigError


def test_the_example_config_is_the_default():
    assert ClusterConfig.from_yaml("examples/cluster.yaml") == ClusterConfig()
    assert ClusterConfig().model == str(DEMO_MODEL) and ClusterConfig().topology_spec.num_gpus == 4


@pytest.mark.parametrize("text, message", [
    ("decode_shards: 0\n", "decode_shards: Input should be greater than or equal to 1"),
    ("expert_groups: 8\n", "exceeds the topology's 4 GPU slots"),
    ("dispatch_dtype: int4\n", "dispatch_dtype"),
    ("engine:\n  block_sise: 8\n", "engine.block_sise: Extra inputs are not permitted"),
    ("topology: h900\n", "is not a preset"),
    ("[unclosed\n", "not valid YAML"),
    ("scaling:\n  max_expert_groups: 5\n", "multiple of the topology's 2 GPUs per node"),
    ("scaling:\n  max_expert_groups: 2\n", "at least expert_groups"),
    ("scaling:\n  max_expert_groups: 6\nshared_expert_groups: false\n", "needs shared_expert_groups: true"),
    ("failures:\n  recover_timeout_s: 0\n", "failures.recover_timeout_s: Input should be greater than 0"),
    ("failures:\n  collective_timeout_s: 30\n", "failures.collective_timeout_s: Input should be greater than or equal "
                                                 "to 120"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.from_yaml(tmp_path / "c.yaml")


def test_gpus_each_actor_asks_ray_for():
    def gpus(cluster_gpus, **devices):
        cfg = ClusterConfig(devices=devices)
        return cfg.gpus_per_actor("attention", cluster_gpus), cfg.gpus_per_actor("experts", cluster_gpus)
    assert gpus(0) == (0, 0)                                   # auto on a cluster without GPUs: CPUs
    assert gpus(8) == (0.5, 0.5)                               # a slot's shard and group share its GPU
    assert gpus(8, experts="cpu") == (1, 0)                    # CPU-offloaded experts: a whole GPU per shard
    assert gpus(8, attention_gpus=0.25) == (0.25, 0.5)
    assert gpus(0, attention="cpu", experts="cuda") == (0, 1)  # cuda asks for GPUs whatever the cluster shows
    with pytest.raises(ValidationError):
        ClusterConfig(devices={"experts": "tpu"})
    offload = ClusterConfig.from_yaml("examples/cpu-offload.yaml")  # the documented CPU-offload layout
    assert (offload.gpus_per_actor("attention", 1), offload.gpus_per_actor("experts", 1)) == (0.5, 0)
