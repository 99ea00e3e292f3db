"""The attention-shard actor: embedding, attention, dense FFN, shared experts, gates, norms, LM head and MTP
module, with its own paged latent cache and engine; the routed experts live in the expert groups and are
reached through `RayExpertTransport`. A `prefill` shard computes prompts and hands each sequence's latent KV
to a decode shard; a `decode` shard runs the continuous-batching loop in a thread of its own."""
import os
import socket
import threading

import ray
import torch

from moeserve.cluster.config import ClusterConfig
from moeserve.cluster.engine import Engine, EngineConfig, PrefilledSequence, RequestOutput
from moeserve.cluster.sampling_params import SamplingParams
from moeserve.cluster.tokenizer import Tokenizer
from moeserve.kernels.load import load_model
from moeserve.topology.planner import Placement

from .transport import ExpertRouter, RayExpertTransport

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class AttentionShardWorker:
    def __init__(self, role: str, shard_id: int, config: dict, phy2log: dict[int, list[int]], groups: list,
                 src_gpu: int):
        cfg = ClusterConfig(**config)
        torch.set_num_threads(cfg.ray.threads_per_actor)
        self.role, self.shard_id, self.src_gpu = role, shard_id, src_gpu
        spec = cfg.topology_spec
        slots_per_gpu = len(next(iter(phy2log.values()))) // spec.num_gpus
        from moeserve.kernels.args import ModelArgs
        args = ModelArgs.from_file(cfg.model)
        placements = {layer: Placement(torch.tensor(p), slots_per_gpu, spec.gpus_per_node, args.n_expert_groups)
                      for layer, p in phy2log.items()}
        self.router = ExpertRouter(placements, groups, spec, src_gpu, args.dim, cfg.max_nodes, cfg.dispatch_dtype,
                                   cfg.combine_dtype)
        model = load_model(cfg.model, dtype=_DTYPES[cfg.dtype], with_mtp=cfg.mtp,
                           make_experts=lambda layer: RayExpertTransport(layer, self.router))
        tokenizer = Tokenizer(cfg.model) if Tokenizer.exists(cfg.model) else None
        self.engine = Engine(model, EngineConfig(mtp=cfg.mtp, **cfg.engine.model_dump()), tokenizer)
        self.lock = threading.Condition()
        self.finished: dict[str, RequestOutput] = {}
        self.kv_bytes_received = 0
        self.kv_bytes_sent = 0
        self.stopped = False
        if role == "decode":
            threading.Thread(target=self._loop, daemon=True, name=f"decode-{shard_id}").start()

    def ready(self) -> dict:
        return {"role": self.role, "shard": self.shard_id, "gpu_slot": self.src_gpu, "pid": os.getpid(),
                "host": socket.gethostname(), "ray_node": ray.get_runtime_context().get_node_id()}

    # ---- prefill ------------------------------------------------------------------------------------------

    def prefill(self, requests: list[tuple[str, list[int], SamplingParams]]) -> list:
        """Compute the prompts; return for each a PrefilledSequence, or its RequestOutput if it already finished
        (first token a stop token, or max_tokens 1)."""
        with self.lock:
            for rid, tokens, params in requests:
                self.engine.add_request(tokens, params, request_id=rid)
            done: dict[str, object] = {}
            while len(done) < len(requests):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                for seq in self.engine.prefilled():
                    pre = self.engine.take_prefilled(seq)
                    self.kv_bytes_sent += pre.kv_bytes
                    done[pre.request_id] = pre
            return [done[rid] for rid, _, _ in requests]

    # ---- decode -------------------------------------------------------------------------------------------

    def submit(self, pre: PrefilledSequence) -> None:
        with self.lock:
            self.engine.add_prefilled(pre)
            self.kv_bytes_received += pre.kv_bytes
            self.lock.notify_all()

    def wait(self, request_id: str) -> RequestOutput:
        with self.lock:
            while request_id not in self.finished:
                self.lock.wait()
            return self.finished.pop(request_id)

    def load(self) -> int:
        return len(self.engine.scheduler.running) + len(self.engine.scheduler.waiting)

    def _loop(self) -> None:
        while not self.stopped:
            with self.lock:
                while not self.engine.has_unfinished() and not self.stopped:
                    self.lock.wait()
                outputs = self.engine.step()
                for out in outputs:
                    if out.finished:
                        self.finished[out.request_id] = out
                if outputs:
                    self.lock.notify_all()

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify_all()

    def stats(self) -> dict:
        with self.lock:
            return {**self.ready(), "engine": self.engine.stats(), "links": self.router.counters.as_dict(),
                    "tokens_per_expert": {layer: load.tolist() for layer, load in self.router.expert_load.items()},
                    "kv_bytes_sent": self.kv_bytes_sent, "kv_bytes_received": self.kv_bytes_received}
