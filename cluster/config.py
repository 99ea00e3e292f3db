"""The cluster configuration: one pydantic model, loaded from YAML. `ClusterConfig()` is the demo model on the
default disaggregated layout: one prefill shard, one decode shard, four expert groups with four redundant
expert slots, on the `cpu-local` topology (two simulated nodes of two "GPUs" each)."""
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moeserve.kernels.errors import ConfigError
from moeserve.topology.spec import PRESETS, TopologySpec

from .llm import DEMO_MODEL


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(16, ge=1)
    kv_cache_tokens: int = Field(16384, ge=16, description="latent KV capacity per attention shard, in tokens")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1, description="tokens per step on a decode shard (decodes first, "
                                        "then prefill chunks)")
    prefill_max_num_batched_tokens: int = Field(
        2048, ge=1, description="tokens per step on a prefill shard: it has no running decodes for a long step to "
        "stall, so it takes larger batches (a burst of prompts reaches the decode shards together)")
    prefix_caching: bool = True
    micro_batches: int = Field(1, ge=1, le=8, description="micro-batches per step on an attention shard, "
                               "run by turns on one thread so that one computes attention while another's "
                               "tokens are with the experts")


class RebalanceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    auto: bool = Field(True, description="rebalance by itself when the measured load is uneven")
    interval_s: float = Field(30.0, gt=0, description="how often the load of the last interval is checked")
    threshold: float = Field(1.25, gt=1, description="rebalance when an MoE layer's per-group load max/mean, "
                             "measured over the last interval, exceeds this")
    min_tokens: int = Field(2048, ge=1, description="tokens an interval must have routed before its load counts")


class ScalingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_expert_groups: Optional[int] = Field(None, ge=1, description="grow the expert groups up to this many, a "
                                             "topology node's worth (gpus_per_node) at a time, when they are busy; "
                                             "null: a fixed number (expert_groups), which is also the floor")
    target_tokens_per_s: float = Field(2000.0, gt=0, description="(token, expert) pairs per second an expert group "
                                       "should compute: above it a node of groups is added, below half of it the "
                                       "last added node's groups are drained and removed")
    interval_s: float = Field(30.0, gt=0, description="how often the groups' load is checked")
    start_timeout_s: float = Field(600.0, gt=0, description="how long added groups may wait for a node offering "
                                   "their resource (Ray's autoscaler brings one) before the scale-up is abandoned")


class FailureSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    restart: bool = Field(True, description="restart a dead expert group or attention shard in place (Ray restarts "
                          "its process, the cluster brings it up to the live placement) and resume what it was "
                          "doing: a step retries its experts, a request continues on a live shard; false: a dead "
                          "actor's requests fail")
    health_interval_s: float = Field(0.5, gt=0, description="how often every actor is asked whether it is alive")
    recover_timeout_s: float = Field(120.0, gt=0, description="how long a step or a request waits for a dead actor "
                                     "to come back before it fails")
    collective_timeout_s: float = Field(300.0, ge=120, description="a collective message not answered in this long "
                                        "is taken for a lost peer (a dead one is noticed at once); idle shards ping "
                                        "every 60 s, so at least 120")
    rendezvous_timeout_s: float = Field(30.0, gt=0, description="how long the members of the collective "
                                        "transport's process group wait for each other as it forms; one that dies "
                                        "meanwhile leaves the others waiting this long, then the group is formed "
                                        "again with its replacement")


Device = Literal["auto", "cpu", "cuda"]


class DeviceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attention: Device = Field("auto", description="where the attention shards compute: auto = on GPUs where the Ray "
                              "cluster has some (each shard asks Ray for attention_gpus), else on CPUs; cuda = on "
                              "GPUs, refused where there are none; cpu = never on a GPU")
    experts: Device = Field("auto", description="where the expert groups compute, as for attention. attention on "
                            "GPUs with experts: cpu is the CPU-offload layout (KTransformers' idea): the routed "
                            "experts' weights in CPU nodes' memory, attention and the shared experts on the GPUs")
    attention_gpus: Optional[float] = Field(None, gt=0, le=8, description="GPUs each attention shard asks Ray for; "
                                            "null: 0.5 where the expert groups are on GPUs too (a shard shares its "
                                            "slot's GPU with that slot's group), else 1")
    expert_gpus: Optional[float] = Field(None, gt=0, le=8, description="GPUs each expert group asks Ray for; null: "
                                         "0.5 where the attention shards are on GPUs too, else 1")


def on_gpus(device: str, cluster_gpus: float) -> bool:
    """Whether a pool configured for `device` runs on GPUs in a Ray cluster with `cluster_gpus` of them."""
    return device == "cuda" or (device == "auto" and cluster_gpus > 0)


class RaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: Optional[str] = Field(None, description="join this Ray cluster; None starts a local one")
    temp_dir: Optional[str] = Field(None, description="where a local Ray writes; default inside a fresh private "
                                    "(0700) temp directory, removed at shutdown")
    dashboard: bool = Field(False, description="start Ray's dashboard (off: nothing listens that need not)")
    threads_per_actor: int = Field(1, ge=1, description="torch threads in each actor")
    client_timeout_s: float = Field(120.0, gt=0, description="a client (a driver or a Serve replica) that has not "
                                    "polled a shard for this long is taken for dead: its requests there are aborted")


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(str(DEMO_MODEL), description="checkpoint directory")
    dtype: Literal["float32", "bfloat16"] = "float32"
    fp8_resident: Optional[bool] = Field(None, description="an FP8 checkpoint's weights stay e4m3 and compute in "
                                         "FP8, attention and experts alike (true), are dequantised into dtype at "
                                         "load (false), or stay e4m3 on the actors that compute on GPUs (null)")
    moe_kernel: Literal["auto", "grouped", "triton"] = Field(
        "auto", description="how the expert groups compute their routed rows: grouped (torch._grouped_mm; FP8 "
        "experts one at a time), triton (the fused-MoE Triton kernel, FP8 experts stacked too; needs triton), or "
        "auto (triton for FP8 experts on GPUs, else grouped)")
    prefill_shards: int = Field(1, ge=1)
    decode_shards: int = Field(1, ge=1)
    expert_groups: int = Field(4, ge=1, description="expert-group actors, one per topology GPU slot")
    redundant_experts: int = Field(4, ge=0, description="extra physical expert slots for EPLB replicas")
    shared_expert_groups: bool = Field(True, description="prefill and decode shards use the same expert groups; "
                                       "false gives the prefill shards a pool of their own (one group per slot)")
    mtp: bool = Field(False, description="MTP speculative decoding on the decode shards")
    transport: Literal["collective", "ray"] = Field(
        "collective", description="dispatch/combine as point-to-point messages between the shards and the expert "
        "groups (fast; over gloo or Unix sockets: collective_backend), or as Ray actor calls; both carry the same wire "
        "format")
    collective_backend: Literal["auto", "gloo", "sockets"] = Field(
        "auto", description="what carries the collective transport's messages: gloo (torch.distributed), or a Unix "
        "socket between each pair of actors, for a cluster whose actors all run on one machine (no gloo rendezvous "
        "or I/O thread per message: faster where the actors share a few CPU cores); auto: sockets on a cluster that "
        "moeserve starts on this machine, gloo on one it joins (ray.address)")
    collective_spin_us: Optional[int] = Field(
        None, ge=0, le=1_000_000, description="over sockets: how long a receive polls its socket before it sleeps in "
        "the kernel, in microseconds (on a CPU a process that sleeps between a decode step's layers runs its next "
        "work slower; polling takes a core); null (auto): 2000 where the machine has a core for each decode shard "
        "and expert group, 0 where they outnumber its cores; 0: never poll")
    kv_transfer: Literal["object_store", "nccl"] = Field(
        "object_store", description="how a prompt's latent KV reaches its decode shard: Ray's object store, or "
        "NCCL between GPU shards (needs cupy)")
    dispatch_dtype: Literal["auto", "fp8", "bf16", "float32"] = Field(
        "auto", description="token rows sent to the experts: auto = the experts' compute dtype (exact: the cluster "
        "equals the single-process engine); fp8 (1x128 tile scales) or bf16 halve or quarter the bytes and are "
        "lossy where the experts compute in a wider dtype")
    combine_dtype: Literal["auto", "bf16", "float32"] = Field(
        "auto", description="expert outputs sent back: auto = the compute dtype (exact), or bf16")
    topology: Union[str, TopologySpec] = Field("cpu-local", description="a preset name or an inline spec")
    max_nodes: int = Field(4, ge=1, description="node limit M of the dispatch planner")
    placement: Literal["topology", "resources"] = Field(
        "topology", description="topology: topology node i is the Ray node offering moeserve-node-i (a fixed "
        "cluster, or the local one); resources: each expert group asks Ray for one moeserve-expert and each "
        "attention shard for one moeserve-attention, which autoscaled worker groups offer (the Helm chart)")
    engine: EngineSettings = EngineSettings()
    devices: DeviceSettings = DeviceSettings()
    rebalance: RebalanceSettings = RebalanceSettings()
    scaling: ScalingSettings = ScalingSettings()
    failures: FailureSettings = FailureSettings()
    ray: RaySettings = RaySettings()

    @model_validator(mode="after")
    def _fits(self) -> "ClusterConfig":
        spec = self.topology_spec
        if self.expert_groups > spec.num_gpus:
            raise ValueError(f"expert_groups ({self.expert_groups}) exceeds the topology's {spec.num_gpus} GPU slots")
        if spec.num_gpus % self.expert_groups:
            raise ValueError(f"expert_groups ({self.expert_groups}) must divide the topology's {spec.num_gpus} GPUs")
        most = self.scaling.max_expert_groups
        if most is not None and (most < self.expert_groups or most % spec.gpus_per_node):
            raise ValueError(f"scaling.max_expert_groups ({most}) must be at least expert_groups "
                             f"({self.expert_groups}) and a multiple of the topology's {spec.gpus_per_node} GPUs "
                             "per node (groups come and go a node at a time)")
        if most is not None and not self.shared_expert_groups:
            raise ValueError("scaling.max_expert_groups needs shared_expert_groups: true")
        return self

    def gpus_per_actor(self, pool: Literal["attention", "experts"], cluster_gpus: float) -> float:
        """The GPUs each actor of a pool asks Ray for, in a Ray cluster with `cluster_gpus` GPUs (0: on CPUs).
        A shard of GPU slot i and slot i's expert group share one GPU when both pools are on GPUs."""
        d = self.devices
        if not on_gpus(getattr(d, pool), cluster_gpus):
            return 0.0
        other = d.experts if pool == "attention" else d.attention
        asked = d.attention_gpus if pool == "attention" else d.expert_gpus
        return asked if asked is not None else 0.5 if on_gpus(other, cluster_gpus) else 1.0

    @property
    def topology_spec(self) -> TopologySpec:
        if isinstance(self.topology, TopologySpec):
            return self.topology
        if self.topology not in PRESETS:
            raise ValueError(f"topology {self.topology!r} is not a preset ({', '.join(PRESETS)}); give a preset "
                             "name or an inline spec")
        return PRESETS[self.topology]

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "ClusterConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such cluster config")
        try:
            data = yaml.safe_load(path.read_text()) or {}
            return cls(**data)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "config"
            raise ConfigError(f"{path}: {where}: {first['msg']}") from None
