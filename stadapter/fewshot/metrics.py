"""Temporal alignment metrics for few-shot action recognition.

Every metric maps query videos `(Q, T, D)` and class prototypes `(K, T, D)` (per-frame
features) to a `(Q, K)` matrix of distances (lower = closer), batched over every
query-prototype pair and differentiable, so a model can train through it:

- `otam`: ordered temporal alignment (OTAM) over the frame costs `1 - cosine`, with the
  soft-min relaxation of the dynamic program; `bidirectional` adds the prototype-to-query
  direction.
- `bi_mhm`: bidirectional mean Hausdorff over the same frame costs.
- `mean_cosine`: the temporal-mean baseline, `1 - cosine` of the time-averaged features.
- `TRX`: the temporal-relation cross-transformer, a module with parameters.

`METRICS` names them all as modules and `build_metric(name, dim)` makes one, so a model takes
any of them by name.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_pair(query: Tensor, protos: Tensor) -> None:
    for name, t in (("query", query), ("protos", protos)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (videos, frames, dim) tensor, got {shape}")
    if query.shape[-1] != protos.shape[-1]:
        raise ValueError(f"query and protos must share the feature dim, got query {tuple(query.shape)} "
                         f"and protos {tuple(protos.shape)}")


def frame_costs(query: Tensor, protos: Tensor) -> Tensor:
    """`1 - cosine` between every query frame and every prototype frame: (Q, K, Tq, Tp)."""
    _check_pair(query, protos)
    q = F.normalize(query, dim=-1)
    p = F.normalize(protos, dim=-1)
    return 1 - torch.einsum("qld,kmd->qklm", q, p)


def _softmin(values: Tensor, lam: float) -> Tensor:
    """-lam * log(sum exp(-v / lam)) over the first dim; +inf entries take no part."""
    return -lam * torch.logsumexp(-values / lam, dim=0)


def _otam_one_way(costs: Tensor, lam: float) -> Tensor:
    """Soft OTAM distance for costs (..., Tq, Tp): the last cell of the cumulative cost.

    The costs get a zero column at each end (Tq x (Tp + 2)), so an alignment may start and
    end anywhere in the prototype. Cell (l, m) depends on (l-1, m-1), (l, m-1) and, in the
    first, second and last columns, (l-1, m), so every anti-diagonal l + m = d depends only on
    the two before it: the loop runs over the Tq + Tp + 2 diagonals, each one vectorised over
    all pairs and all of its cells. A diagonal is stored indexed by its row l; cells outside
    the grid hold +inf and are never a chosen predecessor.
    """
    rows, cols = costs.shape[-2], costs.shape[-1] + 2
    padded = F.pad(costs, (1, 1))
    inf = torch.tensor(math.inf, dtype=costs.dtype, device=costs.device)
    batch = costs.shape[:-2]
    row = torch.arange(rows, device=costs.device)

    def shift_down(diagonal: Tensor) -> Tensor:
        # Entry l of the result is entry l - 1 of `diagonal`: the cell one row up.
        return F.pad(diagonal[..., :-1], (1, 0), value=math.inf)

    # Diagonal -1 holds the virtual G(0, -1) = 0 that starts the first row's running sum.
    before_last = torch.full((*batch, rows), math.inf, dtype=costs.dtype, device=costs.device)
    last = before_last.clone()
    last[..., 0] = 0
    for d in range(rows + cols - 1):
        col = d - row
        lo, hi = max(0, d - cols + 1), min(rows - 1, d)
        cells = slice(lo, hi + 1)
        m = col[cells]
        first_row = row[cells] == 0
        # Which predecessors each cell of the diagonal may take: the recurrence in otam()'s docstring.
        use_left = first_row | (m >= 1)
        use_up = ~first_row & ((m == 0) | (m == 1) | (m == cols - 1))
        use_diag = ~first_row & (m >= 1)
        left = last[..., cells]
        up = shift_down(last)[..., cells]
        diag = shift_down(before_last)[..., cells]
        candidates = torch.stack([torch.where(use_left, left, inf), torch.where(use_up, up, inf),
                                  torch.where(use_diag, diag, inf)])
        local = padded[..., row[cells], m]
        values = local + _softmin(candidates, lam)
        current = F.pad(values, (lo, rows - 1 - hi), value=math.inf)
        before_last, last = last, current
    return last[..., rows - 1]


def otam(query: Tensor, protos: Tensor, lam: float = 0.5, bidirectional: bool = True) -> Tensor:
    """Soft ordered temporal alignment distance between every query and prototype: (Q, K).

    Frame costs D = 1 - cosine, padded with a zero column at each end (T x (T + 2)); the
    cumulative cost uses softmin_lam(a, b, ...) = -lam * log(sum exp(-v / lam)):
    G(0, m) = D(0, 0) + ... + D(0, m); G(l, 0) = G(l-1, 0) + D(l, 0);
    G(l, 1) = D(l, 1) + softmin(G(l-1, 0), G(l, 0), G(l-1, 1));
    G(l, m) = D(l, m) + softmin(G(l-1, m-1), G(l, m-1)) for 2 <= m <= T;
    G(l, T+1) = D(l, T+1) + softmin(G(l-1, T), G(l, T), G(l-1, T+1));
    the distance is G(T-1, T+1). `bidirectional` adds the same with the roles swapped
    (prototype frames as rows). Query and prototypes may have different frame counts.
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0 (the soft-min temperature), got {lam!r}")
    costs = frame_costs(query, protos)
    distance = _otam_one_way(costs, lam)
    if bidirectional:
        distance = distance + _otam_one_way(costs.transpose(-1, -2), lam)
    return distance


def bi_mhm(query: Tensor, protos: Tensor) -> Tensor:
    """Bidirectional mean Hausdorff distance: (Q, K).

    Each query frame's cost to its closest prototype frame, averaged over query frames, plus
    each prototype frame's cost to its closest query frame, averaged over prototype frames.
    """
    costs = frame_costs(query, protos)
    return costs.min(dim=-1).values.mean(dim=-1) + costs.min(dim=-2).values.mean(dim=-1)


def mean_cosine(query: Tensor, protos: Tensor) -> Tensor:
    """`1 - cosine` of the time-averaged query and prototype features: (Q, K)."""
    _check_pair(query, protos)
    q = F.normalize(query.mean(dim=1), dim=-1)
    p = F.normalize(protos.mean(dim=1), dim=-1)
    return 1 - q @ p.T


class OTAM(nn.Module):
    """`otam` as a module (no parameters)."""

    def __init__(self, lam: float = 0.5, bidirectional: bool = True):
        super().__init__()
        if not lam > 0:
            raise ValueError(f"lam must be > 0 (the soft-min temperature), got {lam!r}")
        self.lam, self.bidirectional = lam, bidirectional

    def forward(self, query: Tensor, protos: Tensor) -> Tensor:
        return otam(query, protos, self.lam, self.bidirectional)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, bidirectional={self.bidirectional}"


class BiMHM(nn.Module):
    """`bi_mhm` as a module (no parameters)."""

    def forward(self, query: Tensor, protos: Tensor) -> Tensor:
        return bi_mhm(query, protos)


class MeanCosine(nn.Module):
    """`mean_cosine` as a module (no parameters)."""

    def forward(self, query: Tensor, protos: Tensor) -> Tensor:
        return mean_cosine(query, protos)


def _sinusoidal_positions(frames: int, dim: int) -> Tensor:
    position = torch.arange(frames, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(frames, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class TRX(nn.Module):
    """Temporal-relation cross-transformer: a query-specific prototype per class, per tuple size.

    For each cardinality w, every ordered w-tuple of frames (indices increasing) is the
    concatenation of its frames' features (plus a fixed sinusoidal position code); shared
    linear maps with layer norm turn tuples into keys and values. Each query tuple attends
    over all tuples of a class's prototype(s), and the attention-weighted values form that
    class's prototype for this query; the distance is the squared distance between the
    query's tuple values and that prototype, over the tuple count, summed over cardinalities.

    Args:
        dim: feature dim D of the frames.
        cardinalities: tuple sizes w (each >= 1).
        hidden: key/value dim (1152 in the TRX paper).
        max_frames: length of the position-code table.
        dropout: dropout on the position-coded frames.

    `protos` is `(K, T, D)`, or `(K, S, T, D)` with S shots whose tuples a class pools.
    """

    def __init__(self, dim: int, cardinalities=(2, 3), hidden: int = 1152, max_frames: int = 64,
                 dropout: float = 0.1):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        cardinalities = tuple(cardinalities)
        if not cardinalities or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in cardinalities):
            raise ValueError(f"cardinalities must be positive ints, got {cardinalities!r}")
        self.dim, self.cardinalities, self.hidden = dim, cardinalities, hidden
        self.register_buffer("positions", _sinusoidal_positions(max_frames, dim), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.keys = nn.ModuleList(nn.Linear(w * dim, hidden) for w in cardinalities)
        self.values = nn.ModuleList(nn.Linear(w * dim, hidden) for w in cardinalities)
        self.key_norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in cardinalities)
        self.value_norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in cardinalities)

    def _tuples(self, frames: Tensor, w: int) -> Tensor:
        """(..., T, D) -> (..., n_tuples, w * D): every increasing w-tuple of frames, concatenated."""
        index = torch.tensor(list(itertools.combinations(range(frames.shape[-2]), w)), device=frames.device)
        return frames[..., index, :].flatten(-2)

    def forward(self, query: Tensor, protos: Tensor) -> Tensor:
        shots = protos if protos.dim() == 4 else protos.unsqueeze(1)
        if query.dim() != 3 or shots.dim() != 4 or query.shape[-1] != self.dim or shots.shape[-1] != self.dim:
            raise ValueError(f"TRX expects query (Q, T, {self.dim}) and protos (K, T, {self.dim}) or "
                             f"(K, S, T, {self.dim}), got {tuple(query.shape)} and {tuple(protos.shape)}")
        frames = query.shape[1]
        if frames > self.positions.shape[0] or shots.shape[2] > self.positions.shape[0]:
            raise ValueError(f"TRX was built for at most {self.positions.shape[0]} frames (max_frames), "
                             f"got {frames} and {shots.shape[2]}")
        if frames < max(self.cardinalities) or shots.shape[2] < max(self.cardinalities):
            raise ValueError(f"TRX needs at least {max(self.cardinalities)} frames for its cardinalities "
                             f"{self.cardinalities}, got {frames} and {shots.shape[2]}")
        query = self.dropout(query + self.positions[:frames])
        shots = self.dropout(shots + self.positions[: shots.shape[2]])
        distances = []
        for w, to_key, to_value, key_norm, value_norm in zip(
                self.cardinalities, self.keys, self.values, self.key_norms, self.value_norms):
            query_tuples, support_tuples = self._tuples(query, w), self._tuples(shots, w).flatten(1, 2)
            query_keys, query_values = key_norm(to_key(query_tuples)), value_norm(to_value(query_tuples))
            class_keys, class_values = key_norm(to_key(support_tuples)), value_norm(to_value(support_tuples))
            # (Q, K, query tuples, class tuples): each query tuple's attention over a class's tuples.
            scores = torch.einsum("qih,kjh->qkij", query_keys, class_keys) / math.sqrt(self.hidden)
            prototype = torch.einsum("qkij,kjh->qkih", scores.softmax(dim=-1), class_values)
            squared = (query_values[:, None] - prototype).pow(2).sum(dim=(-2, -1))
            distances.append(squared / query_tuples.shape[1])
        return torch.stack(distances).sum(dim=0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, cardinalities={self.cardinalities}, hidden={self.hidden}"


# Name -> factory(dim, **options); only TRX has parameters and so needs the feature dim.
METRICS = {
    "otam": lambda dim, **options: OTAM(**options),
    "bi_mhm": lambda dim, **options: BiMHM(**options),
    "mean_cosine": lambda dim, **options: MeanCosine(**options),
    "trx": TRX,
}


def build_metric(name: str, dim: int, **options) -> nn.Module:
    """The metric called `name` (one of `METRICS`) as a module for `dim`-channel frame features."""
    if name not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {name!r}")
    return METRICS[name](dim, **options)
