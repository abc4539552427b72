"""SeerAttention's AttnGate: a small learned block scorer distilled from the model's own attention.

Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (arXiv 2410.13276; code
microsoft/SeerAttention, `seer_attn/prefill_sparse/attn_gate.py`). Pre-RoPE queries and keys are pooled
per block of 64 (ceil mode: a trailing partial block pools its valid tokens only): queries by
`q_pool` (default avg), keys by `k_pool` (default max, min, avg, concatenated in that order); each
head maps its pooled vector linearly to `gate_dim` = 128 (q per query head, k per KV head, no bias,
init N(0, 0.02)), the results are rotated by RoPE at the block-start positions 0, b, 2b, ... (all
`gate_dim` channels here, a stated choice: the official code rotates the model's head_dim channels
only, identical when head_dim = gate_dim), and scored `Q K^T / sqrt(gate_dim)` with the block-causal
mask (diagonal kept). The training target is the row-normalised 2-D max-pool over 64 x 64 tiles of
the model's causal attention probabilities (`block_max_ground_truth`, computed one query block at a
time in O(L nb) memory), and the loss is 10 x KL(target || softmax(gate)) with `mean` reduction
over the rows past the first quarter (`gate_loss`); only the gate trains.

Selection (`select_blocks`), as the official `get_sparse_attn_mask_from_nz_ratio` / `_threshold`
(`seer_attn/modules/common.py`): `density` keeps per query-block row the top k = max(1, floor((1 -
sqrt(1 - density)) nb)) blocks by gate logits (the nz_ratio rule), or `threshold` keeps blocks whose
softmaxed score exceeds it; the last two query-block rows are dense by default (`last_block_dense`),
then the block-causal part is kept. The diagonal block is not forced (official); `force_diagonal`
adds it. A top-k row never ends empty (its valid blocks outrank the masked ones); a thresholded row
can only when `threshold >= 1 / nb`, and such rows are allowed (their output is zero).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from blockattn.layout import BlockLayout, _cdiv

__all__ = ["SeerAttentionGate", "block_max_ground_truth", "gate_loss", "invert_rope", "load_gates", "save_gates",
           "select_blocks", "topk_for_density"]

POOLS = ("avg", "max", "min")


def _pool(x: Tensor, block: int, how: str) -> Tensor:
    """`[B, H, L, D] -> [B, H, nb, D]`, a trailing partial block pooled over its valid tokens only."""
    batch, heads, length, dim = x.shape
    n = _cdiv(length, block)
    pad = n * block - length
    if how == "avg":
        total = nn.functional.pad(x, (0, 0, 0, pad)).view(batch, heads, n, block, dim).sum(3)
        counts = torch.full((n,), float(block), device=x.device, dtype=x.dtype)
        counts[-1] = block - pad
        return total / counts.view(1, 1, n, 1)
    fill = float("-inf") if how == "max" else float("inf")
    blocks = nn.functional.pad(x, (0, 0, 0, pad), value=fill).view(batch, heads, n, block, dim)
    return blocks.amax(3) if how == "max" else blocks.amin(3)


def _rope_tables(positions, dim: int, theta: float, device) -> tuple[Tensor, Tensor]:
    """Plain RoPE `(cos, sin)` `[n, dim]` at `positions` (an int n means 0..n-1), rotate-half layout."""
    if isinstance(positions, int):
        positions = torch.arange(positions, device=device)
    inv = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    angles = positions.to(device=device, dtype=torch.float32).view(-1, 1) * inv
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


def _rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """RoPE (rotate-half, as Llama/SmolLM2) over the last dim of `[B, H, n, h]` at `positions [n]`."""
    dim = x.shape[-1]
    cos, sin = (t.to(x.dtype) for t in _rope_tables(positions, dim, theta, x.device))
    half = dim // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def invert_rope(y: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Pre-RoPE `x` from post-RoPE `y = x cos + rotate_half(x) sin` (RoPE is orthogonal:
    `x = y cos - rotate_half(y) sin`), for gates fed from an attention function that sees rotated q/k."""
    half = y.shape[-1] // 2
    return y * cos - torch.cat([-y[..., half:], y[..., :half]], -1) * sin


class SeerAttentionGate(nn.Module):
    """The per-layer AttnGate. `forward(q_nope, k_nope)` with pre-RoPE q `[B, Hq, L, D]`, k `[B, Hkv, L, D]`
    returns block logits `[B, Hq, nb, nb]` (-inf above the block diagonal)."""

    def __init__(self, heads_q: int, heads_kv: int, head_dim: int, *, block_size: int = 64, gate_dim: int = 128,
                 q_pool: tuple[str, ...] = ("avg",), k_pool: tuple[str, ...] = ("max", "min", "avg"),
                 rope_theta: float = 10000.0, force_double: bool = False, model_rope_theta: float | None = None):
        super().__init__()
        for name, value in (("heads_q", heads_q), ("heads_kv", heads_kv), ("head_dim", head_dim),
                            ("block_size", block_size), ("gate_dim", gate_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if heads_q % heads_kv:
            raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")
        if gate_dim % 2:
            raise ValueError(f"gate_dim must be even (RoPE pairs channels), got {gate_dim}")
        for name, pools in (("q_pool", q_pool), ("k_pool", k_pool)):
            if not pools or any(p not in POOLS for p in pools):
                raise ValueError(f"{name} must be a non-empty tuple of {POOLS}, got {pools!r}")
        self.heads_q, self.heads_kv, self.head_dim = heads_q, heads_kv, head_dim
        self.block_size, self.gate_dim, self.rope_theta = block_size, gate_dim, float(rope_theta)
        # the model's own RoPE, which SeerAttention inverts to recover the pre-RoPE q/k the gate reads (the
        # gate's block RoPE uses `rope_theta`; both are the model's theta when trained by seer_train)
        self.model_rope_theta = float(rope_theta if model_rope_theta is None else model_rope_theta)
        self.q_pool, self.k_pool = tuple(q_pool), tuple(k_pool)
        # the official "double" case projects q too; the single case keeps pooled q and gives k one
        # map per query head
        self.project_queries = len(q_pool) > 1 or gate_dim != head_dim or force_double
        init = lambda *shape: nn.Parameter(torch.randn(*shape) * 0.02)  # noqa: E731
        self.q_weight = init(heads_q, len(q_pool) * head_dim, gate_dim) if self.project_queries else None
        self.k_weight = init(heads_kv if self.project_queries else heads_q, len(k_pool) * head_dim, gate_dim)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    @property
    def trained(self) -> bool:
        return int(self.trained_steps) > 0

    def forward(self, q_nope: Tensor, k_nope: Tensor) -> Tensor:
        if q_nope.dim() != 4 or k_nope.dim() != 4 or q_nope.shape[1] != self.heads_q or \
                k_nope.shape[1] != self.heads_kv or q_nope.shape[3] != self.head_dim or \
                k_nope.shape[3] != self.head_dim or q_nope.shape[2] != k_nope.shape[2]:
            raise ValueError(f"expected q_nope [B, {self.heads_q}, L, {self.head_dim}] and k_nope "
                             f"[B, {self.heads_kv}, L, {self.head_dim}], got {list(q_nope.shape)} and "
                             f"{list(k_nope.shape)}")
        b = self.block_size
        q_bar = torch.cat([_pool(q_nope, b, p) for p in self.q_pool], -1)
        k_bar = torch.cat([_pool(k_nope, b, p) for p in self.k_pool], -1)
        group = self.heads_q // self.heads_kv
        if self.project_queries:
            q_hat = torch.einsum("bhnd,hde->bhne", q_bar, self.q_weight)
            k_hat = torch.einsum("bhnd,hde->bhne", k_bar, self.k_weight).repeat_interleave(group, 1)
        else:
            q_hat = q_bar
            k_hat = torch.einsum("bhnd,hde->bhne", k_bar.repeat_interleave(group, 1), self.k_weight)
        n = q_hat.shape[2]
        starts = torch.arange(n, device=q_nope.device) * b
        q_hat, k_hat = _rope(q_hat, starts, self.rope_theta), _rope(k_hat, starts, self.rope_theta)
        logits = q_hat @ k_hat.transpose(-1, -2) / math.sqrt(self.gate_dim)
        future = torch.ones(n, n, dtype=torch.bool, device=q_nope.device).triu(1)
        return logits.masked_fill(future, float("-inf"))

    def select(self, q_nope: Tensor, k_nope: Tensor, *, density: float | None = None,
               threshold: float | None = None, last_block_dense: bool = True, force_diagonal: bool = False,
               allow_untrained: bool = False) -> BlockLayout:
        """The layout this gate selects (see `select_blocks`); an untrained gate is refused unless
        `allow_untrained` (e.g. for the untrained baseline)."""
        if not (self.trained or allow_untrained):
            raise ValueError("this SeerAttentionGate has not been trained (trained_steps = 0); train it or load "
                             "trained gates, or pass allow_untrained=True for an untrained baseline")
        return select_blocks(self(q_nope, k_nope), length=q_nope.shape[2], block_size=self.block_size,
                             density=density, threshold=threshold, last_block_dense=last_block_dense,
                             force_diagonal=force_diagonal)

    def config(self) -> dict:
        return dict(heads_q=self.heads_q, heads_kv=self.heads_kv, head_dim=self.head_dim,
                    block_size=self.block_size, gate_dim=self.gate_dim, q_pool=list(self.q_pool),
                    k_pool=list(self.k_pool), rope_theta=self.rope_theta, model_rope_theta=self.model_rope_theta)


def save_gates(gates: dict[int, SeerAttentionGate], path: str, *, model: str) -> str:
    """Write per-layer gates `{layer index: gate}` with their configuration and the model they were trained for."""
    if not gates or not all(isinstance(g, SeerAttentionGate) for g in gates.values()):
        raise ValueError("gates must be a non-empty {layer: SeerAttentionGate} mapping")
    first = next(iter(gates.values()))
    torch.save({"model": model, "config": first.config(),
                "layers": {int(i): g.state_dict() for i, g in gates.items()}}, path)
    return path


def load_gates(path: str, *, model: str, block_size: int | None = None) -> dict[int, SeerAttentionGate]:
    """`{layer: gate}` saved by `save_gates`; a file for another model or block size is a ValueError."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"gate file {path!r} does not exist") from None
    if not isinstance(saved, dict) or {"model", "config", "layers"} - set(saved):
        raise ValueError(f"{path} is not a SeerAttention gate file (saved by save_gates)")
    if saved["model"] != model:
        raise ValueError(f"{path} holds gates for model {saved['model']!r}, not {model!r}")
    config = dict(saved["config"])
    if block_size is not None and config["block_size"] != block_size:
        raise ValueError(f"{path} holds gates for block_size {config['block_size']}, not {block_size}")
    config["q_pool"], config["k_pool"] = tuple(config["q_pool"]), tuple(config["k_pool"])
    gates = {}
    for layer, state in saved["layers"].items():
        gate = SeerAttentionGate(**config)
        gate.load_state_dict(state)
        gates[int(layer)] = gate
    return gates


def model_rope_theta(config) -> float:
    """The RoPE base of a transformers config: `rope_theta`, or (transformers >= 4.5x) the one in
    `rope_parameters`; only plain RoPE (no scaling) is inverted exactly."""
    theta = getattr(config, "rope_theta", None)
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if theta is None:
        theta = parameters.get("rope_theta") if isinstance(parameters, dict) else None
    if theta is None:
        raise ValueError(f"{type(config).__name__} has no rope_theta (nor rope_parameters['rope_theta'])")
    kind = parameters.get("rope_type", "default") if isinstance(parameters, dict) else "default"
    if kind != "default":
        raise ValueError(f"SeerAttention inverts plain RoPE only; this model uses rope_type={kind!r}")
    return float(theta)


def block_max_ground_truth(q: Tensor, k: Tensor, *, block_size: int = 64, scale: float | None = None) -> Tensor:
    """The distillation target `[B, Hq, nb, nb]`: per 64 x 64 tile the max of the causal attention
    probabilities `softmax(q k^T scale)` (post-RoPE q, k; GQA by head groups), each block row normalised
    over its causal blocks. One query block at a time: O(L nb) memory beyond the inputs."""
    batch, heads, length, dim = q.shape
    scale = dim ** -0.5 if scale is None else float(scale)
    group = heads // k.shape[1]
    n = _cdiv(length, block_size)
    keys = k.repeat_interleave(group, 1)
    target = torch.zeros(batch, heads, n, n, dtype=torch.float32, device=q.device)
    cols = torch.arange(length, device=q.device)
    for block in range(n):
        lo, hi = block * block_size, min(length, (block + 1) * block_size)
        scores = (q[:, :, lo:hi].float() @ keys[:, :, :hi].float().transpose(-1, -2)) * scale
        causal = cols[:hi].view(1, -1) <= torch.arange(lo, hi, device=q.device).view(-1, 1)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        probs = nn.functional.pad(probs, (0, (block + 1) * block_size - hi))
        tile_max = probs.view(batch, heads, hi - lo, block + 1, block_size).amax(-1).amax(2)
        target[:, :, block, :block + 1] = tile_max
    return target / target.sum(-1, keepdim=True)


def gate_loss(logits: Tensor, target: Tensor, *, scale: float = 10.0) -> Tensor:
    """`scale` x KLDivLoss(mean) of log_softmax(gate logits) against the target, the first quarter of the
    query-block rows dropped (the official "for training stability")."""
    first = logits.shape[2] // 4
    log_p = torch.log_softmax(logits[:, :, first:], -1)
    t = target[:, :, first:]
    kl = torch.where(t > 0, t * (torch.log(t.clamp(min=1e-30)) - log_p), torch.zeros_like(t))
    return scale * kl.mean()


def topk_for_density(density: float, blocks: int) -> int:
    """Blocks kept per query-block row for a target causal density: max(1, floor((1 - sqrt(1 - density)) nb))."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    return max(1, math.floor((1 - math.sqrt(1 - density)) * blocks))


def select_blocks(logits: Tensor, *, length: int, block_size: int = 64, density: float | None = None,
                  threshold: float | None = None, last_block_dense: bool = True,
                  force_diagonal: bool = False) -> BlockLayout:
    """A causal per-head `BlockLayout` from gate logits `[B, Hq, nb, nb]`: top-k by logits per row for
    `density`, or softmax score > `threshold`; the last two rows dense when `last_block_dense`, the
    diagonal block added when `force_diagonal` (not the official rule)."""
    if (density is None) == (threshold is None):
        raise ValueError("give exactly one of density and threshold")
    n = _cdiv(length, block_size)
    if logits.dim() != 4 or tuple(logits.shape[2:]) != (n, n):
        raise ValueError(f"logits must be [B, H, {n}, {n}] for length {length} and block_size {block_size}, "
                         f"got {list(logits.shape)}")
    causal = torch.ones(n, n, dtype=torch.bool, device=logits.device).tril()
    if density is not None:
        k = min(topk_for_density(density, n), n)
        top = logits.topk(k, dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"threshold must lie in [0, 1), got {threshold!r}")
        keep = torch.softmax(logits, -1) > threshold
    if last_block_dense:
        keep[:, :, -2:] = True
    keep = keep & causal
    if force_diagonal:
        keep |= torch.eye(n, dtype=torch.bool, device=logits.device)
    return BlockLayout.from_dense(keep, q_len=length, k_len=length, block_q=block_size, block_k=block_size,
                                  causal=True, allow_empty_rows=threshold is not None and not force_diagonal)
