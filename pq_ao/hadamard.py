"""Hadamard matrices of order K * 2**m, random Hadamard rotations and the online Hadamard transform.

The transform (the contract of docs/architecture.md), for `n = K * 2**m`:

    hadamard_transform(x, had_k) == x @ H_n.T / sqrt(n),    H_n = had_k (kron) H_{2**m}  (Sylvester H_{2**m})

computed as `x.view(..., K, 2**m)`, a Walsh-Hadamard transform over the last dim, `had_k @` over the K dim, times
`1/sqrt(n)`. `had_k` is any K x K matrix with `had_k @ had_k.T == K * I`, so the transform is orthonormal and
`hadamard_transform(hadamard_transform(x, had_k), had_k.T) == x`.

Where `had_k` comes from (`hadamard_factor`): the odd part `o` of `n` fixes `K = o * 2**i`; the smallest such K
with a known +-1 Hadamard matrix wins (the smaller K, the cheaper the dense K x K part):

- K = 1: Sylvester only.
- Paley I (`K - 1` a prime power, = 3 mod 4) and Paley II (`K / 2 - 1` a prime power, = 1 mod 4), over GF(p^k):
  12, 20, 28 (GF(27)), 36, 52 (GF(25)), 60, 108, 140, 148 of the QuaRot table, and many more (76 for 4864).
- Williamson quadruples (published data, Sloane's library as shipped by QuaRot): 156 = 4 * 39, 172 = 4 * 43.
- Sylvester doubling of a known order (40 = 2 * 20), for `hadamard_matrix` only.

Fallback, when no K = o * 2**i dividing n has a known Hadamard matrix (e.g. n = 70): K = o and `had_k = sqrt(o) Q`
with Q a fixed orthogonal matrix (QR of a float64 Gaussian drawn from a CPU generator seeded with `o`, columns
sign-fixed by diag(R) > 0). It is orthogonal but not +-1, so the rotation stays exact (every rotation pass is
still invariant) but spreads outliers a little less evenly than a Hadamard; the online K x K product is the same.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

# The K of QuaRot's `get_hadK` table: the sizes every caller may count on.
QUAROT_K = (1, 12, 20, 28, 36, 40, 52, 60, 108, 140, 148, 156, 172)

# First rows of the four symmetric circulant Williamson blocks A, B, C, D (A^2 + B^2 + C^2 + D^2 = 4n I).
_WILLIAMSON = {
    156: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    172: (
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++---++++-+--+--++--------++--+--+-++++---+",
    ),
}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of an offline weight transform (rotation, norm folding, R4 pre-multiplication): float32
    for fp32/bf16/fp16 weights (a transform in fp32 is accurate to a few ulp, far below bf16 rounding and the 1e-4
    equivalence bound), float64 when any operand is float64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _odd_part(n: int) -> tuple[int, int]:
    """n = odd * 2**j -> (odd, j)."""
    j = (n & -n).bit_length() - 1
    return n >> j, j


# ---------------------------------------------------------------------------------------------------------------
# Constructions (float64, entries +-1)


def sylvester(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of 2): H[i, j] = (-1)^popcount(i & j)."""
    if not is_pow2(n):
        raise ValueError(f"Sylvester Hadamard needs a power of 2, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _prime_power(q: int) -> tuple[int, int] | None:
    """q = p**k with p prime -> (p, k), else None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = 0
    while q % p == 0:
        q, k = q // p, k + 1
    return (p, k) if q == 1 else None


def _poly_rem(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists low -> high, f monic."""
    a = list(a)
    while len(a) >= len(f):
        c, shift = a[-1], len(a) - len(f)
        if c:
            for i, fi in enumerate(f):
                a[shift + i] = (a[shift + i] - c * fi) % p
        a.pop()
    return a


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (no monic divisor of degree 1..k//2)."""
    for tail in itertools.product(range(p), repeat=k):
        f = [*tail, 1]
        divisors = ([*g, 1] for d in range(1, k // 2 + 1) for g in itertools.product(range(p), repeat=d))
        if all(any(_poly_rem(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q), chi the quadratic character (0 at 0, +1 on nonzero squares, -1 else).

    Elements of GF(p^k) are the polynomials of degree < k over GF(p) mod an irreducible f, numbered by their
    base-p digits.
    """
    p, k = _prime_power(q)
    f = _irreducible(p, k)
    digits = [[(e // p**i) % p for i in range(k)] for e in range(q)]

    def number(d):
        return sum(c * p**i for i, c in enumerate(d))

    def square(d):
        prod = [0] * (2 * k - 1)
        for i, a in enumerate(d):
            for j, b in enumerate(d):
                prod[i + j] = (prod[i + j] + a * b) % p
        return number((_poly_rem(prod, f, p) + [0] * k)[:k])

    squares = {square(digits[e]) for e in range(1, q)}
    chi = [0] + [1 if e in squares else -1 for e in range(1, q)]
    sub = [[number([(x - y) % p for x, y in zip(digits[a], digits[b])]) for b in range(q)] for a in range(q)]
    return torch.tensor([[chi[sub[a][b]] for b in range(q)] for a in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]] (Q antisymmetric)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q = 1 mod 4: C = [[0, 1^T], [1, Q]] (symmetric conference matrix);
    H = C (kron) [[1, 1], [1, -1]] + I (kron) [[1, -1], [-1, -1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _williamson(k: int) -> torch.Tensor:
    """Williamson array [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]] of circulant blocks."""
    n = k // 4
    idx = (torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n
    a, b, c, d = (
        torch.tensor([1.0 if ch == "+" else -1.0 for ch in row], dtype=torch.float64)[idx]
        for row in _WILLIAMSON[k]
    )
    return torch.cat(
        [torch.cat(r, 1) for r in ([a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a])], 0
    )


@functools.lru_cache(maxsize=None)
def _construct(k: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order k from the constructions above, or None."""
    if is_pow2(k):
        return sylvester(k)
    if k % 4:
        return None
    if k in _WILLIAMSON:
        return _williamson(k)
    q1 = _prime_power(k - 1)
    if q1 and (k - 1) % 4 == 3:
        return _paley1(k - 1)
    q2 = _prime_power(k // 2 - 1)
    if q2 and (k // 2 - 1) % 4 == 1:
        return _paley2(k // 2 - 1)
    half = _construct(k // 2)
    return None if half is None else torch.kron(sylvester(2), half)


def hadamard_matrix(n: int) -> torch.Tensor:
    """A +-1 Hadamard matrix of order n (float64, H @ H.T == n I); ValueError where no construction is known."""
    h = _construct(n)
    if h is None:
        raise ValueError(f"no known Hadamard matrix of order {n} (Paley I/II, Williamson 156/172, Sylvester)")
    return h.clone()


@functools.lru_cache(maxsize=None)
def _fallback(odd: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(odd)
    q, r = torch.linalg.qr(torch.randn(odd, odd, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)) * math.sqrt(odd)).contiguous()


def hadamard_factor(n: int) -> tuple[int, torch.Tensor]:
    """n = K * 2**m -> (K, had_k): the smallest K = odd(n) * 2**i with a known Hadamard matrix, else the fallback
    (K = odd(n), `had_k = sqrt(K) Q`, Q orthogonal; see the module docstring). had_k is float64,
    had_k @ had_k.T == K I; K = 1 for powers of 2."""
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    odd, j = _odd_part(n)
    for i in range(j + 1):
        h = _construct(odd << i)
        if h is not None:
            return odd << i, h.clone()
    return odd, _fallback(odd).clone()


def has_true_hadamard(n: int) -> bool:
    """Whether `hadamard_factor(n)` gives a +-1 Hadamard matrix (not the orthogonal fallback)."""
    odd, j = _odd_part(n)
    return any(_construct(odd << i) is not None for i in range(j + 1))


# ---------------------------------------------------------------------------------------------------------------
# Transforms


_FWHT_DENSE = 64


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dim (a power of 2), Sylvester order: x @ H_n.

    H_n = H_{n/b} (kron) H_b: a dense H_b (b <= 64) on the low bits, then O(n log n) butterflies, one H_2 per
    remaining bit of the index (about 2x faster on CPU than butterflies all the way down)."""
    n = x.shape[-1]
    if not is_pow2(n):
        raise ValueError(f"fwht needs a power-of-2 last dim, got {n}")
    lead = x.shape[:-1]
    h = min(n, _FWHT_DENSE)
    y = x.reshape(-1, n // h, h) @ sylvester(h).to(device=x.device, dtype=x.dtype)
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n)


def hadamard_transform(x: torch.Tensor, had_k: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal online Hadamard over the last dim: `x @ (had_k (kron) H_{2^m}).T / sqrt(n)`.

    `had_k`: the K x K factor (`hadamard_factor(n)[1]`); None or 1 x 1 for powers of 2. fp16/bf16 inputs are
    computed in fp32 and cast back; fp32/fp64 in their own dtype.
    """
    n = x.shape[-1]
    k = 1 if had_k is None else had_k.shape[-1]
    if had_k is not None and tuple(had_k.shape) != (k, k):
        raise ValueError(f"had_k must be square, got {tuple(had_k.shape)}")
    if n % k or not is_pow2(n // k):
        raise ValueError(f"last dim {n} is not K * 2**m for K = {k}")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if k == n:  # no power-of-2 part: one GEMM (a batched K x K @ K x 1 product is ~10x slower)
        y = torch.matmul(x.to(dtype), had_k.to(device=x.device, dtype=dtype).T)
    else:
        y = fwht(x.to(dtype).reshape(*x.shape[:-1], k, n // k))
        if k > 1:
            y = torch.matmul(had_k.to(device=x.device, dtype=dtype), y)
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape).to(x.dtype)


@dataclass(frozen=True)
class RandomHadamard:
    """The rotation Q = diag(signs) @ H_n / sqrt(n) (orthogonal), applied in O(n log n) without forming Q.

    `signs` are +-1 from `torch.Generator().manual_seed(seed)` (CPU: the same on every machine), float64.
    """

    signs: torch.Tensor
    had_k: torch.Tensor
    seed: int

    @classmethod
    def from_seed(cls, n: int, seed: int = 0) -> "RandomHadamard":
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
        return cls(signs, hadamard_factor(n)[1], seed)

    @property
    def n(self) -> int:
        return self.signs.numel()

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Q over the last dim."""
        return hadamard_transform(x * self.signs.to(x), self.had_k.T)

    def right_t(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Q.T over the last dim."""
        return hadamard_transform(x, self.had_k) * self.signs.to(x)

    def matrix(self) -> torch.Tensor:
        return self.right(torch.eye(self.n, dtype=torch.float64))


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """QuaRot's random Hadamard rotation: diag(random +-1) @ orthonormal H_n, float64 n x n."""
    return RandomHadamard.from_seed(n, seed).matrix()
