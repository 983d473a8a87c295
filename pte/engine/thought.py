"""The thought state and the dynamic low-rank update: every equation of docs/method.md section 3.

Notation for one decoder layer: G global tokens, r latent rank, m evicted tokens, B batch rows,
H_q/H_kv query/kv heads, D head dim, d_model hidden size.

    q_g = W_Q h_g,  k_g = W_K h_g,  v_g = W_V h_g              (frozen projections of the layer)
    S_g  = N( c_G (W^a_Q q_g) (W^a_K k_g)^T (W^a_V v_g) )      initial state, G x r
    S'_e =     c_m (W^a_Q q_g) (W^a_K K_e)^T (W^a_V V_e)       from m evicted tokens, G x r
    S_e  <- N(S_e + S'_e)                                       progressive update at each eviction
    y = W x + (alpha / r) A (S_e (B x)),  A: d_out x G (zero init), B: r x d_in

c_m is the scale (``state_scale``: the paper's size-independent 1/m or 1/(m sqrt r), or 1); N is ``normalize`` (RMS or
Frobenius). Heads are flattened (K_e: [B, m, H_kv*D]); each layer's state comes from that layer's own
evicted keys/values; keys are un-rotated back to their pre-rotary form by default (``evicted_keys``)
so the state depends on content, not on absolute position. With ``evicted_context: pair`` (not the paper) each evicted
token's K and V rows are concatenated with its predecessor's, [K_t, K_{t-1}] and [V_t, V_{t-1}], so one term of the
state can bind a token to the one before it (a recalled letter to its mark's symbol). With ``write_gate`` (not the
paper) each token's term is weighted by ``g_t = 2 sigmoid(w . [K_t, V_t] + b)`` (w, b zero at init, so g = 1):

    S'_e = c_m (W^a_Q q_g) (W^a_K K_e)^T diag(g) (W^a_V V_e)

Precision (pte/training/precision.py): every parameter here is float32 and the state is built and updated in float32,
with autocast off, whatever the base model's dtype; only ThoughtLinear's update runs in the activation dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ThoughtConfig:
    """Choices the paper leaves open, with this project's defaults (paper values where it gives them).

    Args:
        rank: r, latent size of the state and of B (paper 32).
        global_tokens: G, learnable global tokens per layer (paper 32).
        alpha: scale numerator of the update, y = Wx + alpha/r * A S B x.
        target_modules: linear layers (by attribute name) that get the dynamic update.
        normalize: ``rms`` (S / rms(S)), ``frobenius`` (S / ||S||_F) or ``none``.
        state_scale: ``mean`` (1/m), ``mean_sqrt_rank`` (1/(m sqrt r)) or ``sum`` (1) on the state increments. ``mean``
            (the paper's size-independent scale) moves the state as far for one evicted token as for a hundred, so a
            schedule of one-token evictions renormalises it several times as often over the same trace; with ``sum``
            every evicted token adds its own term, and the state a trace leaves depends less on how it was cut.
        evicted_keys: ``pre_rope`` (undo the rotary embedding of evicted keys) or ``post_rope`` (as cached).
        evicted_context: ``token`` (the paper: the state sums one term per evicted token, built from its own K and V)
            or ``pair`` (each token's K and V rows concatenated with its predecessor's, W^a_K and W^a_V twice as wide).
            The sum has no cross-token terms, so with ``token`` a term can bind two facts only if one token's K/V hold
            both; on the toy base a marked letter's own K/V say which mark it belongs to at 39-82 % (docs/results.md).
        init_std: std of the global tokens; W^a and B use PyTorch's default Linear init; A is zero. It sets how far one
            eviction moves the normalised state. At 0.02 on a toy model S_g falls below the Normalize epsilon (it is
            cubic in init_std), the first eviction alone sets the state and later ones move it by under 1 %, so PTE
            can only carry what the first eviction held. docs/method.md lists measured moves per model and value.
        init_move: when set (e.g. 0.15), training a fresh adapter rescales each layer's global tokens so that one
            eviction moves the state by this fraction (pte/engine/calibrate.py): the state starts with a memory
            whatever the model's K/V scale; ``init_std`` then only draws their direction.
        write_gate: weight each evicted token's term by ``2 sigmoid(w . [K_t, V_t] + b)``, per layer, w and b zero at
            init (not the paper). The term itself is bilinear in the token's K/V, so making most tokens' terms small
            while keeping a few large takes both W^a_K and W^a_V; the gate can shut a token out with one direction.
        state_grad: ``detach`` (the paper's memory claim: the carried state is a constant in each replay chunk, so
            h_g and W^a learn only from the newest eviction) or ``chain`` (exact gradient through every state
            update; the evicted K/V stay constants, and the chain keeps them for the W^a gradient).
    """

    rank: int = 32
    global_tokens: int = 32
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    normalize: str = "rms"
    state_scale: str = "mean"
    evicted_keys: str = "pre_rope"
    evicted_context: str = "token"
    init_std: float = 1.0
    init_move: float | None = None
    write_gate: bool = False
    state_grad: str = "detach"

    def __post_init__(self) -> None:
        if self.state_grad not in ("detach", "chain"):
            raise ValueError(f"thought.state_grad={self.state_grad!r}: expected detach or chain")
        if self.normalize not in ("rms", "frobenius", "none"):
            raise ValueError(f"thought.normalize={self.normalize!r}: expected rms, frobenius or none")
        if self.state_scale not in ("mean", "mean_sqrt_rank", "sum"):
            raise ValueError(f"thought.state_scale={self.state_scale!r}: expected mean, mean_sqrt_rank or sum")
        if self.evicted_keys not in ("pre_rope", "post_rope"):
            raise ValueError(f"thought.evicted_keys={self.evicted_keys!r}: expected pre_rope or post_rope")
        if self.evicted_context not in ("token", "pair"):
            raise ValueError(f"thought.evicted_context={self.evicted_context!r}: expected token or pair")
        if self.init_move is not None and not 0.0 < self.init_move < 1.0:
            raise ValueError(f"thought.init_move={self.init_move!r}: expected null or a fraction in (0, 1)")
        if self.rank < 1 or self.global_tokens < 1:
            raise ValueError("thought.rank and thought.global_tokens must be >= 1")


def normalize_state(s: torch.Tensor, how: str, eps: float = 1e-6) -> torch.Tensor:
    """N(S) per row of a ``[B, G, r]`` batch of states."""
    if how == "rms":
        return s * torch.rsqrt(s.pow(2).mean(dim=(-2, -1), keepdim=True) + eps)
    if how == "frobenius":
        return s / (s.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt() + eps)
    return s


class LayerThought(nn.Module):
    """Global tokens and latent projections of one decoder layer; builds and updates its state.

    Args:
        cfg: thought settings.
        d_model: hidden size (the global tokens live in the layer's input space).
        q_dim, kv_dim: H_q*D and H_kv*D, output sizes of the frozen q/k/v projections.
    """

    def __init__(self, cfg: ThoughtConfig, d_model: int, q_dim: int, kv_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.global_tokens = nn.Parameter(torch.randn(cfg.global_tokens, d_model) * cfg.init_std)  # h_g [G, d]
        self.lat_q = nn.Linear(q_dim, cfg.rank, bias=False)  # W^a_Q
        self.width = kv_dim * (2 if cfg.evicted_context == "pair" else 1)  # a row of the state's K/V input
        self.lat_k = nn.Linear(self.width, cfg.rank, bias=False)  # W^a_K
        self.lat_v = nn.Linear(self.width, cfg.rank, bias=False)  # W^a_V
        self.gate = nn.Linear(2 * self.width, 1) if cfg.write_gate else None  # g_t = 2 sigmoid(w . [K_t, V_t] + b)
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def _scale(self, m: int) -> float:
        if self.cfg.state_scale == "sum":
            return 1.0
        return 1.0 / (m * (math.sqrt(self.cfg.rank) if self.cfg.state_scale == "mean_sqrt_rank" else 1.0))

    def _increment(self, q_lat: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """c_m (W^a_Q q_g)(W^a_K K)^T diag(g) (W^a_V V) for K, V ``[B, m, width]`` -> ``[B, G, r]`` (g = 1 without
        ``write_gate``)."""
        k_lat, v_lat = _latent(self.lat_k, k), _latent(self.lat_v, v)  # [B, m, r]
        if self.gate is not None:
            kv = torch.cat([k, v], dim=-1).float()  # [B, m, 2 width]
            logit = nn.functional.linear(kv, self.gate.weight.float(), self.gate.bias.float())  # [B, m, 1]
            v_lat = v_lat * 2 * torch.sigmoid(logit)
        return q_lat @ k_lat.transpose(-1, -2) @ v_lat * self._scale(k.shape[1])

    def _project(self, proj: nn.Module, width: int | None = None) -> torch.Tensor:
        """A frozen projection of the global tokens, computed in the base dtype, returned in float32; zero-padded to
        ``width`` (with ``evicted_context: pair`` a global token has no predecessor)."""
        out = proj(self.global_tokens.to(proj.weight.dtype)).float()
        return nn.functional.pad(out, (0, (width or out.shape[-1]) - out.shape[-1]))

    def initial_state(self, proj: tuple[nn.Module, nn.Module, nn.Module], batch: int) -> torch.Tensor:
        """S_g from the global tokens alone, repeated for ``batch`` rows: ``[B, G, r]`` (float32), contiguous like every
        later state, so a compiled decode step sees one layout (an expanded view would cost a recompilation)."""
        q_proj, k_proj, v_proj = proj
        with _no_autocast(self.global_tokens.device):
            q_lat = _latent(self.lat_q, self._project(q_proj))  # [G, r]
            k_g, v_g = self._project(k_proj, self.width), self._project(v_proj, self.width)  # [G, width]
            s = self._increment(q_lat, k_g[None], v_g[None])
            return normalize_state(s, self.cfg.normalize).repeat(batch, 1, 1)

    def update(self, state: torch.Tensor, q_proj: nn.Module, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """S_e <- N(S_e + S'_e) for evicted keys/values already flattened to ``[B, m, width]``.

        Runs in float32 whatever the base dtype, the parameters' dtype or an enclosing autocast
        (pte/training/precision.py): the state sums every eviction of a sequence, and bf16 rounding would compound along
        the chain.
        """
        with _no_autocast(keys.device):
            q_lat = _latent(self.lat_q, self._project(q_proj))  # [G, r]
            return normalize_state(state.float() + self._increment(q_lat, keys, values), self.cfg.normalize)


def _latent(lat: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """W^a x in float32 (a no-op cast when both are float32, the precision rule's case)."""
    return nn.functional.linear(x.float(), lat.weight.float())


def _no_autocast(device: torch.device) -> torch.autocast:
    """Autocast off, so a ``bf16-mixed`` step still builds the thought state in float32."""
    return torch.autocast(device.type, enabled=False)


class ThoughtLinear(nn.Module):
    """A frozen linear layer plus the state-modulated update (alpha/r) A S_e B x.

    The state is read from ``store`` (``[B, G, r]``), set by the engine for the sequences in flight; with
    ``store.enabled`` False the layer is exactly the base layer. A and B are float32 parameters cast to the
    activation dtype at use (pte/training/precision.py), so their gradients are float32. Per call the update costs one
    GEMM for the factor B x over all rows and tokens, one batched matmul applying each row's G x r state, and one GEMM
    with A accumulated into the base output: at the paper's sizes (d = 4096, r = G = 32) under 1 % of the base layer's
    FLOPs and weight reads, so what it adds to a decode step is the launches of those kernels.
    """

    def __init__(self, base: nn.Linear, cfg: ThoughtConfig, layer_idx: int, store: StateStore) -> None:
        super().__init__()
        self.base, self.layer_idx, self.scaling = base, layer_idx, cfg.alpha / cfg.rank
        self.lr_a = nn.Parameter(torch.zeros(base.out_features, cfg.global_tokens))  # A [d_out, G]
        self.lr_b = nn.Parameter(torch.empty(cfg.rank, base.in_features))  # B [r, d_in]
        nn.init.kaiming_uniform_(self.lr_b, a=math.sqrt(5))
        self.store = store
        self._cast: tuple[tuple[int, torch.dtype], torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [B, T, d_out]
        if not self.store.enabled:
            return y
        lr_b, lr_a_t = self._factors(y.dtype)
        state = self.store.read(self.layer_idx, y.dtype)  # [B, G, r]
        u = nn.functional.linear(x, lr_b)  # [B, T, r]
        w = torch.bmm(u.view(state.shape[0], -1, u.shape[-1]), state.mT)  # [B, T, G]
        flat = torch.addmm(y.flatten(0, -2), w.flatten(0, -2), lr_a_t, alpha=self.scaling)
        return flat.view_as(y)  # y + (alpha/r) w A^T in one kernel

    def _factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """B ``[r, d_in]`` and A^T ``[G, d_out]`` in ``dtype``. Without grad (a rollout) the cast is made once per batch
        of sequences (``store.epoch``) instead of at each of its thousands of decode steps; with grad at every call, so
        the gradient reaches the float32 parameters; compiled code fuses it into its consumers."""
        if dtype == self.lr_b.dtype:
            return self.lr_b, self.lr_a.T
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.lr_b.to(dtype), self.lr_a.T.to(dtype)
        key = (self.store.epoch, dtype)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, self.lr_b.to(dtype), self.lr_a.T.to(dtype))
        return self._cast[1], self._cast[2]


class StateStore:
    """Per-layer thought states of the sequences in flight, shared by reference with every ThoughtLinear.

    ``epoch`` counts the batches of sequences begun (:meth:`begin`); the adapter's weights cannot change within one
    without grad, so casts of them made in one epoch hold for all of it.
    """

    def __init__(self, num_layers: int) -> None:
        self.states: list[torch.Tensor | None] = [None] * num_layers
        self.enabled = True
        self.epoch = 0
        self._casts: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers  # (state, its cast)

    def begin(self, states: list[torch.Tensor]) -> None:
        """Start a new batch of sequences from ``states``."""
        self.states = states
        self.epoch += 1

    def read(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """Layer ``layer``'s states ``[B, G, r]`` in ``dtype``; without grad cast once per state (every adapted linear
        of the layer reads it, at every decode step until the next eviction)."""
        state = self.states[layer]
        if state is None:
            raise RuntimeError("no thought state: run PTE models through pte.generate / pte.engine.rollout.rollout")
        if state.dtype == dtype:
            return state
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return state.to(dtype)
        held = self._casts[layer]
        if held is None or held[0] is not state or held[1].dtype != dtype:  # the cast holds its source: ids stay unique
            self._casts[layer] = held = (state, state.to(dtype))
        return held[1]
