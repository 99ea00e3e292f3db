"""How a prompt's latent KV moves from the prefill shard that computed it to the decode shard that continues it.

`object_store` (default, works everywhere): the latent rides inside the `PrefilledSequence` that the prefill
shard hands straight to the decode shard (one actor call per step and decode shard), through Ray's object store;
the client never holds it.

`nccl` (GPUs): the `PrefilledSequence` carries only the latent's shape (a tensor on the `meta` device, so its
byte count is still reported); the prefill shard keeps the latent on its GPU until the decode shard pulls it
over NCCL (Ray's collective library, which drives NCCL through cupy), on a two-rank group per (prefill,
decode) pair: rank 0 the prefill shard, rank 1 the decode shard. The decode shard asks for one sequence at a
time per pair, so sends and receives on a pair always match in order.
"""
import threading

import ray
import torch
from ray.util import collective

from moeserve.cluster.engine import PrefilledSequence


def pair_group(prefill: int, decode: int) -> str:
    return f"moeserve-kv-{prefill}-{decode}"


def create_pair_groups(prefill_shards: list, decode_shards: list) -> None:
    """Declare the NCCL groups (from the driver): one per (prefill, decode) pair, the prefill shard rank 0."""
    for p, prefill in enumerate(prefill_shards):
        for d, decode in enumerate(decode_shards):
            collective.create_collective_group([prefill, decode], 2, [0, 1], backend="nccl",
                                               group_name=pair_group(p, d))


def check_nccl() -> None:
    """Raise a clear error where the NCCL transfer cannot work (no GPU, or no cupy)."""
    if not torch.cuda.is_available():
        raise RuntimeError("kv_transfer: nccl needs a GPU in every attention shard; use kv_transfer: object_store")
    if not collective.nccl_available():
        raise RuntimeError("kv_transfer: nccl needs cupy (pip install cupy-cuda12x) for Ray's NCCL groups; "
                           "use kv_transfer: object_store")


class NcclSender:
    """The prefill shard's side: latents parked on the GPU until their decode shard pulls them."""

    def __init__(self):
        self.parked: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()

    def detach(self, pre: PrefilledSequence) -> PrefilledSequence:
        with self.lock:
            self.parked[pre.request_id] = pre.latent.to("cuda", non_blocking=True)
        pre.latent = torch.empty(pre.latent.shape, dtype=pre.latent.dtype, device="meta")
        return pre

    def send(self, request_id: str, group_name: str) -> None:
        with self.lock:
            latent = self.parked.pop(request_id)
        collective.send(latent, 1, group_name)
        torch.cuda.current_stream().synchronize()

    def drop(self, request_id: str) -> None:
        """The request ended before its decode shard pulled it."""
        with self.lock:
            self.parked.pop(request_id, None)


class NcclReceiver:
    """The decode shard's side: pulls a latent from the prefill shard that holds it."""

    def __init__(self, prefill_shards: list):
        self.prefill_shards = prefill_shards
        self.locks = [threading.Lock() for _ in prefill_shards]

    def attach(self, pre: PrefilledSequence, source: int, decode_index: int) -> PrefilledSequence:
        buffer = torch.empty(pre.latent.shape, dtype=pre.latent.dtype, device="cuda")
        group = pair_group(source, decode_index)
        with self.locks[source]:  # one transfer at a time per pair: sends and receives match in order
            sent = self.prefill_shards[source].send_kv.remote(pre.request_id, group)
            collective.recv(buffer, 0, group)
            torch.cuda.current_stream().synchronize()
        ray.get(sent)
        pre.latent = buffer  # stays on the GPU: `Engine.add_prefilled` writes it into the cache there
        return pre
