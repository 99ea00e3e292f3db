"""The cluster from the driver's side: a local Ray (or one joined by address), the controller actor that starts and
owns the layout (`controller.py`), and a client that runs requests through prefill -> latent KV hand-off -> decode
on the shards directly. `Cluster` is what Python users, `moeserve serve` and the Serve ingress of a RayService use.
"""
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
import uuid
from typing import Optional, Sequence as Seq, Union

import ray
import ray._private.ray_constants as ray_constants
import torch

from moeserve.cluster.config import ClusterConfig
from moeserve.cluster.engine import RequestOutput
from moeserve.cluster.llm import Prompt, as_requests
from moeserve.cluster.sampling_params import SamplingParams
from moeserve.cluster.tokenizer import Tokenizer
from moeserve.kernels.args import ModelArgs
from moeserve.kernels.errors import InputError
from moeserve.kernels.load import DTYPES, check_cpu_dtype

from .client import ClusterClient
from .controller import NAMESPACE, Controller, StartInterrupted, node_resource

LOCAL_ONLY_ENV = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR  # "0": Ray keeps to 127.0.0.1


class Cluster:
    """`with Cluster(ClusterConfig()) as c: c.generate(["def f("], SamplingParams(max_tokens=16))`."""

    def __init__(self, config: Optional[ClusterConfig] = None, name: Optional[str] = None):
        """`name`: a cluster that outlives this process: a Cluster started with the name of one that runs with the
        same config attaches to it (a restarted Serve replica to its RayService's cluster); one with another
        config is stopped and replaced. Without a name, a cluster of its own."""
        self.config = config or ClusterConfig()
        self.name = name
        self.args = ModelArgs.from_file(self.config.model)
        self.tokenizer = Tokenizer(self.config.model) if Tokenizer.exists(self.config.model) else None
        self.started_ray = False
        self.controller = None                   # the Controller actor
        self.prefill_shards, self.decode_shards = [], []
        self.client: Optional[ClusterClient] = None
        self.private_dir: Optional[str] = None   # the local Ray's temp tree, when this cluster made one

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- start --------------------------------------------------------------------------------------------

    def _init_ray(self, runtime_env: Optional[dict] = None) -> None:
        spec, rc = self.config.topology_spec, self.config.ray
        if ray.is_initialized():
            return
        if rc.address:
            ray.init(address=rc.address, logging_level=logging.WARNING, log_to_driver=False, runtime_env=runtime_env)
            return
        # Ray makes its temp directory world-writable; inside a 0700 directory of ours nobody else can reach it,
        # and shutdown removes the whole tree
        self.private_dir = tempfile.mkdtemp(prefix="moeserve-")
        temp_dir = rc.temp_dir or os.path.join(self.private_dir, "ray")
        os.environ.setdefault("RAY_TMPDIR", temp_dir)
        # Ray swaps a loopback node address for the machine's own (so that other machines could join) unless it
        # takes the cluster for one that stays on this machine: tell it so, here and in every process it starts,
        # and its servers, the object store's and the workers' listen on 127.0.0.1 only
        self._saved_local_only = os.environ.get(LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
        os.environ[LOCAL_ONLY_ENV] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        # token auth (Ray's default for a new local cluster) with a fresh token handed to Ray's processes through
        # the environment rather than a file in the user's home; a cluster joined by address brings its own
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        # a private single-machine cluster: loopback only, no dashboard unless asked, every node's resource here
        ray.init(_temp_dir=temp_dir, _node_ip_address="127.0.0.1", include_dashboard=rc.dashboard,
                 resources={node_resource(i): 1000 for i in range(spec.nodes)}, logging_level=logging.WARNING,
                 log_to_driver=False, num_cpus=max(2, os.cpu_count() or 2), runtime_env=runtime_env)
        self.started_ray = True

    def start(self, runtime_env: Optional[dict] = None) -> "Cluster":
        cfg, spec = self.config, self.config.topology_spec
        if cfg.expert_groups != spec.num_gpus:
            raise InputError(f"expert_groups ({cfg.expert_groups}) must equal the topology's GPU slots "
                             f"({spec.num_gpus}): each group is one slot")
        if (self.args.n_routed_experts + cfg.redundant_experts) % spec.num_gpus:
            raise InputError(f"{self.args.n_routed_experts} experts + {cfg.redundant_experts} redundant slots do "
                             f"not split evenly over {spec.num_gpus} expert groups")
        check_cpu_dtype(DTYPES[cfg.dtype])  # before any actor starts: a clear error, not dead actors
        self._init_ray(runtime_env)
        shards = cfg.prefill_shards + cfg.decode_shards
        gpus = ray.cluster_resources().get("GPU", 0)
        for pool in ("attention", "experts"):
            if getattr(cfg.devices, pool) == "cuda" and not gpus and cfg.placement == "topology":
                self.shutdown()
                raise InputError(f"devices.{pool}: cuda, but the Ray cluster has no GPUs; use auto or cpu")
        if cfg.kv_transfer == "nccl" and gpus < shards:
            self.shutdown()
            raise InputError(f"kv_transfer: nccl puts each attention shard on a GPU of its own: {shards} needed, "
                             f"the Ray cluster has {gpus:g}; use kv_transfer: object_store")
        prefix = self.name or f"moeserve-{uuid.uuid4().hex[:8]}"
        self.controller = self._running(prefix)
        if self.controller is None:
            self._start_controller(prefix)
        self.prefill_shards, self.decode_shards = ray.get(self.controller.shards.remote())
        self.client = ClusterClient(self.args, self.tokenizer, self.prefill_shards, self.decode_shards,
                                    cfg.engine.kv_cache_tokens, cfg.engine.block_size, self.recover_timeout_s)
        return self

    def _start_controller(self, prefix: str) -> None:
        """A new controller, once it has started every actor of the layout. Where an actor, or the controller itself,
        died on the way (a crash or a lost node, not an error of the config), what was started is discarded and the
        start made once more: a controller Ray restarts could not rebuild a layout that never served, and the actors
        started hold the names the next start needs."""
        cfg = self.config
        for attempt in range(2):
            self.controller = ray.remote(Controller).options(
                num_cpus=0, max_concurrency=64, max_restarts=-1 if cfg.failures.restart else 0,
                name=f"{prefix}-controller", namespace=NAMESPACE, lifetime="detached",
            ).remote(cfg.model_dump(), self.private_dir, prefix)
            try:
                ray.get(self.controller.start.remote())
                return
            except ray.exceptions.RayTaskError as e:
                if attempt or not isinstance(e.cause, StartInterrupted):
                    self.shutdown()
                    raise (e.cause if isinstance(e.cause, InputError) else e) from None
                reason = str(e.cause)
            except ray.exceptions.RayActorError as e:
                if attempt or e.actor_init_failed:  # its __init__ raised: as it would again
                    self._discard(prefix)
                    self.shutdown()
                    raise
                reason = f"the controller died ({str(e).splitlines()[0]})"
            self._discard(prefix)
            logging.getLogger("moeserve").warning("%s while the cluster started; starting it again", reason)

    def _discard(self, prefix: str) -> None:
        """Kill the controller and every actor named after this cluster, and wait until their names are free."""
        ray.kill(self.controller)
        self.controller = None
        ours = re.compile(rf"{re.escape(prefix)}-(controller|(prefill-)?expert-group-\d+|prefill-\d+|decode-\d+)")
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and ours.fullmatch(a["name"])]
        for name in names:
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE))
            except ValueError:  # gone meanwhile
                pass
        for name in names + [f"{prefix}-controller"]:
            Controller._await_gone(name)

    def _running(self, prefix: str):
        """The controller of a cluster of this name that runs with this config, if there is one; one with another
        config is stopped."""
        if self.name is None:
            return None
        try:
            controller = ray.get_actor(f"{prefix}-controller", namespace=NAMESPACE)
        except ValueError:
            return None
        if ray.get(controller.config_dump.remote()) == self.config.model_dump():
            return controller
        ray.get(controller.stop.remote())
        ray.kill(controller)
        return None

    @property
    def recover_timeout_s(self) -> float:
        """How long a request whose shard died tries to resume (0 where dead actors stay dead)."""
        return self.config.failures.recover_timeout_s if self.config.failures.restart else 0.0

    # ---- requests -----------------------------------------------------------------------------------------

    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 params: Union[SamplingParams, Seq[SamplingParams], None] = None) -> list[RequestOutput]:
        """Same contract as `LLM.generate`: every request is checked first; outputs in prompt order."""
        requests = as_requests(prompts, params, self.tokenizer)
        for i, (tokens, p) in enumerate(requests):
            try:
                self.client.check(tokens, p)
            except InputError as e:
                raise InputError(f"prompt {i}: {e}") from None
        return self.client.generate(requests)

    @property
    def kv_transfer_bytes(self) -> int:
        return self.client.kv_transfer_bytes

    # ---- the live layout: the controller's --------------------------------------------------------------------

    def rebalance(self, load: Optional[torch.Tensor] = None) -> dict:
        """One round of EPLB (migration-aware, topology-aware) on `load`, by default the tokens per logical expert
        per MoE layer the shards routed since the last round or check, applied as a new numbered placement
        version while requests run (see Controller.rebalance): the version, the experts moved, the tokens counted,
        and the per-group load max/mean of each MoE layer before and after."""
        return self._call("rebalance", load)

    def scale_experts(self, groups: int) -> dict:
        """Serve with `groups` expert groups, a topology node's worth at a time (see Controller.scale_experts)."""
        return self._call("scale_experts", groups)

    def status(self) -> dict:
        """Every actor (role, node, pid, state), the placement version, the last rebalance, the recoveries."""
        return self._call("status")

    def stats(self) -> dict:
        return {**self._call("stats"), "kv_transfer_bytes": self.kv_transfer_bytes}

    def measured_load(self, layers: list[int]) -> torch.Tensor:
        """Tokens per logical expert [layers, E] the shards routed since the last call (or round)."""
        return self._call("measured_load", layers)

    def _call(self, method: str, *args):
        """A controller method's result; an InputError it raised is raised here as itself. While Ray restarts a
        controller that died, the call waits for the new one (up to failures.recover_timeout_s) and is made again:
        every method is safe to repeat (a second rebalance finds little to move, a scaling to the size it reached
        does nothing)."""
        deadline = time.monotonic() + self.recover_timeout_s
        while True:
            try:
                return ray.get(getattr(self.controller, method).remote(*args))
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, InputError):
                    raise e.cause from None
                raise
            except ray.exceptions.ActorUnavailableError:  # restarting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _view(self, key: str):
        return self._call("view")[key]

    where = property(lambda self: self._view("where"), doc="actor name -> its node, GPU slot, host and process")
    version = property(lambda self: self._view("version"), doc="the placement version being served")
    phy2log = property(lambda self: self._view("phy2log"), doc="MoE layer -> logical expert per physical slot")
    groups = property(lambda self: self._view("groups"), doc="the expert-group actors (the decode shards' pool)")
    recoveries = property(lambda self: self._view("recoveries"), doc="each recovery from lost actors")
    last_rebalance = property(lambda self: self._view("last_rebalance"))

    # ---- teardown -----------------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every actor this cluster started and wait until their processes have exited."""
        if self.controller is not None and ray.is_initialized():
            try:
                ray.get(self.controller.stop.remote(timeout_s), timeout=timeout_s + 30)
            except Exception:  # noqa: BLE001  (the controller is gone: its actors go with the Ray job below)
                pass
            ray.kill(self.controller)
        self.controller = None
        self.prefill_shards, self.decode_shards = [], []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
            if os.environ.get("RAY_TMPDIR", "").startswith(self.private_dir):
                del os.environ["RAY_TMPDIR"]
            env, ray_constants.ENABLE_RAY_CLUSTER = self._saved_local_only
            if env is None:
                os.environ.pop(LOCAL_ONLY_ENV, None)
            else:
                os.environ[LOCAL_ONLY_ENV] = env
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None
