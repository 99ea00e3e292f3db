"""DeepSeek-V3 / V2: MLA attention, DeepSeekMoE, and the multi-token-prediction (MTP) module.

Reads top to bottom like DeepSeek-V3's reference `inference/model.py`. Two forms of MLA stand side by
side: `naive` decompresses the latent into per-head keys and values (cheap for a long prompt), `absorbed`
folds `wkv_b` into the query and the output so attention reads only the latent cache (cheap per decode
step). Both read the same cache rows.

Shapes: B batch rows, S new tokens per row, L cached positions, H heads, T tokens, C = latent_dim.

A forward is also a generator (`Transformer.steps`, `Block.steps`, `MoE.steps`) that yields each time an MoE layer's
tokens are with remote experts (the transport's `combine` yields): a caller with several micro-batches runs the
others meanwhile, on one thread (DeepSeek-V3's decode overlap); `forward` runs the generator through (`run_through`).

A padded batch (rows of different lengths) runs *packed*: only its valid tokens flow through the layers, as
[T, dim], and only attention, which needs each row's tokens together, sees them padded to [B, S]. With prompts
of mixed lengths, half of a padded batch can be padding.
"""
import functools
from typing import Callable, Generator, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .cache import LatentCacheView
from .fp8 import dense_weight
from .experts import MLP, ExpertTransport, LocalExperts, tokens_per_expert
from .rope import apply_rotary_emb, rope_freqs_cis, rope_inv_freq

MLAForm = Literal["naive", "absorbed"]


def cheaper_mla_form(args: ModelArgs, new: int, cached: int) -> MLAForm:
    """The MLA form with fewer multiply-adds for rows of `new` query tokens over `cached` positions (this call's
    included). Naive decompresses every position's key and value once, then scores in the head dimensions;
    absorbed folds wkv_b into each query and output, then scores every (query, position) pair in the latent.
    Prompt chunks come out naive, decoding (one or two tokens over a long cache) absorbed."""
    H, C, nope, v = args.n_heads, args.kv_lora_rank, args.qk_nope_head_dim, args.v_head_dim
    naive = cached * C * H * (nope + v) + new * cached * H * (args.qk_head_dim + v)
    absorbed = new * H * C * (nope + v) + new * cached * H * (2 * C + args.qk_rope_head_dim)
    return "naive" if naive < absorbed else "absorbed"


# The most extra multiply-adds per token that folding wkv_b into the query and output projections may add (about
# 2 us of arithmetic on a CPU): folding saves the absorbed form two einsums a layer, some 0.1 ms of small ops
# whatever the model's size, and pays only where the projections are small (see MLA.fold_absorbed).
FOLD_MAX_EXTRA_MACS = 100_000


def folding_pays(args: ModelArgs) -> bool:
    """Whether folded absorbed projections cost at most FOLD_MAX_EXTRA_MACS more per token than the plain ones
    and the einsums they replace. True for the demo model (20k more); DeepSeek-V3's would add some 400M."""
    H, C, nope, v = args.n_heads, args.kv_lora_rank, args.qk_nope_head_dim, args.v_head_dim
    q_in = args.q_lora_rank or args.dim
    plain = q_in * H * args.qk_head_dim + H * nope * C + H * C * v + H * v * args.dim
    folded = q_in * H * (C + args.qk_rope_head_dim) + H * C * args.dim
    return folded - plain <= FOLD_MAX_EXTRA_MACS


class Packing:
    """The valid tokens of a padded batch [B, S]: `unpad` keeps them ([B, S, ...] -> [T, ...]), `pad` puts them
    back in place with zeros between ([T, ...] -> [B, S, ...]). `index` [T]: their flat positions in the batch.
    `spans`, where the caller knows them on the host: each row's (first position, valid tokens), with which prompt
    attention runs row by row (see MLA._naive_rows)."""

    def __init__(self, index: torch.Tensor, shape: tuple[int, int], spans: Optional[list[tuple[int, int]]] = None):
        self.index = index
        self.shape = torch.Size(shape)
        self.spans = spans

    @classmethod
    def of_valid(cls, valid: np.ndarray, starts: Optional[list[int]] = None) -> "Packing":
        """The valid tokens of a [B, S] host array of flags (each row's valid tokens first), the rows' first
        positions `starts` where known; the index built on the host."""
        spans = list(zip(starts, valid.sum(axis=1).tolist())) if starts is not None else None
        return cls(torch.from_numpy(np.flatnonzero(valid)), valid.shape, spans)

    def to(self, device: torch.device) -> "Packing":
        return Packing(self.index.to(device, non_blocking=True), self.shape, self.spans)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(self.shape.numel(), *x.shape[1:])
        out.index_copy_(0, self.index, x)
        return out.view(*self.shape, *x.shape[1:])


def packing_of(valid: Optional[torch.Tensor]) -> Optional[Packing]:
    """A Packing when some of the batch is padding, else None (the batch runs as it is). Reads `valid` on the
    host: callers that serve (the engine's runner) build their Packing from lengths they know instead."""
    if valid is None or bool(valid.all()):
        return None
    return Packing(valid.flatten().nonzero().squeeze(1), tuple(valid.shape))


def embedding(vocab_size: int, dim: int) -> nn.Embedding:
    """nn.Embedding, its weight drawn from N(0, 1) as nn.Embedding's own, except on the meta device, where load_model
    builds the model and the checkpoint's weight replaces it: drawing there imports torch._dynamo (normal_ has no
    meta kernel but a Python reference behind torch._compile), 2-3 s of CPU in every process that loads a model."""
    weight = torch.empty(vocab_size, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(vocab_size, dim, _weight=weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32, as one fused op; in lower precision the weight applies after
        # the cast back, as in the reference
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLA(nn.Module):
    """Multi-head latent attention."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        if self.q_lora_rank is None:
            self.wq = nn.Linear(args.dim, args.n_heads * args.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, args.rms_norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, args.n_heads * args.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps)
        self.wkv_b = nn.Linear(args.kv_lora_rank, args.n_heads * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.wo = nn.Linear(args.n_heads * args.v_head_dim, args.dim, bias=False)
        self.softmax_scale = args.softmax_scale
        # the absorbed form's query and output projections with wkv_b folded in, when fold_absorbed made them
        self.folded: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def fold_absorbed(self) -> None:
        """Fold wkv_b into the projections around the absorbed form: its key half W_UK into the query projection
        ([H * (kv_lora_rank + rope), in]: each head's query comes out in the latent directly), its value half W_UV
        into wo ([dim, H * kv_lora_rank]: wo reads the attention output in the latent). The absorbed form then
        runs without its two einsums. The folded weights are copies made for inference: call again after
        changing the weights."""
        H, C, nope = self.n_heads, self.kv_lora_rank, self.qk_nope_head_dim
        dtype = self.wo.weight.dtype
        wq = (self.wq if self.q_lora_rank is None else self.wq_b).weight.detach().float().unflatten(0, (H, -1))
        w_uk, w_uv = self.wkv_b.weight.detach().float().view(H, -1, C).split([nope, self.v_head_dim], dim=1)
        wq = torch.cat([torch.einsum("hdc,hdi->hci", w_uk, wq[:, :nope]), wq[:, nope:]], dim=1).flatten(0, 1)
        wo = torch.einsum("jhd,hdc->jhc", self.wo.weight.detach().float().unflatten(1, (H, -1)), w_uv).flatten(1)
        # stored [in, out] and read through .t(), like every linear weight (see load.column_major)
        self.folded = (wq.to(dtype).t().contiguous().t(), wo.to(dtype).t().contiguous().t())

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor,
                latent_of: Callable[[torch.Tensor], torch.Tensor], form: MLAForm,
                packing: Optional[Packing] = None, attend: Optional[Callable] = None) -> torch.Tensor:
        """x [B, S, dim], or [T, dim] with a packing; freqs_cis [B, S, rope/2] complex; mask [B, S, L] additive;
        `latent_of` stores this call's latent [B, S, C] and returns every position's [B, L, C]. `attend`, when
        given, stands for both in the absorbed form: attend(latent [B, S, C], q [B, S * H, C], scale) stores the
        latent and returns the attention output [B, S * H, kv_lora_rank] read from the cache's pages."""
        folded = form == "absorbed" and self.folded is not None
        q = x if self.q_lora_rank is None else self.q_norm(self.wq_a(x))
        if folded:
            q = F.linear(q, self.folded[0])
        else:
            q = self.wq(q) if self.q_lora_rank is None else self.wq_b(q)
        kv = self.wkv_a(x)
        if packing is not None:  # the projections ran on the valid tokens only; attention needs the rows
            q, kv = packing.pad(q), packing.pad(kv)
        B, S, _ = q.shape
        H = self.n_heads
        q_nope, q_pe = q.view(B, S, H, -1).split([q.shape[-1] // H - self.qk_rope_head_dim, self.qk_rope_head_dim],
                                                  dim=-1)  # q_nope is in the latent when folded
        kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        # the shared key rotates with the queries, as one more head: one rotation instead of two
        q_pe, k_pe = apply_rotary_emb(torch.cat([q_pe, k_pe.unsqueeze(2)], dim=2), freqs_cis).split([H, 1], dim=2)
        new_latent = torch.cat([self.kv_norm(kv), k_pe.squeeze(2)], dim=-1)  # [B, S, C]
        paged = form == "absorbed" and attend is not None
        latent = None if paged else latent_of(new_latent)  # [B, L, C]
        # ragged prompts on the CPU, row by row: its fused kernel's time follows the padded batch's size
        pair_macs = H * 2 * (self.qk_nope_head_dim + self.qk_rope_head_dim)  # a query-key pair: scores, values
        if form == "naive" and packing is not None and q.device.type == "cpu" and \
                rows_pay(packing.spans, S, latent.shape[1], pair_macs):
            return self.wo(self._naive_rows(torch.cat([q_nope, q_pe], dim=-1), latent, mask, packing.spans))
        if form == "naive":
            # fused attention: the CPU's flash kernel neither stores the [B, H, S, L] scores nor allocates them afresh
            # each layer (prefill attention about 2x faster)
            k, v = self._naive_keys_values(latent)
            q = torch.cat([q_nope, q_pe], dim=-1)  # [B, S, H, qk]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask.unsqueeze(1).to(q.dtype), scale=self.softmax_scale)
            out = out.transpose(1, 2)[..., :self.v_head_dim]  # [B, S, H, v]
        else:
            if not folded:  # the einsums that fold_absorbed folds into the projections
                w_uk, w_uv = dense_weight(self.wkv_b, q_nope.dtype).view(H, -1, self.kv_lora_rank).split(  # [H, nope or v, kv_lora_rank]
                    [self.qk_nope_head_dim, self.v_head_dim], dim=1)
                q_nope = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
            # the latent holds c_kv and k_pe side by side: one product scores both parts, one query row per (s, h)
            # against the one shared latent "head"; the latent also serves as the values (c_kv, then k_pe,
            # whose outputs are dropped), which keeps v as wide as q for the fused kernel
            q = torch.cat([q_nope, q_pe], dim=-1)
            if paged:
                out = attend(new_latent, q.view(B, S * H, -1), self.softmax_scale).view(B, S, H, -1)
            else:
                out = latent_attention(q, latent, mask, self.softmax_scale, self.kv_lora_rank)
            if not folded:
                out = torch.einsum("bshc,hdc->bshd", out, w_uv)
        out = out.flatten(2)
        if packing is not None:
            out = packing.unpad(out)
        return F.linear(out, self.folded[1]) if folded else self.wo(out)

    def _naive_keys_values(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The naive form's per-head keys and values [B, L, H, qk_head_dim] decompressed from latent [B, L, C]. The
        fused attention kernel needs v as wide as q and k: v is zero-padded, and callers drop the padding's output."""
        H = self.n_heads
        kv, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_nope, v = self.wkv_b(kv).view(*latent.shape[:2], H, self.qk_nope_head_dim + self.v_head_dim).split(
            [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, H, -1)], dim=-1)
        return k, F.pad(v, (0, max(0, k.shape[-1] - self.v_head_dim)))

    def _naive_rows(self, q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor,
                    spans: list[tuple[int, int]]) -> torch.Tensor:
        """The naive form's attention one row at a time, each over its own tokens and positions only: q [B, S, H, qk],
        latent [B, L, C], mask [B, S, L]; spans: each row's (first position, valid tokens) -> the valid tokens'
        outputs packed, [T, H * v]. A padded batch of ragged prompts would attend its longest row's square for every
        row; a row starting at position 0 runs with is_causal, which lets the fused kernel skip the blocks above the
        diagonal."""
        outs = []
        for b, (start, n) in enumerate(spans):
            k, v = self._naive_keys_values(latent[b:b + 1, :start + n])
            fresh = start == 0
            out = F.scaled_dot_product_attention(
                q[b:b + 1, :n].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=fresh,
                attn_mask=None if fresh else mask[b:b + 1, None, :n, :start + n].to(q.dtype), scale=self.softmax_scale)
            outs.append(out[0].transpose(0, 1)[..., :self.v_head_dim].flatten(1))  # [n, H * v]
        return torch.cat(outs)


# What a row of its own costs beyond its attention on the CPU (a dozen small ops: slices, its decompression, its kernel
# call, about 0.1 ms), in the multiply-adds a padded batch's attention does in that time: measured with the demo model
# (4 heads, 8,000 query-key pairs) so that rows run apart only where the padding they skip outweighs their calls
ROW_CALL_MACS = 3_000_000


def rows_pay(spans: Optional[list[tuple[int, int]]], S: int, L: int, pair_macs: int) -> bool:
    """Whether prompt attention row by row (spans: each row's first position and valid tokens) does less work than
    the padded batch [B, S] over L positions; pair_macs: the multiply-adds of one query-key pair, every head."""
    if spans is None:
        return False
    rows = sum(n * (start + n) * pair_macs + ROW_CALL_MACS for start, n in spans)
    return rows < len(spans) * S * L * pair_macs


def latent_attention(q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor, scale: float, C: int) -> torch.Tensor:
    """The absorbed form's attention over a gathered history: q [B, S, H, D] (each head's query in the latent, then
    its rope part) against the one latent "head" [B, L, D], values its first C columns; mask [B, S, L] additive ->
    [B, S, H, C]. On the CPU as two batched products around a softmax: SDPA's fused kernel ran about 1.5x their time
    there for a decode step's few query rows per sequence (270 against 180 us per layer, 32 sequences of ~220
    positions). Elsewhere the fused kernel, which never holds the [B, S * H, L] scores."""
    B, S, H, D = q.shape
    L = latent.shape[1]
    if q.device.type == "cpu":
        scores = torch.bmm(q.reshape(B, S * H, D), latent.transpose(1, 2)).view(B, S, H, L)
        probs = scores.mul_(scale).add_(mask.unsqueeze(2)).softmax(dim=-1, dtype=torch.float32).to(latent.dtype)
        return torch.bmm(probs.view(B, S * H, L), latent[..., :C]).view(B, S, H, C)
    mask = mask.unsqueeze(2).expand(B, S, H, L).reshape(B, 1, S * H, L).to(q.dtype)
    out = F.scaled_dot_product_attention(q.reshape(B, 1, S * H, D), latent.unsqueeze(1), latent.unsqueeze(1),
                                         attn_mask=mask, scale=scale)
    return out.view(B, S, H, D)[..., :C]


class Gate(nn.Module):
    """Routes each token to `n_activated_experts` of the routed experts.

    Scores are softmax (V2) or sigmoid (V3) affinities. The aux-loss-free `bias` (V3's
    `e_score_correction_bias`) is added for *selection* only; the weights come from the unbiased scores.
    With groups, only experts in the `n_limited_groups` best groups may be chosen (node-limited routing
    when groups map to nodes): a group scores the sum of its top-2 biased scores (`noaux_tc`) or its best
    score (`group_limited_greedy`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups if args.topk_method != "greedy" else 1
        self.topk_groups = args.n_limited_groups
        self.topk_method = args.topk_method
        self.score_func = args.score_func
        self.norm_topk_prob = args.norm_topk_prob
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32)) \
            if args.topk_method == "noaux_tc" else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, dim] -> (weights [T, topk] fp32, indices [T, topk])."""
        scores = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = scores.softmax(dim=-1) if self.score_func == "softmax" else scores.sigmoid()
        biased = scores + self.bias if self.bias is not None else scores
        indices = select_experts(biased, self.topk, self.n_groups, self.topk_groups, self.topk_method)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices


def select_experts(scores: torch.Tensor, topk: int, n_groups: int = 1, topk_groups: int = 1,
                   method: str = "noaux_tc") -> torch.Tensor:
    """scores [T, E] -> the top-k experts [T, topk] among the `topk_groups` best of `n_groups` groups; a group
    scores its top-2 sum (`noaux_tc`) or its maximum (`group_limited_greedy`). With groups mapped to nodes
    this is node-limited routing."""
    if n_groups > 1:
        grouped = scores.view(scores.size(0), n_groups, -1)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if method == "noaux_tc" else grouped.amax(dim=-1)
        groups = group_scores.topk(topk_groups, dim=-1)[1]  # [T, topk_groups]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        scores = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
    return scores.topk(topk, dim=-1)[1]


class MoE(nn.Module):
    """DeepSeekMoE: shared experts on every token plus gated routed experts behind a transport."""

    def __init__(self, args: ModelArgs, experts: ExpertTransport):
        super().__init__()
        self.gate = Gate(args)
        self.experts = experts
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) \
            if args.n_shared_experts else None
        self.loads: list[torch.Tensor] = []  # each call's routing, [T, topk], until take_load counts it

    def take_load(self) -> torch.Tensor:
        """Tokens per routed expert [E] over the calls since the last take."""
        loads, self.loads = self.loads, []
        n_experts = self.gate.weight.shape[0]
        if not loads:
            return torch.zeros(n_experts, dtype=torch.long, device=self.gate.weight.device)
        return tokens_per_expert(torch.cat(loads), n_experts)

    def forward(self, x: torch.Tensor, micro_batch: int = 0) -> torch.Tensor:
        return run_through(self.steps(x, micro_batch))

    def steps(self, x: torch.Tensor, micro_batch: int = 0) -> Generator[None, None, torch.Tensor]:
        """forward, yielding where the experts' transport waits for remote experts (`micro_batch`: which of a step's
        concurrent micro-batches this is; a transport keeps their messages apart)."""
        shape = x.shape
        x = x.view(-1, shape[-1])
        weights, indices = self.gate(x)
        self.loads.append(indices)  # this call's routing, counted per expert by take_load (bias balancing, EPLB)
        handle = self.experts.dispatch(x, indices, weights, micro_batch)
        z = self.shared_experts(x) if self.shared_experts is not None else 0  # overlaps remote experts
        y = yield from self.experts.combine(handle)
        return (y + z).view(shape)


def by_turns(forwards: list[Generator]) -> list:
    """Run forwards' generators by turns, each up to its next wait for remote experts (so that while one's tokens
    are with the experts, the next computes), and return what each returned. If one raises, the others are closed
    (their transports let go of the layers they left in flight)."""
    results = [None] * len(forwards)
    running = list(enumerate(forwards))
    try:
        while running:
            for i, forward in list(running):
                try:
                    next(forward)
                except StopIteration as done:
                    results[i] = done.value
                    running.remove((i, forward))
    except BaseException:
        for _, forward in running:
            forward.close()
        raise
    return results


def run_through(forward: Generator):
    """What a forward's generator returns, run with nothing beside it."""
    return by_turns([forward])[0]


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, experts: Optional[ExpertTransport]):
        super().__init__()
        self.layer_id = layer_id
        self.attn = MLA(args)
        self.ffn = MoE(args, experts) if args.is_moe_layer(layer_id) else MLP(args.dim, args.inter_dim)
        self.attn_norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.rms_norm_eps)

    def forward(self, x, freqs_cis, mask, cache: Optional[LatentCacheView], positions, form: MLAForm,
                packing: Optional[Packing] = None, micro_batch: int = 0):
        return run_through(self.steps(x, freqs_cis, mask, cache, positions, form, packing, micro_batch))

    def steps(self, x, freqs_cis, mask, cache: Optional[LatentCacheView], positions, form: MLAForm,
              packing: Optional[Packing] = None, micro_batch: int = 0):
        def latent_of(latent):
            return latent if cache is None else cache.update(self.layer_id, latent, positions)
        attend = None
        if getattr(cache, "decode", None) is not None:  # a paged cache view with a decode kernel
            attend = functools.partial(cache.attend, self.layer_id, C=self.attn.kv_lora_rank)
        x = x + self.attn(self.attn_norm(x), freqs_cis, mask, latent_of, form, packing, attend)
        ffn_in = self.ffn_norm(x)
        if isinstance(self.ffn, MoE):
            return x + (yield from self.ffn.steps(ffn_in, micro_batch))
        return x + self.ffn(ffn_in)


class MTP(nn.Module):
    """Multi-token prediction module k: from the main model's hidden state h_i and the embedding of token
    t_{i+k}, predicts t_{i+k+1}. h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]), then one full block and
    the output head. `h_i` is the main model's final-normed hidden state, as DeepSeek-V3 is served."""

    def __init__(self, layer_id: int, args: ModelArgs, experts: Optional[ExpertTransport]):
        super().__init__()
        self.embed = embedding(args.vocab_size, args.dim)
        self.enorm = RMSNorm(args.dim, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.dim, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(layer_id, args, experts)
        self.norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, h, next_tokens, freqs_cis, mask, cache, positions, form: MLAForm,
                packing: Optional[Packing] = None, micro_batch: int = 0) -> torch.Tensor:
        return run_through(self.steps(h, next_tokens, freqs_cis, mask, cache, positions, form, packing, micro_batch))

    def steps(self, h, next_tokens, freqs_cis, mask, cache, positions, form: MLAForm,
              packing: Optional[Packing] = None, micro_batch: int = 0):
        """h [B, S, dim] and next_tokens [B, S], or [T, dim] and [T] with a packing."""
        x = self.eh_proj(torch.cat([self.enorm(self.embed(next_tokens)), self.hnorm(h)], dim=-1))
        return (yield from self.block.steps(x, freqs_cis, mask, cache, positions, form, packing, micro_batch))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x)).float()


def local_experts_factory(args: ModelArgs) -> Callable[[int], ExpertTransport]:
    return lambda layer_id: LocalExperts(args.n_routed_experts, args.dim, args.moe_inter_dim)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, make_experts: Optional[Callable[[int], ExpertTransport]] = None,
                 with_mtp: bool = True):
        """`make_experts(layer_id)` builds each MoE layer's transport; by default all experts are local."""
        super().__init__()
        self.args = args
        make_experts = make_experts or local_experts_factory(args)
        self.embed = embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            Block(i, args, make_experts(i) if args.is_moe_layer(i) else None) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.rms_norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        n_mtp = args.n_mtp_layers if with_mtp else 0
        self.mtp = nn.ModuleList(MTP(args.n_layers + k, args, make_experts(args.n_layers + k)) for k in range(n_mtp))
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def rope(self, positions: torch.Tensor):
        return rope_freqs_cis(self.inv_freq, positions, self.args.rope_attention_factor)

    @staticmethod
    def causal_mask(positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """[B, S, L] additive mask: a query attends to keys at its own position or before."""
        allowed = key_positions[:, None, :] <= positions[:, :, None]
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cache: Optional[LatentCacheView] = None, form: Optional[MLAForm] = None,
                valid: Optional[torch.Tensor] = None, micro_batch: int = 0,
                packing: Optional[Packing] = None) -> torch.Tensor:
        """tokens [B, S] at positions [B, S] (default 0..S-1) -> final-normed hidden states [B, S, dim].
        With a cache, each row attends to its cached positions 0..p; without, only to this call's tokens.
        `form` defaults to naive without a cache, else to the cheaper one (`cheaper_mla_form`).
        `valid` [B, S] marks the real tokens of a padded batch: only those are computed (padding comes out 0).
        `micro_batch` numbers this call among a step's concurrent ones (see `steps`). `packing`, when given,
        stands for `valid` (built from lengths the caller knows, so nothing is read back from the device)."""
        return run_through(self.steps(tokens, positions, cache, form, valid, micro_batch, packing))

    def steps(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
              cache: Optional[LatentCacheView] = None, form: Optional[MLAForm] = None,
              valid: Optional[torch.Tensor] = None, micro_batch: int = 0,
              packing: Optional[Packing] = None) -> Generator[None, None, torch.Tensor]:
        """forward as a generator that yields while an MoE layer's routed experts compute elsewhere: the caller
        runs another micro-batch (numbered `micro_batch`, so the transport keeps their messages apart) meanwhile."""
        positions, mask, freqs_cis, form = self._prepare(tokens, positions, cache, form)
        packing = packing or packing_of(valid)
        h = self.embed(tokens if packing is None else packing.unpad(tokens))
        for layer in self.layers:
            h = yield from layer.steps(h, freqs_cis, mask, cache, positions, form, packing, micro_batch)
        h = self.norm(h)
        return h if packing is None else packing.pad(h)

    def _prepare(self, tokens, positions, cache, form):
        B, S = tokens.shape
        if positions is None:
            positions = torch.arange(S, device=tokens.device).expand(B, S)
        length = cache.length(positions) if cache is not None else S
        if form is None:
            form = "naive" if cache is None else cheaper_mla_form(self.args, S, length)
        if form == "absorbed" and getattr(cache, "decode", None) is not None:
            return positions, None, self.rope(positions), form  # the paged decode masks as it reads
        key_positions = torch.arange(length, device=tokens.device).expand(B, -1) if cache is not None else positions
        return positions, self.causal_mask(positions, key_positions), self.rope(positions), form

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h).float()

    def mtp_forward(self, h: torch.Tensor, next_tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                    cache: Optional[LatentCacheView] = None, form: Optional[MLAForm] = None, depth: int = 0,
                    valid: Optional[torch.Tensor] = None, micro_batch: int = 0, packing: Optional[Packing] = None,
                    last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [B, S, vocab] for t_{i+depth+2} from hidden states h [B, S, dim] of positions i and the
        tokens t_{i+depth+1} [B, S]. The MTP block caches under its own layer id, n_layers + depth, so a cache
        that serves drafting has n_layers + n_mtp_layers layers. `valid` as in `forward` (padding's logits are
        0: the head runs on the valid tokens only); `packing` as in `forward`. With `last` [B], only the logits at
        position last[b] of each row: [B, vocab] (a draft needs no more)."""
        return run_through(self.mtp_steps(h, next_tokens, positions, cache, form, depth, valid, micro_batch, packing,
                                          last))

    def mtp_steps(self, h: torch.Tensor, next_tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                  cache: Optional[LatentCacheView] = None, form: Optional[MLAForm] = None, depth: int = 0,
                  valid: Optional[torch.Tensor] = None, micro_batch: int = 0, packing: Optional[Packing] = None,
                  last: Optional[torch.Tensor] = None) -> Generator[None, None, torch.Tensor]:
        """mtp_forward as a generator (see `steps`)."""
        if not len(self.mtp):
            raise RuntimeError("this model has no MTP module (num_nextn_predict_layers is 0 or it was not loaded)")
        positions, mask, freqs_cis, form = self._prepare(next_tokens, positions, cache, form)
        module = self.mtp[depth]
        packing = packing or packing_of(valid)
        if packing is not None:
            h, next_tokens = packing.unpad(h), packing.unpad(next_tokens)
        x = yield from module.steps(h, next_tokens, freqs_cis, mask, cache, positions, form, packing, micro_batch)
        if last is not None:
            x = x if packing is None else packing.pad(x)
            return module.logits(x[torch.arange(len(last), device=x.device), last])
        logits = module.logits(x)
        return logits if packing is None else packing.pad(logits)
