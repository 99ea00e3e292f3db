"""The network a deployment runs on: nodes, GPUs, NICs, planes, bandwidths, latencies.

Glossary:
- node: a host; its GPUs talk over NVLink (or, on the CPU test machine, shared memory).
- plane: in a multi-plane fat-tree, NIC i of every node connects to plane i, and each plane is its own
  two-layer fat-tree; traffic never crosses planes inside the network, so a GPU reaches another node
  through its own plane, landing on the GPU with the same index there.
- relay: that GPU on the target node, which forwards a token to the GPUs holding its experts.
"""
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TopologySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    nodes: int = Field(ge=1, description="hosts in the cluster")
    gpus_per_node: int = Field(ge=1)
    nics_per_node: int = Field(ge=0, description="scale-out NICs per node; NIC i serves GPU i")
    planes: int = Field(ge=1, description="1 (single fat-tree) or nics_per_node (multi-plane)")
    intra_node_gbps: float = Field(gt=0, description="effective NVLink bandwidth per GPU, GB/s")
    nic_gbps: float = Field(gt=0, description="bandwidth of one NIC, GB/s (400 Gb/s InfiniBand = 50)")
    switch_radix: int = Field(default=64, ge=2)
    intra_node_latency_us: float = Field(default=2.0, ge=0)
    inter_node_latency_us: float = Field(default=5.0, ge=0)
    planes_down: list[int] = Field(default_factory=list, description="planes out of service")
    nic_names: list[str] = Field(default_factory=list, description="the RDMA device of each NIC, NIC i first (e.g. "
                                 "mlx5_0 ... mlx5_7): the actor of GPU slot i of a node gets NCCL_IB_HCA naming NIC "
                                 "i's, so that its NCCL traffic leaves on the plane the planner chose")

    @model_validator(mode="after")
    def _consistent(self) -> "TopologySpec":
        if self.nodes > 1 and self.nics_per_node == 0:
            raise ValueError(f"{self.nodes} nodes need scale-out NICs: nics_per_node is 0")
        if self.planes not in (1, self.nics_per_node) and self.nics_per_node:
            raise ValueError(f"planes ({self.planes}) must be 1 or equal nics_per_node ({self.nics_per_node}): "
                             "NIC i of every node sits on plane i")
        if self.nics_per_node > self.gpus_per_node:
            raise ValueError(f"nics_per_node ({self.nics_per_node}) exceeds gpus_per_node ({self.gpus_per_node})")
        if self.nic_names and len(self.nic_names) != self.nics_per_node:
            raise ValueError(f"nic_names names {len(self.nic_names)} NICs; the nodes have {self.nics_per_node}")
        bad = [p for p in self.planes_down if not 0 <= p < self.planes]
        if bad:
            raise ValueError(f"planes_down names plane {bad[0]}, but planes are 0..{self.planes - 1}")
        if self.planes_down and len(set(self.planes_down)) == self.planes and self.nodes > 1:
            raise ValueError("every plane is down: no route between nodes")
        return self

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def plane_of(self, local_gpu: int) -> int:
        """The plane GPU `local_gpu` of a node reaches other nodes on (through its NIC)."""
        if self.planes == 1:
            return 0
        return local_gpu % self.planes

    def nic_name(self, gpu: int) -> Optional[str]:
        """The RDMA device GPU slot `gpu` (a global index) sends through: its node's NIC of the same local index
        (NIC i serves GPU i), or None where the spec names none."""
        if not self.nic_names:
            return None
        return self.nic_names[(gpu % self.gpus_per_node) % self.nics_per_node]

    @property
    def live_planes(self) -> list[int]:
        return [p for p in range(self.planes) if p not in self.planes_down]

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TopologySpec":
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls(**data)

    def scaled(self, nodes: Optional[int] = None) -> "TopologySpec":
        return self.model_copy(update={"nodes": nodes}) if nodes else self


PRESETS = {
    # DeepSeek's H800 cluster: 8 GPUs and 8 x 400 Gb/s InfiniBand NICs per node, one plane per NIC.
    "h800-mpft": TopologySpec(name="h800-mpft", nodes=4, gpus_per_node=8, nics_per_node=8, planes=8,
                              intra_node_gbps=160.0, nic_gbps=50.0, switch_radix=64),
    # GB200 NVL72: 72 GPUs in one NVLink domain at 900 GB/s; no scale-out hop inside it.
    "gb200-nvl72": TopologySpec(name="gb200-nvl72", nodes=1, gpus_per_node=72, nics_per_node=0, planes=1,
                                intra_node_gbps=900.0, nic_gbps=50.0, switch_radix=64),
    # This machine: simulated nodes on one host (Ray raylets), two "GPUs" and two planes each.
    "cpu-local": TopologySpec(name="cpu-local", nodes=2, gpus_per_node=2, nics_per_node=2, planes=2,
                              intra_node_gbps=10.0, nic_gbps=1.0, switch_radix=8,
                              intra_node_latency_us=50.0, inter_node_latency_us=1000.0),
}


def load_topology(name_or_path: str) -> TopologySpec:
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"topology {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    return TopologySpec.from_yaml(path)


def fat_tree_size(radix: int, layers: int = 2, planes: int = 1) -> tuple[int, int]:
    """(endpoints, switches) of a fat-tree of `radix`-port switches: two layers give k^2/2 endpoints and
    3k/2 switches, three layers k^3/4 and 5k^2/4; a multi-plane network is `planes` such trees."""
    k = radix
    if k % 2:
        raise ValueError("a fat-tree needs an even switch radix")
    if layers == 2:
        endpoints, switches = k * k // 2, 3 * k // 2
    elif layers == 3:
        endpoints, switches = k ** 3 // 4, 5 * k * k // 4
    else:
        raise ValueError("layers must be 2 or 3")
    return endpoints * planes, switches * planes
