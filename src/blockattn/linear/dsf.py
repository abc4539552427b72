"""The Dynamical Systems Framework: every causal token mixer as one L×L mixing matrix Φ, y = Φ u.

Paper: Sieber, Amo Alonso, Didier, Zeilinger, Orvieto, "Understanding the differences in
Foundation Models: Attention, State Space Models, and Recurrent Neural Networks" (NeurIPS 2024).
Rule: a mixer is a linear time-varying system h_i = Λ_i h_{i−1} + B_i u_i, y_i = C_i h_i, so
y = Φ u with the lower-triangular Φ_ij = C_i (Π_{k=j+1..i} Λ_k) B_j. Softmax attention is the
infinite-state case (Φ = the row-normalised exponential kernel); linear attention has Λ = I and
shared B = φ(k), C = φ(q); Lightning adds a scalar decay Λ = λI; a selective SSM (S6) has an
input-dependent diagonal Λ_i = exp(Δ_i A) per channel; a gated RNN has its forget gate as Λ_i.
Attention-type mixers give one Φ per head (applied to v), SSM/RNN one per channel (applied to u).
`mixing_matrix(name, **inputs)` materialises Φ for small L so mixers can be compared side by side.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from blockattn.linear.based.chunk import taylor_feature_map


def _causal(length: int, device) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def softmax_matrix(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Φ = softmax(q kᵀ·scale) under the causal mask: `[B, H, L, L]`, rows sum to 1."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(~_causal(q.shape[-2], q.device), float("-inf")), dim=-1)


def linear_matrix(q: Tensor, k: Tensor, feature_map=None, normalize: bool = False, eps: float = 1e-12) -> Tensor:
    """Φ_ij = φ(q_i)·φ(k_j) for j ≤ i (Λ = I), optionally divided by Σ_{j≤i} φ(q_i)·φ(k_j)."""
    fq, fk = (q, k) if feature_map is None else (feature_map(q), feature_map(k))
    phi = (fq @ fk.transpose(-1, -2)) * _causal(q.shape[-2], q.device)
    return phi / (phi.sum(-1, keepdim=True) + eps) if normalize else phi


def lightning_matrix(q: Tensor, k: Tensor, decay: Tensor) -> Tensor:
    """Φ_ij = λ_h^(i−j) q_i·k_j for j ≤ i (Λ = λ_h I): Lightning Attention without normalisation."""
    length = q.shape[-2]
    pos = torch.arange(length, device=q.device, dtype=q.dtype)
    diff = (pos[:, None] - pos[None, :]).clamp(min=0)
    decay_mask = torch.exp(diff * torch.log(decay.to(q.dtype)).view(-1, 1, 1)) * _causal(length, q.device)
    return (q @ k.transpose(-1, -2)) * decay_mask


def based_matrix(q: Tensor, k: Tensor, window: int = 64) -> Tensor:
    """BASED: normalised Taylor-feature linear attention plus softmax attention over the last `window` tokens."""
    length = q.shape[-2]
    band = _causal(length, q.device) & ~torch.ones(length, length, dtype=torch.bool, device=q.device).tril(-window)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    local = torch.softmax(scores.masked_fill(~band, float("-inf")), dim=-1)
    return linear_matrix(q, k, feature_map=taylor_feature_map, normalize=True) + local


def ssm_matrix(delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Diagonal selective scan (S6, Mamba's Λ_i = exp(Δ_i A), B̄_i = Δ_i B_i), per channel.

    Args:
        delta: `[Bt, L, Ch]` step sizes > 0; A: `[Ch, N]` (negative for stability);
        B, C: `[Bt, L, N]` input-dependent projections.

    Returns:
        Φ `[Bt, Ch, L, L]` with Φ_c,ij = Σ_n C_i,n exp(A_c,n Σ_{k=j+1..i} Δ_k,c) Δ_j,c B_j,n.
    """
    length = delta.shape[1]
    cum = torch.cumsum(delta, dim=1)                                   # [Bt, L, Ch]
    gap = cum[:, :, None, :] - cum[:, None, :, :]                      # Σ_{k=j+1..i} Δ_k: [Bt, i, j, Ch]
    causal = _causal(length, delta.device)
    gap = gap.masked_fill(~causal[None, :, :, None], 0.0)
    decay = torch.exp(gap[..., None] * A)                              # [Bt, i, j, Ch, N]
    phi = torch.einsum("bin,bijcn,bjn->bcij", C, decay, B) * delta.transpose(1, 2)[:, :, None, :]
    return phi * causal


def rnn_matrix(forget: Tensor, input_gate: Tensor, output_gate: Tensor) -> Tensor:
    """Gated linear RNN (qLSTM-like), per channel: h_i = f_i h_{i−1} + g_i u_i, y_i = o_i h_i.

    Args: `[Bt, L, Ch]` gates. Returns Φ `[Bt, Ch, L, L]`, Φ_ij = o_i (Π_{k=j+1..i} f_k) g_j.
    """
    length = forget.shape[1]
    log_f = torch.cumsum(torch.log(forget.clamp_min(1e-30)), dim=1)
    causal = _causal(length, forget.device)
    gap = (log_f[:, :, None, :] - log_f[:, None, :, :]).masked_fill(~causal[None, :, :, None], float("-inf"))
    phi = output_gate[:, :, None, :] * torch.exp(gap) * input_gate[:, None, :, :]
    return phi.permute(0, 3, 1, 2)


MIXING_MATRICES = {
    "softmax": softmax_matrix,
    "linear": linear_matrix,
    "lightning": lightning_matrix,
    "based": based_matrix,
    "ssm": ssm_matrix,
    "rnn": rnn_matrix,
}


def mixing_matrix(mixer: str, **inputs) -> Tensor:
    """Φ for `mixer` in `MIXING_MATRICES`, from that mixer's inputs (see each function).

    Attention-type mixers (softmax, linear, lightning, based) return `[B, H, L, L]` acting on v;
    ssm and rnn return `[B, channels, L, L]` acting on each channel of u."""
    if mixer not in MIXING_MATRICES:
        raise ValueError(f"mixer must be one of {sorted(MIXING_MATRICES)}, got {mixer!r}")
    return MIXING_MATRICES[mixer](**inputs)


def demo_matrices(length: int = 24, dim: int = 16, seed: int = 0) -> dict[str, Tensor]:
    """Φ of every mixer on one set of random inputs (one head / channel each), for plotting."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 1, length, dim, generator=g) for _ in range(2))
    gates = [torch.sigmoid(torch.randn(1, length, 1, generator=g) + 2) for _ in range(3)]
    delta = torch.nn.functional.softplus(torch.randn(1, length, 1, generator=g))
    B, C = (torch.randn(1, length, 8, generator=g) for _ in range(2))
    A = -torch.arange(1, 9, dtype=torch.float32).view(1, 8) / 4
    return {
        "softmax": softmax_matrix(q, k)[0, 0],
        "linear": linear_matrix(q, k, feature_map=lambda x: torch.nn.functional.elu(x) + 1, normalize=True)[0, 0],
        "lightning": lightning_matrix(q / math.sqrt(dim), k, torch.tensor([0.8]))[0, 0],
        "based": based_matrix(q, k, window=4)[0, 0],
        "ssm": ssm_matrix(delta, A, B, C)[0, 0],
        "rnn": rnn_matrix(*gates)[0, 0],
    }


def plot_mixing_matrices(matrices: dict[str, Tensor], path: str) -> str:
    """PNG with one heat map per mixer (signed colour scale, shared per panel)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(matrices), figsize=(3 * len(matrices), 3.2), squeeze=False)
    for ax, (name, phi) in zip(axes[0], matrices.items()):
        phi = phi.detach().float()
        bound = phi.abs().max().item() or 1.0
        ax.imshow(phi.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_title(name)
        ax.set_xlabel("source j")
        ax.set_ylabel("target i")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
