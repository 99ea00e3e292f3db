"""The controller: the actor that owns the live layout of a cluster. It starts the expert groups (placed by EPLB on
the topology's GPU slots) and the prefill and decode attention shards, and every change after goes through it as
one mechanism, a numbered placement version applied while requests run: a rebalance on measured load, expert groups
scaled up or down, an actor that died and was restarted by Ray. It watches every actor's health, the experts' load
and (where configured) the groups' throughput. Clients do not go through it: they reach the shards directly.

It is a Ray actor that Ray restarts when it dies; the new process rebuilds its view from the live actors, which
are named after the cluster (`<prefix>-expert-group-0`, `<prefix>-decode-0`, ...): their processes from `ready`,
the placement version, its expert layout and the node count from a shard (`layout`), and the recoveries so far,
which every recovery leaves on the shards (`remember`). Every actor of the cluster, the controller included, is
detached: none dies with the process that created it (Ray would otherwise end the actors an actor created when it
dies), and `stop` ends them all.

Nodes (`placement: topology`, the default): topology node i is the Ray node offering the custom resource
`moeserve-node-i` (set with `ray start --resources='{"moeserve-node-0": 100}'`). A local cluster declares every
node's resource on its one machine, which then plays all the nodes. With `placement: resources` (the Helm chart's)
an expert group asks for one `moeserve-expert` and a shard for one `moeserve-attention`, which the chart's worker
groups offer, so that Ray's autoscaler (KubeRay's) brings the nodes they need.
"""
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Optional

import ray
import torch

from moeserve.cluster.config import ClusterConfig
from moeserve.kernels.args import ModelArgs
from moeserve.kernels.errors import InputError
from moeserve.topology.eplb import gpu_imbalance, rebalance_experts, rebalance_with_migration
from moeserve.topology.spec import TopologySpec

from . import collective, kv_transfer
from .attention_shard import AttentionShardWorker
from .expert_group import ExpertGroupWorker

EXPERT_RESOURCE, ATTENTION_RESOURCE = "moeserve-expert", "moeserve-attention"
# Ray namespace of every named actor of every cluster: a driver's own namespace is a fresh anonymous one unless it
# names one, so a cluster found by name from another process (a restarted Serve replica, a second `Cluster(name=)`)
# must be looked up in a namespace of its own
NAMESPACE = "moeserve"
LOST = object()  # the answer of an actor that died (Controller._ask_all)


def node_resource(node: int) -> str:
    return f"moeserve-node-{node}"


def on_its_nic(spec: TopologySpec, slot: int) -> Optional[dict]:
    """The runtime environment that puts GPU slot `slot`'s NCCL traffic on its own NIC, and so on the plane the
    planner routes its tokens over (NCCL_IB_HCA, an exact match); None where the topology names no NICs."""
    nic = spec.nic_name(slot)
    return {"env_vars": {"NCCL_IB_HCA": f"={nic}"}} if nic else None


def placed(config: ClusterConfig, role_resource: str, slot: int) -> dict[str, float]:
    """The custom resource an actor asks Ray for: its topology node's, or its role's (see ClusterConfig.placement)."""
    if config.placement == "resources":
        return {role_resource: 1}
    return {node_resource(slot // config.topology_spec.gpus_per_node): 1}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def moe_layer_of(module_name: str, n_layers: int) -> int:
    """The MoE layer id of a model's MoE module: layers.<i>.ffn -> i, mtp.<k>.block.ffn -> n_layers + k."""
    kind, index = module_name.split(".")[:2]
    return int(index) + (n_layers if kind == "mtp" else 0)


def moe_layer_ids(args: ModelArgs, mtp: bool) -> list[int]:
    layers = [i for i in range(args.n_layers) if args.is_moe_layer(i)]
    return layers + ([args.n_layers] if mtp and args.n_mtp_layers else [])


class StartInterrupted(RuntimeError):
    """An actor of the layout died while the cluster started: not an error of the config, so starting again may
    work (Cluster.start does, once)."""


class Controller:
    """Owns the live layout of one cluster (see the module's docstring); `start` once, then the Cluster facade in
    the driver calls it."""

    def __init__(self, config: dict, private_dir: Optional[str], prefix: str):
        """`private_dir`: the local cluster's private directory (the process group meets through a file there),
        None on a Ray cluster joined by address; `prefix`: the cluster's actor names start with it."""
        self.config = ClusterConfig(**config)
        self.args = ModelArgs.from_file(self.config.model)
        self.private_dir, self.prefix = private_dir, prefix
        self.groups, self.prefill_groups, self.prefill_shards, self.decode_shards = [], [], [], []
        self.where: dict[str, dict] = {}
        self.shard_slots: list[int] = []         # each shard's GPU slot, prefill shards first
        self.spec = self.config.topology_spec     # the live node shape and count (expert groups are scaled)
        self.pending: Optional[dict] = None       # a scale-up waiting for its groups to be placed
        self.phy2log: dict[int, list[int]] = {}  # the placement being served: MoE layer -> logical expert per slot
        self.version = 0                          # its number
        self.previous: Optional[tuple[int, dict[int, list[int]]]] = None  # the placement before it while shards
                                                                          # switch from it (a rebalance): both in play
        self._load_seen: dict[str, torch.Tensor] = {}  # per (shard, layer): its tokens per expert at the last round
        self.last_rebalance: Optional[dict] = None
        self._changing = threading.Lock()         # one layout change at a time (a rebalance, a scaling)
        self._layout = threading.Lock()           # the layout's state, changed by one change's step or a recovery
                                                  # at a time; never held while waiting on a shard's step
        self._stopping = threading.Event()
        self.recoveries: list[dict] = []          # each recovery from lost actors: who, when, how long it took
        self.dead: set[str] = set()               # actors that did not come back
        self.states: dict[str, str] = {}          # actor -> alive, lost (dead, not yet back), recovering, dead
        self.rebuilt = False                      # this controller was restarted and rebuilt its view
        if ray.get_runtime_context().was_current_actor_reconstructed:
            self._rebuild()

    def start(self) -> None:
        """Start every actor of the configured layout and wait until they serve; then the watchers."""
        cfg, spec = self.config, self.config.topology_spec
        phy2log = self.phy2log = self.placement()
        self.groups = self._start_expert_groups(phy2log, range(spec.num_gpus), first_rank=0)
        self.prefill_groups = self.groups if cfg.shared_expert_groups else \
            self._start_expert_groups(phy2log, range(spec.num_gpus), first_rank=spec.num_gpus, pool="prefill-")
        config = cfg.model_dump()
        for role, count, pool, groups in (("prefill", cfg.prefill_shards, self.prefill_shards, self.prefill_groups),
                                          ("decode", cfg.decode_shards, self.decode_shards, self.groups)):
            for i in range(count):
                slot = (len(self.prefill_shards) + len(self.decode_shards)) % spec.num_gpus
                actor = ray.remote(AttentionShardWorker).options(
                    num_cpus=0, num_gpus=self._gpus("attention"), max_concurrency=256,
                    resources=placed(cfg, ATTENTION_RESOURCE, slot), max_restarts=self._restarts,
                    name=f"{self.prefix}-{role}-{i}", namespace=NAMESPACE, lifetime="detached",
                    runtime_env=on_its_nic(spec, slot),
                ).remote(role, i, config, phy2log, groups, slot, list(self.prefill_shards))
                pool.append(actor)
                self.shard_slots.append(slot)
        actors = self._actors()
        try:
            reports = ray.get([a.ready.remote() for a in actors.values()])
        except ray.exceptions.RayActorError as e:
            if e.actor_init_failed:  # as it would again
                raise
            raise StartInterrupted(f"an actor died as it started: {str(e).splitlines()[0]}") from None
        ray.get([p.set_decode_shards.remote(self.decode_shards) for p in self.prefill_shards])
        if cfg.transport == "collective" and not self._join_collective({name: r["pid"] for name, r in zip(actors,
                                                                                                         reports)}):
            raise StartInterrupted("an actor died while the cluster's process group formed")
        if cfg.kv_transfer == "nccl":
            self._pair_kv_groups()
        for name, report in zip(actors, reports):
            self.states[name] = "alive"
            self.where[name] = self._where_of(report)
        self._watch()

    def _watch(self) -> None:
        self._stopping.clear()
        if self.config.rebalance.auto:
            threading.Thread(target=self._watch_load, daemon=True, name="rebalance").start()
        threading.Thread(target=self._watch_health, daemon=True, name="health").start()
        most = self.config.scaling.max_expert_groups
        if most and most > self.config.topology_spec.num_gpus:
            threading.Thread(target=self._watch_scale, daemon=True, name="scaling").start()

    def _rebuild(self) -> None:
        """A restarted controller's view, from the live actors: found by name, their processes from `ready` (waiting
        for any that Ray is restarting: one killed with this controller may not be back yet, and a call that reaches
        it while it dies fails), the placement version, its layout and the node count from a shard that was not
        restarted (a restarted one holds the layout it started with)."""
        def named(kind: str) -> list:
            found = []
            while True:
                try:
                    found.append(ray.get_actor(f"{self.prefix}-{kind}-{len(found)}", namespace=NAMESPACE))
                except ValueError:
                    return found
        self.groups, self.prefill_shards, self.decode_shards = named("expert-group"), named("prefill"), named("decode")
        own = named("prefill-expert-group")
        self.prefill_groups = own or self.groups
        actors = self._actors()
        alive = self._await_alive(actors, time.monotonic() + self.config.failures.recover_timeout_s)
        reports = [alive[name] for name in actors]
        shards = [actors[name] for name, report in zip(actors, reports)
                  if "expert-group" not in name and not report["restarted"]] or self.decode_shards
        answers = self._ask_all([shard.layout.remote() for shard in shards])
        answered = [(shard, answer) for shard, answer in zip(shards, answers) if answer is not LOST]
        if not answered:
            raise RuntimeError("no attention shard answers: the controller cannot rebuild the cluster's layout")
        # killed while the shards switched placements (a rebalance): some plan against the one before
        layouts = sorted(((version, {int(k): v for k, v in phy2log.items()}, spec)
                          for _, (version, phy2log, spec) in answered), key=lambda layout: layout[0])
        self.version, self.phy2log, spec = layouts[-1]
        self.previous = layouts[0][:2] if layouts[0][0] != self.version else None
        self.spec = TopologySpec(**spec)
        notes = ray.get(answered[0][0].notes.remote())
        self.recoveries = notes.get("recoveries", [])
        self.shard_slots = [r["gpu_slot"] for name, r in zip(actors, reports) if "expert-group" not in name]
        for name, report in zip(actors, reports):
            self.states[name] = "alive"
            self.where[name] = self._where_of(report)
        self.rebuilt = True
        # an actor that Ray restarted while no controller watched (its process is not the one the last recovery
        # brought back) is brought to the live layout
        recovered = notes.get("pids", {})
        restarted = [name for name, report in zip(actors, reports)
                     if report["restarted"] and report["pid"] != recovered.get(name)]
        if restarted and self.config.failures.restart:
            threading.Thread(target=self.recover, args=(restarted, True), daemon=True, name="recover").start()
        if self.previous is not None:
            threading.Thread(target=self._resume_switch, daemon=True, name="switch").start()
        self._watch()

    def _resume_switch(self) -> None:
        """Finish the switch to the live placement that the controller before this one began: tell every shard
        (again), then release the placement before."""
        with self._changing:
            try:
                self._tell_all([shard.set_placement.remote(self.version, self.phy2log) for shard in self._shards()])
                self._finish_switch(self.version)
            except Exception as e:  # noqa: BLE001  (the next rebalance releases it)
                logging.getLogger("moeserve").warning("could not finish the switch to placement version %d: %s: %s",
                                                      self.version, type(e).__name__, e)

    def config_dump(self) -> dict:
        return self.config.model_dump()

    def shards(self) -> tuple[list, list]:
        return self.prefill_shards, self.decode_shards

    def view(self) -> dict:
        """What the Cluster facade mirrors: where each actor is, the placement, the recoveries."""
        return {"where": self.where, "version": self.version, "phy2log": self.phy2log, "groups": self.groups,
                "prefill_groups": self.prefill_groups, "recoveries": self.recoveries, "states": self.states,
                "last_rebalance": self.last_rebalance, "pid": os.getpid()}

    def placement(self) -> dict[int, list[int]]:
        """Initial EPLB placement (uniform load): MoE layer id -> phy2log over all expert slots."""
        spec, cfg = self.config.topology_spec, self.config
        layers = moe_layer_ids(self.args, cfg.mtp)
        E = self.args.n_routed_experts
        weight = torch.ones(len(layers), E)
        phy2log, _, _ = rebalance_experts(weight, E + cfg.redundant_experts, self.args.n_expert_groups, spec.nodes,
                                          spec.num_gpus)
        return {layer: phy2log[i].tolist() for i, layer in enumerate(layers)}

    @property
    def expert_groups(self) -> list:
        """Every expert-group actor: the decode shards' (everyone's when shared), then the prefill shards' own."""
        return [group for pool in self._pools() for group in pool]

    def _start_expert_groups(self, phy2log: dict[int, list[int]], slots: range, first_rank: int,
                             version: int = 0, pool: str = "", spec: Optional[TopologySpec] = None) -> list:
        """Expert groups for GPU slots `slots` of topology `spec` (the live one by default), each holding its slot's
        experts of placement `version`, placed on the slot's node (Ray starts them once a node offers their
        resource); a group's peers (whom it relays to) are its node's groups of the same pool (set once the pool is
        complete)."""
        cfg, spec = self.config, spec or self.spec
        groups = [ray.remote(ExpertGroupWorker).options(
            num_cpus=0, num_gpus=self._gpus("experts"), max_concurrency=16, resources=placed(cfg, EXPERT_RESOURCE, g),
            max_restarts=self._restarts, name=f"{self.prefix}-{pool}expert-group-{g}", namespace=NAMESPACE,
            lifetime="detached", runtime_env=on_its_nic(spec, g),
        ).remote(g, cfg.model, cfg.dtype, self._experts_of(phy2log, g),
                 cfg.transport, spec.model_dump(), cfg.ray.threads_per_actor, first_rank, version, cfg.devices.experts,
                 cfg.fp8_resident, cfg.moe_kernel)
            for g in slots]
        if cfg.transport == "ray" and len(groups) == spec.num_gpus:
            ray.get([self._set_peers(groups, g) for g in range(len(groups))])
        return groups

    def _gpus(self, pool: str) -> float:
        """GPUs each actor of a pool asks Ray for (see ClusterConfig.gpus_per_actor); an attention shard that hands
        its KV over NCCL holds a GPU of its own."""
        gpus = self.config.gpus_per_actor(pool, ray.cluster_resources().get("GPU", 0))
        return max(gpus, 1.0) if pool == "attention" and self.config.kv_transfer == "nccl" else gpus

    @property
    def _restarts(self) -> int:
        """Ray restarts a dead actor in place (same resources, same handle) when the cluster recovers from deaths."""
        return -1 if self.config.failures.restart else 0

    def _experts_of(self, phy2log: dict[int, list[int]], g: int) -> dict[int, list[int]]:
        """MoE layer -> the logical experts in GPU slot g's physical slots."""
        slots = self.slots_per_group
        return {layer: p[g * slots:(g + 1) * slots] for layer, p in phy2log.items()}

    def _set_peers(self, groups: list, g: int):
        """Tell group g the groups of its node, which it relays to by actor calls (ray transport)."""
        G = self.spec.gpus_per_node
        node = g // G
        return groups[g].set_peers.remote({h: groups[h] for h in range(node * G, (node + 1) * G)})

    def _join_collective(self, pids: dict[str, int]) -> bool:
        """One torch.distributed process group: the expert groups are ranks 0..G-1 (then the prefill shards' own,
        G..2G-1, when they have them), the shards follow. True once every member is in as the process of `pids`;
        False if one died meanwhile (it is to be brought back, and the group formed again)."""
        groups, shards = self.expert_groups, self.prefill_shards + self.decode_shards
        world = len(groups) + len(shards)
        prefill_first = 0 if self.prefill_groups is self.groups else len(self.groups)
        pools = {len(groups) + i: (prefill_first if i < len(self.prefill_shards) else 0, self.shard_slots[i])
                 for i in range(len(shards))}
        socket_dir, backend, spin_s = None, self.config.collective_backend, 0.0
        if backend == "auto":  # a cluster moeserve started is on this machine; one it joined may span several
            backend = "sockets" if self.private_dir is not None else "gloo"
        if backend == "sockets":  # each member's socket in a directory only this user reaches
            socket_dir = tempfile.mkdtemp(prefix="moeserve-", dir=self.private_dir)
            init_method = "unix://" + os.path.join(socket_dir, "c")
            spin_s = collective.spin_seconds(self.config.collective_spin_us,
                                             len(self.decode_shards) + len(self.groups), os.cpu_count() or 1)
        elif self.private_dir is not None:  # one machine: meet through a file only this user can reach, new each time
            init_method = "file://" + os.path.join(self.private_dir, f"gloo-rendezvous-{uuid.uuid4().hex}")
        else:
            try:
                init_method = "tcp://" + ray.get(groups[0].collective_address.remote())
            except ray.exceptions.RayActorError:
                return False
        micro_batches, failures = self.config.engine.micro_batches, self.config.failures
        timeouts = failures.collective_timeout_s, failures.rendezvous_timeout_s
        refs = [g.join_collective.remote(init_method, world, micro_batches, pools, *timeouts, spin_s)
                for g in groups] + [s.join_collective.remote(init_method, world, len(groups) + i, pools, spin_s)
                                    for i, s in enumerate(shards)]
        # a member that dies as the group forms leaves the others waiting for it (failures.rendezvous_timeout_s), and
        # a process still waiting in one group cannot enter the next: every call ends before the group is tried again
        ray.wait(refs, num_returns=len(refs))
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)  # the members' sockets are connected: nobody listens there
        if not self._alive_as(pids):
            return False
        ray.get(refs)  # any other failure is raised
        return True

    def _pair_kv_groups(self) -> None:
        """A two-rank NCCL group per (prefill, decode) pair for the latent KV hand-off."""
        try:
            ray.get([s.check_kv_transfer.remote() for s in self.prefill_shards + self.decode_shards])
        except ray.exceptions.RayTaskError as e:
            self.shutdown()
            raise InputError(str(e.cause)) from None
        kv_transfer.create_pair_groups(self.prefill_shards, self.decode_shards)

    # ---- the live layout ----------------------------------------------------------------------------------

    def rebalance(self, load: Optional[torch.Tensor] = None) -> dict:
        """One round of EPLB (migration-aware, topology-aware) on `load`, by default the tokens per logical expert
        per MoE layer the shards routed since the last round or check, applied as a new numbered placement
        version: every expert group loads its new experts beside the ones it serves (no step waits for them), the
        shards switch between two steps, and the old version is released once no shard plans against it. Returns
        the version, the experts moved, the tokens counted, and the per-group load max/mean of each MoE layer
        before and after.

        An actor that dies meanwhile is recovered into the new version once the shards were told of it (a step
        that lost its experts waits for that recovery, so the switch is awaited without holding the layout); one
        that dies before calls the round off (the groups drop what they loaded for it) and raises."""
        with self._changing:
            if load is None:  # asked of the shards before the layout is held: they answer between steps
                load = self._measured_load(sorted(self.phy2log))
            with self._layout:
                report, phy2log = self._plan_rebalance(load)
                if phy2log is not None:
                    version = self.version + 1
                    self._prepare(version, phy2log, self._pools())
                    self.previous = (self.version, self.phy2log)
                    self.phy2log, self.version = phy2log, version  # from here on a recovery restores this version
                    self._tell_all([shard.set_placement.remote(version, phy2log) for shard in self._shards()])
            if phy2log is not None:
                self._finish_switch(version)
                report["version"] = version
        self.last_rebalance = report
        return report

    def _plan_rebalance(self, load: torch.Tensor) -> tuple[dict, Optional[dict[int, list[int]]]]:
        """The round's report and its new placement (None when nothing moves)."""
        spec, layers = self.spec, sorted(self.phy2log)
        current = torch.tensor([self.phy2log[layer] for layer in layers])    # [layers, slots]
        report = {"version": self.version, "moved_experts": 0, "tokens": int(load.sum()),
                  "imbalance_before": None, "imbalance_after": None}
        if not report["tokens"]:
            return report, None
        counts = torch.zeros_like(load, dtype=torch.long).scatter_add_(1, current, torch.ones_like(current))
        new, _, new_counts, moved = rebalance_with_migration(load, current, current.shape[1],
                                                             self.args.n_expert_groups, spec.nodes, spec.num_gpus)
        report["imbalance_before"] = gpu_imbalance(load, current, counts, spec.num_gpus).tolist()
        report["imbalance_after"] = gpu_imbalance(load, new, new_counts, spec.num_gpus).tolist()
        report["moved_experts"] = moved
        return report, ({layer: new[i].tolist() for i, layer in enumerate(layers)} if moved else None)

    def _prepare(self, version: int, phy2log: dict[int, list[int]], pools: list[list]) -> None:
        """Every group of `pools` (each a pool's groups in slot order) loads its experts of placement `version` beside
        the ones it serves. If one fails (it died), the change is called off: the others drop the version again, and
        the error is raised."""
        groups = [(g, group) for pool in pools for g, group in enumerate(pool)]
        try:
            ray.get([group.prepare.remote(version, self._experts_of(phy2log, g)) for g, group in groups])
        except ray.exceptions.RayActorError as e:
            self._tell_all([group.discard.remote(version) for _, group in groups])
            raise RuntimeError(f"called off: an expert group died while loading placement version {version}; it is "
                               f"recovered into version {self.version}, which goes on serving; try again") from e

    def _finish_switch(self, version: int) -> None:
        """Wait until every shard plans against placement `version`, then release the one before on every group.
        The layout is not held while the shards' steps go on: a step that lost its experts waits for a recovery."""
        deadline = time.monotonic() + self.config.failures.recover_timeout_s
        while not all(v == version for v in self._ask_all([s.placement_version.remote()
                                                            for s in self._shards(live=True)])):
            if self._stopping.is_set():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the shards did not switch to placement version {version} within "
                                   f"{self.config.failures.recover_timeout_s:g} s")
            time.sleep(0.01)  # each switches before its next step
        with self._layout:
            if self.version == version:
                self.previous = None
                self._tell_all([group.release.remote(version) for group in self.expert_groups])

    def _pools(self) -> list[list]:
        """The pools of expert groups, each in slot order: the decode shards' (everyone's when shared), then the
        prefill shards' own."""
        return [self.groups] + ([] if self.prefill_groups is self.groups else [self.prefill_groups])

    def _shards(self, live: bool = False) -> list:
        """Every attention shard, prefill first; `live`: not those that did not come back from a death."""
        shards = self.prefill_shards + self.decode_shards
        if not live:
            return shards
        names = [f"prefill-{i}" for i in range(len(self.prefill_shards))] + \
            [f"decode-{i}" for i in range(len(self.decode_shards))]
        return [shard for name, shard in zip(names, shards) if name not in self.dead]

    @staticmethod
    def _ask_all(refs: list) -> list:
        """Each call's answer; LOST from an actor that died (its recovery brings it to the live layout)."""
        answers = []
        for ref in refs:
            try:
                answers.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                answers.append(LOST)
        return answers

    @staticmethod
    def _tell_all(refs: list) -> bool:
        """Wait for calls that change the actors; True if every actor took its change, False if some died (its
        recovery brings it to the live layout). Any other error is raised."""
        return LOST not in Controller._ask_all(refs)

    # ---- failures: every actor restarts in place, and the cluster brings it back into the live layout --------

    def _actors(self) -> dict[str, object]:
        """Every actor by its name in `where`."""
        names = [f"expert-group-{g}" for g in range(len(self.groups))] + \
            ([] if self.prefill_groups is self.groups else
             [f"prefill-expert-group-{g}" for g in range(len(self.prefill_groups))]) + \
            [f"prefill-{i}" for i in range(len(self.prefill_shards))] + \
            [f"decode-{i}" for i in range(len(self.decode_shards))]
        return dict(zip(names, self.expert_groups + self.prefill_shards + self.decode_shards))

    def _watch_health(self) -> None:
        """Ask every actor for its process id each `health_interval_s`; one that does not
        answer because it died, or answers from a new process (Ray restarted it), starts a recovery (where
        `failures.restart`; otherwise it stays lost)."""
        settings = self.config.failures
        while not self._stopping.wait(settings.health_interval_s):
            try:
                actors = {name: a for name, a in self._actors().items() if name not in self.dead}
                refs = {name: actor.ready.remote() for name, actor in actors.items()}
                lost = []
                for name, ref in refs.items():
                    try:
                        report = ray.get(ref, timeout=max(5.0, 4 * settings.health_interval_s))
                        if report["pid"] != self.where.get(name, report)["pid"]:
                            lost.append(name)
                    except ray.exceptions.RayActorError:
                        if name in self.where:  # not one a scale-down removed meanwhile
                            lost.append(name)
                    except ray.exceptions.GetTimeoutError:  # busy, not dead (a dead one fails at once)
                        pass
                for name in lost:
                    self.states[name] = "lost"
                if lost and settings.restart and not self._stopping.is_set():
                    try:
                        self.recover(lost)
                    except TimeoutError as e:  # gone for good (killed without restart, or no node to restart on)
                        self.dead.update(lost)
                        self.states.update({name: "dead" for name in lost})
                        logging.getLogger("moeserve").error("%s; its requests fail", e)
            except Exception as e:  # noqa: BLE001  (keep watching; the next round tries again)
                if not self._stopping.is_set():
                    logging.getLogger("moeserve").warning("health round failed: %s: %s", type(e).__name__, e)

    def status(self) -> dict:
        """Every actor (role, node, process, device and Ray's GPU ids, state), the placement version, the last
        rebalance's per-group load before and after, and the recoveries: what `GET /v1/cluster` and `moeserve status`
        show."""
        actors = []
        for name, where in self.where.items():
            role = "expert-group" if "expert-group" in name else name.rsplit("-", 1)[0] + "-shard"
            actors.append({"name": name, "role": role, "topology_node": where["topology_node"], "gpu": where["gpu"],
                           "ray_node": where["ray_node"], "host": where["host"], "pid": where["pid"],
                           "device": where.get("device", "cpu"), "gpu_ids": where.get("gpu_ids", []),
                           "state": self.states.get(name, "alive")})
        return {"placement_version": self.version, "transport": self.config.transport, "actors": actors,
                "expert_groups": len(self.groups), "pending_scale_up": self.pending,
                "last_rebalance": self.last_rebalance, "recoveries": self.recoveries[-20:],
                "failures_survived": sum(len(event["lost"]) for event in self.recoveries),
                "controller_rebuilt": self.rebuilt}

    def recover(self, lost: list[str], known_restarted: bool = False) -> Optional[dict]:
        """Bring actors Ray restarted back into the live layout: every shard holds its MoE layers back (a step
        whose experts failed waits, then sends them again); each restarted expert group loads the live placement's
        experts, each restarted shard plans against it; with the collective transport every member forms a new
        process group; then the shards go on. An actor that dies meanwhile (as the group forms, say) is brought back
        in the same recovery. A dead shard's requests resume on their clients' side. Returns the recovery (None when
        no actor had been restarted: one removed by a scale-down meanwhile). `known_restarted`: the `lost` actors are
        restarted ones whatever their process ids say (a rebuilt controller's)."""
        settings = self.config.failures
        with self._layout:  # no placement change in between
            start = time.monotonic()  # once the layout is ours: a change's step may have held it
            actors = self._actors()
            shards = self.prefill_shards + self.decode_shards
            # the live shards hold their MoE layers back at once: a step that lost its experts then waits for the
            # restart, however long it takes, instead of failing after its grace
            live = [actor for name, actor in actors.items() if "expert-group" not in name and name not in lost]
            ray.get([shard.quiesce.remote() for shard in live])
            try:
                reports = self._await_alive(actors, start + settings.recover_timeout_s)
            except Exception:
                ray.get([shard.resume.remote() for shard in live])  # their layers fail as they would have
                raise
            restarted = [name for name, report in reports.items() if report["pid"] != self.where[name]["pid"] or
                         (known_restarted and name in lost)]
            if not restarted:
                ray.get([shard.resume.remote() for shard in live])
                return None
            pending = list(restarted)  # not yet brought to the live layout
            while True:
                self.states.update({name: "recovering" for name in pending})
                pids = {name: report["pid"] for name, report in reports.items()}
                if self._bring_back(pending, actors, pids):
                    break
                # another actor died meanwhile: it is brought back too, and the process group formed again
                reports = self._await_alive(actors, start + settings.recover_timeout_s)
                died = [name for name, report in reports.items() if report["pid"] != pids[name]]
                pending += [name for name in died if name not in pending]
                restarted += [name for name in died if name not in restarted]
                if time.monotonic() > start + settings.recover_timeout_s:
                    raise TimeoutError(f"the process group did not form within {settings.recover_timeout_s:g} s")
            ray.get([shard.resume.remote() for shard in shards])
            for name in restarted:
                self.where[name].update(pid=reports[name]["pid"], ray_node=reports[name]["ray_node"],
                                        host=reports[name]["host"])
                self.states[name] = "alive"
        event = {"lost": restarted, "at": time.time(), "recovered_s": round(time.monotonic() - start, 3)}
        self.recoveries.append(event)
        self._remember()
        logging.getLogger("moeserve").warning("recovered from lost actors %s in %.2f s", restarted,
                                              event["recovered_s"])
        return event

    def _bring_back(self, pending: list[str], actors: dict, pids: dict[str, int]) -> bool:
        """Bring each restarted actor of `pending` to the live layout, taking it off the list once done, and with
        the collective transport form the process group anew. True once done; False if an actor died meanwhile (its
        process is no longer that of `pids`)."""
        try:
            ray.get([shard.quiesce.remote() for shard in self._shards()])
            while pending:
                self._to_live_layout(pending[0], actors[pending[0]])
                pending.pop(0)
        except ray.exceptions.RayActorError:
            return False
        return self.config.transport != "collective" or self._join_collective(pids)

    def _to_live_layout(self, name: str, actor) -> None:
        """A restarted actor started with its first arguments: a group loads its slot's experts of the placements
        in play, a shard plans against the live one."""
        if "expert-group" in name:
            g = int(name.rsplit("-", 1)[1])
            ray.get(actor.set_layout.remote(self.spec.model_dump()))
            in_play = ([self.previous] if self.previous else []) + [(self.version, self.phy2log)]
            ray.get([actor.prepare.remote(v, self._experts_of(p, g)) for v, p in in_play])
            ray.get(actor.release.remote(in_play[0][0]))
            if self.config.transport == "ray":
                pool = self.prefill_groups if name.startswith("prefill-") else self.groups
                ray.get([self._set_peers(pool, h) for h in range(len(pool))])
        else:
            pool = self.groups if name.startswith("decode-") or self.prefill_groups is self.groups else \
                self.prefill_groups
            ray.get(actor.set_layout.remote(self.version, self.phy2log, self.spec.model_dump(), pool))
            if name.startswith("prefill-"):
                ray.get(actor.set_decode_shards.remote(self.decode_shards))

    def _await_alive(self, actors: dict, deadline: float) -> dict[str, dict]:
        """Every actor's `ready` report, waiting while Ray restarts the dead ones."""
        reports: dict[str, dict] = {}
        while len(reports) < len(actors):
            for name, actor in actors.items():
                if name in reports:
                    continue
                try:
                    reports[name] = ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline or self._stopping.is_set():
                        raise TimeoutError(f"{name} did not come back within "
                                           f"{self.config.failures.recover_timeout_s:g} s") from None
                    time.sleep(0.2)
        return reports

    def _remember(self) -> None:
        """Keep the recoveries and the processes they brought back on every shard: a controller Ray restarts reads
        them back from one (see _rebuild), so that its status counts the failures before it too, and it does not
        take an actor recovered before for one that came back while no controller watched."""
        notes = {"recoveries": self.recoveries, "pids": {name: where["pid"] for name, where in self.where.items()}}
        try:
            ray.get([shard.remember.remote(notes) for shard in self.prefill_shards + self.decode_shards])
        except ray.exceptions.RayActorError as e:  # a shard died meanwhile: its own recovery remembers again
            logging.getLogger("moeserve").warning("could not keep the recoveries on every shard: %s", e)

    # ---- scaling the expert groups ---------------------------------------------------------------------------

    @property
    def slots_per_group(self) -> int:
        return (self.args.n_routed_experts + self.config.redundant_experts) // self.config.topology_spec.num_gpus

    def scale_experts(self, groups: int) -> dict:
        """Serve with `groups` expert groups: a topology node's worth (gpus_per_node) at a time, at least the
        configured `expert_groups`, at most `scaling.max_expert_groups` when set. EPLB places the experts over
        the new number of slots (redundant replicas follow it) on the load measured since the last round, as
        a new placement version. Added groups ask Ray for their resource and start once a node offers it (Ray's
        autoscaler brings one), loading their experts meanwhile while the others serve; then every shard holds
        its MoE layers back, switches to the new layout, the process group is formed anew and the shards go on.
        Removed groups are drained first (nothing in flight, nothing planned against them), then stopped.
        Returns the version, the groups before and after, and how long the groups took to start."""
        cfg, base = self.config, self.config.topology_spec
        G, most = base.gpus_per_node, cfg.scaling.max_expert_groups or base.num_gpus
        if self.prefill_groups is not self.groups:
            raise InputError("scaling expert groups needs shared_expert_groups: true")
        if groups % G or not base.num_gpus <= groups <= most:
            raise InputError(f"expert groups come and go a node ({G}) at a time between expert_groups "
                             f"({base.num_gpus}) and scaling.max_expert_groups ({most}); {groups} is not one of them")
        with self._changing:
            return self._scale(groups)

    def _scale(self, groups: int) -> dict:
        """The change of scale_experts. The layout is held only while the kept groups load the new placement and
        while the shards switch, not while added groups wait for a node. An actor that dies before the switch calls
        the change off; one that dies during it is recovered into the new layout."""
        start, old = time.monotonic(), len(self.groups)
        report = {"version": self.version, "expert_groups_before": old, "expert_groups": old, "start_s": 0.0}
        if groups == old:
            return report
        spec = self.config.topology_spec.model_copy(update={"nodes": groups // self.spec.gpus_per_node})
        layers, version = sorted(self.phy2log), self.version + 1  # only a change (this one) changes them
        load = self._measured_load(layers) + 1.0  # +1: experts not seen yet still count
        new, _, _ = rebalance_experts(load, groups * self.slots_per_group, self.args.n_expert_groups, spec.nodes,
                                      groups)
        phy2log = {layer: new[i].tolist() for i, layer in enumerate(layers)}
        added = self._start_expert_groups(phy2log, range(old, groups), first_rank=0, version=version, spec=spec)
        switched = False
        try:
            if added:
                self.pending = {"expert_groups": groups, "since": time.time()}
                reports = self._await_started(added, self.config.scaling.start_timeout_s)
            report["start_s"] = round(time.monotonic() - start, 3)
            with self._layout:
                kept, removed = self.groups[:groups], self.groups[groups:]
                self._prepare(version, phy2log, [kept])
                switched = True
                self._switch_layout(version, phy2log, spec, kept + added, reports if added else [])
        except Exception:
            if not switched:  # called off: the added groups never served
                for actor in added:
                    ray.kill(actor)
            raise
        finally:
            self.pending = None
        for actor in removed:  # drained: no layer in flight, none planned against it
            ray.kill(actor)
        for g in range(groups, old):  # their names are free again once they are gone (a later scale-up takes them)
            self._await_gone(f"{self.prefix}-expert-group-{g}")
        return {**report, "version": version, "expert_groups": groups}

    def _switch_layout(self, version: int, phy2log: dict[int, list[int]], spec: TopologySpec, pool: list,
                       added: list[dict]) -> None:
        """Make `pool` (the kept groups, then the added ones, with their `ready` reports) the expert groups, serving
        placement `version` over `spec`'s slots: every shard holds its MoE layers back, switches and goes on. The
        controller's view changes first, so that an actor that dies in between is recovered into the new layout:
        the shards are then left held back for that recovery, which forms the process group anew and lets them
        go on."""
        old = len(self.groups)
        shards = self._shards()
        self._tell_all([shard.quiesce.remote() for shard in shards])
        for g in range(len(pool), old):
            self.where.pop(f"expert-group-{g}", None)
            self.states.pop(f"expert-group-{g}", None)
        for g, report in enumerate(added):  # known before it is watched
            self.where[f"expert-group-{old + g}"] = self._where_of(report)
            self.states[f"expert-group-{old + g}"] = "alive"
        self.groups = self.prefill_groups = pool
        self.spec, self.phy2log, self.version, self.previous = spec, phy2log, version, None
        took = self._tell_all([g.set_layout.remote(spec.model_dump()) for g in pool])
        if self.config.transport == "ray":
            took &= self._tell_all([self._set_peers(pool, g) for g in range(len(pool))])
        took &= self._tell_all([s.set_layout.remote(version, phy2log, spec.model_dump(), pool) for s in shards])
        self._tell_all([g.release.remote(version) for g in pool])
        took = took and self._alive_as(self._known_pids())
        if took and self.config.transport == "collective":
            took = self._join_collective(self._known_pids())  # False: a member died as the group formed
        if took:
            self._tell_all([shard.resume.remote() for shard in shards])

    def _known_pids(self) -> dict[str, int]:
        """Each actor's process as the controller last brought it up."""
        return {name: where["pid"] for name, where in self.where.items()}

    def _alive_as(self, pids: dict[str, int]) -> bool:
        """Whether every actor answers from the process of `pids` (none died or came back meanwhile)."""
        actors = self._actors()
        answers = self._ask_all([actor.ready.remote() for actor in actors.values()])
        return all(a is not LOST and a["pid"] == pids[name] for name, a in zip(actors, answers))

    def _await_started(self, actors: list, timeout_s: float) -> list[dict]:
        """The actors' `ready` reports once Ray has placed and started them all."""
        refs = [a.ready.remote() for a in actors]
        done, waiting = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if waiting:
            raise TimeoutError(f"{len(waiting)} of {len(refs)} new expert groups were not placed within "
                               f"{timeout_s:g} s (scaling.start_timeout_s): no node offers their resource")
        return ray.get(refs)

    @staticmethod
    def _await_gone(name: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                return
            time.sleep(0.05)

    def _where_of(self, report: dict) -> dict:
        slot = report.get("gpu_slot", report.get("group"))
        return {**report, "topology_node": slot // self.spec.gpus_per_node, "gpu": slot % self.spec.gpus_per_node}

    def _watch_scale(self) -> None:
        """`scaling.max_expert_groups`: every interval, the (token, expert) pairs the groups computed per second;
        above the target per group a node of groups is added, below half of it the last added node's removed."""
        settings, G = self.config.scaling, self.spec.gpus_per_node
        seen, since = None, time.monotonic()
        while not self._stopping.wait(settings.interval_s):
            try:
                computed = sum(g["assignments_computed"] for g in ray.get([g.stats.remote() for g in self.groups]))
                now = time.monotonic()
                if seen is not None and computed >= seen:
                    rate = (computed - seen) / (now - since) / len(self.groups)
                    want = len(self.groups) + (G if rate > settings.target_tokens_per_s else
                                               -G if rate < settings.target_tokens_per_s / 2 else 0)
                    want = min(max(want, self.config.topology_spec.num_gpus), settings.max_expert_groups)
                    if want != len(self.groups):
                        logging.getLogger("moeserve").warning("scaling expert groups %d -> %d (%.0f per group/s)",
                                                              len(self.groups), want, rate)
                        self.scale_experts(want)
                        computed = sum(g["assignments_computed"]
                                       for g in ray.get([g.stats.remote() for g in self.groups]))
                        now = time.monotonic()
                seen, since = computed, now
            except Exception as e:  # noqa: BLE001  (keep watching; the next interval tries again)
                logging.getLogger("moeserve").warning("scaling skipped: %s: %s", type(e).__name__, e)

    def _watch_load(self) -> None:
        """`rebalance.auto`: every interval, the load of that interval; a round when it routed enough tokens and
        some MoE layer's per-group max/mean passes the threshold under the current placement."""
        settings = self.config.rebalance
        while not self._stopping.wait(settings.interval_s):
            try:
                with self._changing:  # the placement stays while its load is measured
                    layers = sorted(self.phy2log)
                    load = self._measured_load(layers)
                    if load.sum() < settings.min_tokens:
                        continue
                    current = torch.tensor([self.phy2log[layer] for layer in layers])
                    counts = torch.zeros_like(load, dtype=torch.long).scatter_add_(1, current,
                                                                                   torch.ones_like(current))
                    uneven = float(gpu_imbalance(load, current, counts, self.spec.num_gpus).max()) > \
                        settings.threshold
                if uneven:
                    self.rebalance(load)
            except Exception as e:  # noqa: BLE001  (a shard or group gone: the requests report it; keep watching)
                logging.getLogger("moeserve").warning("automatic rebalance skipped: %s: %s", type(e).__name__, e)

    def measured_load(self, layers: list[int]) -> torch.Tensor:
        """Tokens per expert of `layers` routed since the last measurement (one at a time: each takes them)."""
        with self._changing:
            return self._measured_load(layers)

    def _measured_load(self, layers: list[int]) -> torch.Tensor:
        """Tokens per logical expert [layers, E] that the shards routed since the last call. With `_changing` held
        (one caller at a time), never `_layout`: a shard answers between steps, and a step that lost its experts
        waits for a recovery, which takes the layout."""
        total: dict[int, torch.Tensor] = {}
        for stats in ray.get([s.stats.remote() for s in self.prefill_shards + self.decode_shards]):
            for name, load in stats["tokens_per_expert"].items():
                key = f"{stats['role']}-{stats['shard']}/{name}"
                now = torch.tensor(load)
                since, self._load_seen[key] = now - self._load_seen.get(key, torch.zeros_like(now)), now
                layer = moe_layer_of(name, self.args.n_layers)
                total[layer] = total.get(layer, 0) + since
        E = self.args.n_routed_experts
        return torch.stack([total.get(layer, torch.zeros(E, dtype=torch.long)) for layer in layers]).float()

    def stats(self) -> dict:
        shards = ray.get([s.stats.remote() for s in self.prefill_shards + self.decode_shards])
        links = {key: 0 for key in ("inter_node", "intra_node", "planned_inter_node", "planned_intra_node",
                                    "crossings", "naive_crossings")}
        planes = [0] * self.config.topology_spec.planes
        planned_planes = [0] * self.config.topology_spec.planes
        tokens_per_expert: dict[int, list[int]] = {}
        for s in shards:
            for key in links:
                links[key] += s["links"][key]
            planes = [a + b for a, b in zip(planes, s["links"]["per_plane"])]
            planned_planes = [a + b for a, b in zip(planned_planes, s["links"]["planned_per_plane"])]
            for layer, load in s["tokens_per_expert"].items():
                prev = tokens_per_expert.get(layer, [0] * len(load))
                tokens_per_expert[layer] = [a + b for a, b in zip(prev, load)]
        groups = ray.get([g.stats.remote() for g in self.expert_groups])
        decode = [s for s in shards if s["role"] == "decode"]
        return {
            "where": self.where,
            "time_s": {"decode_steps": sum(s["step_s"] for s in decode),
                       "dispatch": sum(s["links"]["dispatch_s"] for s in decode),
                       "dispatch_send": sum(s["links"]["send_s"] for s in decode),
                       "combine_wait": sum(s["links"]["combine_s"] for s in decode),
                       "experts": sum(g["compute_s"] for g in groups)},
            "bytes": {"measured": {"inter_node": links["inter_node"], "intra_node": links["intra_node"],
                                   "per_plane": planes},
                      "planned": {"inter_node": links["planned_inter_node"], "intra_node": links["planned_intra_node"],
                                  "per_plane": planned_planes},
                      "inter_node_crossings": links["crossings"], "naive_crossings": links["naive_crossings"]},
            "tokens_per_expert": tokens_per_expert,
            "placement_version": self.version, "last_rebalance": self.last_rebalance,
            "recoveries": self.recoveries, "actors": self.status()["actors"],
            "shards": shards,
            "expert_groups": groups,
        }

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every actor of the cluster and wait until their processes have exited."""
        self._stopping.set()
        with self._layout:
            for shard in self.prefill_shards + self.decode_shards:
                try:
                    ray.get(shard.stop.remote(), timeout=10)
                except Exception:  # already gone: nothing to stop
                    pass
            for actor in self.prefill_shards + self.decode_shards + self.expert_groups:
                ray.kill(actor)
            deadline = time.monotonic() + timeout_s
            pids = [w["pid"] for w in self.where.values() if w.get("host") == socket.gethostname()]
            while pids and time.monotonic() < deadline:
                pids = [pid for pid in pids if _alive(pid)]
                time.sleep(0.1)
            self.groups, self.prefill_groups, self.prefill_shards, self.decode_shards = [], [], [], []
