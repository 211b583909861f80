"""Privacy accounting for DP-SGD through Opacus' maintained accountants (no hand-written accountant).

The mechanism is the Poisson-subsampled Gaussian mechanism of DP-SGD (Abadi et al. 2016): each step samples
every example with probability q (``sample_rate``), clips each example's gradient to norm C and adds
N(0, sigma^2 C^2) to the sum; ``noise_multiplier`` is sigma. After T steps the run is (epsilon, delta)-DP with
epsilon from one of three accountants of ``opacus.accountants`` (opacus 1.6.0):

- ``"rdp"``: Renyi DP (Mironov 2017; Mironov, Talwar, Zhang 2019), converted to (eps, delta) at the best order
  of Opacus' default grid {1 + x/10 : x = 1..99} U {12..63}. An upper bound.
- ``"prv"``: privacy-loss random variables composed by FFT (Gopi, Lee, Wutschitz 2021). Opacus' ``get_epsilon``
  returns the *upper* end of an interval [eps_low, eps_up] of width about 2 * eps_error that contains the true
  epsilon of the mechanism; `epsilon_with_error` returns the whole interval and the point estimate.
- ``"gdp"``: Gaussian DP by the central limit theorem (Dong, Roth, Su 2019); Opacus warns that it can
  *under*-estimate epsilon. For comparison only.

Known answers (opacus/tests/accountants_test.py): sigma = 1.5, q = 0.04, delta = 1e-5, T = 2250: RDP
7.32911117143; PRV 6.779 (upper end; 6.777 at T = 2249); GDP 6.5998 at T = 2249 (in (6.59, 6.6)).

Opacus is imported inside the functions, so ``gradsight`` imports without it.

Example:
    >>> epsilon(1.5, 0.04, 2250, 1e-5)                      # 7.329...
    >>> noise_for_epsilon(8.0, 1e-5, 0.04, 2000)            # 1.3562 (RDP)
    >>> acc = Accountant("prv", delta=1e-5, n=60000)
    >>> for _ in range(100): acc.step(1.1, 256 / 60000)
    >>> acc.epsilon()
"""

from __future__ import annotations

import math

__all__ = ["KINDS", "epsilon", "epsilon_with_error", "noise_for_epsilon", "Accountant"]

KINDS = ("rdp", "prv", "gdp")
_INSTALL = "pip install --no-deps opacus==1.6.0 opt-einsum"


def _opacus_accountants():
    """The ``opacus.accountants`` module, or an ImportError saying how to install it."""
    try:
        import opacus.accountants as acc
    except ImportError as e:  # pragma: no cover - exercised only without opacus
        raise ImportError(f"privacy accounting uses Opacus' accountants: {_INSTALL}") from e
    return acc


def _make(kind: str):
    """A fresh Opacus accountant of ``kind`` ("rdp", "prv" or "gdp")."""
    _check_kind(kind)
    acc = _opacus_accountants()
    return {"rdp": acc.RDPAccountant, "prv": acc.PRVAccountant, "gdp": acc.GaussianAccountant}[kind]()


# ----------------------------------------------------------------------------------------------- validation

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"accountant must be one of {KINDS} (got {kind!r})")


def _check_sigma(noise_multiplier: float, allow_zero: bool = False) -> None:
    s = float(noise_multiplier)
    if not math.isfinite(s) or s < 0 or (s == 0 and not allow_zero):
        raise ValueError(f"noise multiplier must be > 0 (got {s}): without Gaussian noise a step is not "
                         f"differentially private (epsilon is infinite)")


def _check_rate(sample_rate: float) -> None:
    q = float(sample_rate)
    if not (0.0 < q <= 1.0):
        raise ValueError(f"sample rate must be in (0, 1] (got {q}): it is the Poisson sampling probability "
                         f"of each example per step (expected batch size / dataset size)")


def _check_delta(delta: float, n: int | None) -> None:
    d = float(delta)
    if not (0.0 < d < 1.0):
        raise ValueError(f"delta must be in (0, 1) (got {d})")
    if n is not None:
        if int(n) < 1:
            raise ValueError(f"n (the dataset size) must be >= 1 (got {n})")
        if d >= 1.0 / int(n):
            raise ValueError(f"delta must be < 1/n (got delta={d} with n={int(n)}, 1/n={1.0 / int(n):.3g}): a "
                             f"delta of 1/n allows releasing one example outright; use delta << 1/n")


def _check_steps(steps: int) -> None:
    if int(steps) != steps or int(steps) < 1:
        raise ValueError(f"steps must be an integer >= 1 (got {steps})")


def _check_all(noise_multiplier, sample_rate, steps, delta, n) -> None:
    _check_sigma(noise_multiplier)
    _check_rate(sample_rate)
    _check_steps(steps)
    _check_delta(delta, n)


# ----------------------------------------------------------------------------------------------- functions

def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp",
            n: int | None = None) -> float:
    """epsilon at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps (a guarantee for rdp and prv).

    Args:
        noise_multiplier: sigma (noise std / clipping norm), > 0.
        sample_rate: q in (0, 1], the Poisson sampling probability per example per step.
        steps: T >= 1 (with a constant sigma and q).
        delta: in (0, 1); with ``n`` also < 1/n.
        accountant: "rdp" (Renyi DP bound), "prv" (upper end of the PRV interval, as Opacus' ``get_epsilon``)
            or "gdp" (CLT approximation; may under-estimate).
        n: the dataset size, only to check delta < 1/n.
    Returns:
        epsilon as a float (Opacus' ``IAccountant.get_epsilon`` with history [(sigma, q, T)]).
    Raises:
        ValueError naming the bad value (sigma <= 0, q outside (0, 1], T < 1, delta outside (0, 1) or >= 1/n).
    """
    _check_all(noise_multiplier, sample_rate, steps, delta, n)
    acc = _make(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=float(delta)))


def epsilon_with_error(noise_multiplier: float, sample_rate: float, steps: int, delta: float, *,
                       eps_error: float = 0.01, delta_error: float | None = None, n: int | None = None
                       ) -> tuple[float, float, float]:
    """PRV epsilon as (eps_low, eps_estimate, eps_up): the true epsilon(delta) lies in [eps_low, eps_up].

    Opacus' ``PRVAccountant._get_dprv(eps_error, delta_error)`` discretises the privacy-loss random variable on a
    mesh chosen for these errors and composes it by FFT; ``DiscretePRV.compute_epsilon(delta, delta_error,
    eps_error)`` then reads epsilon off the composed pmf (Gopi et al. 2021, Thm 5.5 / microsoft prv_accountant):
        eps_up = eps_hat(delta - delta_error) + eps_error,  eps_low = eps_hat(delta + delta_error) - eps_error,
        eps_estimate = eps_hat(delta),
    where eps_hat(d) solves the discretised delta(eps) = d. ``epsilon(..., accountant="prv")`` is ``eps_up``.

    Args:
        noise_multiplier, sample_rate, steps, delta, n: as in `epsilon`.
        eps_error: the epsilon error budget (Opacus' default 0.01).
        delta_error: the delta error budget (default delta / 1000, as Opacus).
    Returns:
        (eps_low, eps_estimate, eps_up) floats.
    """
    _check_all(noise_multiplier, sample_rate, steps, delta, n)
    if not eps_error > 0:
        raise ValueError(f"eps_error must be > 0 (got {eps_error})")
    delta_error = float(delta) / 1000 if delta_error is None else float(delta_error)
    if not (0 < delta_error < delta):
        raise ValueError(f"delta_error must be in (0, delta) (got {delta_error} with delta={delta})")
    acc = _make("prv")
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    dprv = acc._get_dprv(eps_error=float(eps_error), delta_error=delta_error)  # composed discrete PRV
    low, est, up = dprv.compute_epsilon(float(delta), delta_error, float(eps_error))
    return float(low), float(est), float(up)


def noise_for_epsilon(target_eps: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
                      *, epsilon_tolerance: float = 0.01, n: int | None = None) -> float:
    """The smallest sigma (to the search's precision) whose epsilon after ``steps`` is <= ``target_eps``.

    Opacus' ``get_noise_multiplier``: doubles sigma from 10 until eps(sigma) <= target, then bisects [lo, hi]
    while target - eps(hi) > ``epsilon_tolerance`` and returns hi, so eps(result) is in
    (target - tolerance, target]. Known answers (eps 8, delta 1e-5, q 0.04): 2000 steps: 1.3562 (rdp),
    1.2915 (prv); 90 epochs (2250 steps): 1.416 (rdp), 1.34765625 (prv).

    Args:
        target_eps: epsilon > 0 to reach.
        delta, sample_rate, steps, n: as in `epsilon`.
        accountant: "rdp", "prv" or "gdp".
        epsilon_tolerance: the bisection's stopping gap in epsilon.
    Returns:
        sigma as a float.
    """
    if not (float(target_eps) > 0 and math.isfinite(float(target_eps))):
        raise ValueError(f"target epsilon must be a finite number > 0 (got {target_eps})")
    _check_rate(sample_rate)
    _check_steps(steps)
    _check_delta(delta, n)
    _check_kind(accountant)
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=float(target_eps), target_delta=float(delta),
                                      sample_rate=float(sample_rate), steps=int(steps), accountant=accountant,
                                      epsilon_tolerance=float(epsilon_tolerance)))


class Accountant:
    """Running accountant for a training loop: one `step` per optimizer step, `epsilon` at any time.

    Wraps a fresh Opacus accountant (its ``history`` of (sigma, q, steps) runs; sigma and q may change between
    steps for rdp and prv, not for gdp). A step with sigma = 0 (no noise) is recorded, and from then on
    `epsilon` is infinite.

    Args:
        kind: "rdp", "prv" or "gdp".
        delta: target delta in (0, 1), < 1/n when n is given.
        n: the dataset size (checks delta < 1/n).

    Example:
        >>> acc = Accountant("rdp", delta=1e-5, n=1257)
        >>> acc.step(1.0, 0.05); acc.epsilon()
    """

    def __init__(self, kind: str = "rdp", delta: float = 1e-5, n: int | None = None):
        _check_kind(kind)
        _check_delta(delta, n)
        self.kind, self.delta, self.n = kind, float(delta), n
        self._acc = _make(kind)
        self.steps = 0
        self.infinite = False

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one Poisson-subsampled Gaussian step (sigma >= 0; sigma = 0 makes epsilon infinite)."""
        _check_sigma(noise_multiplier, allow_zero=True)
        _check_rate(sample_rate)
        self.steps += 1
        if float(noise_multiplier) == 0.0:
            self.infinite = True
            return
        self._acc.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Opacus' run-length history [(sigma, q, steps), ...] of the noisy steps."""
        return list(self._acc.history)

    def epsilon(self, delta: float | None = None) -> float:
        """epsilon at ``delta`` (default: the constructor's) of the steps so far; 0 before any step."""
        d = self.delta if delta is None else float(delta)
        _check_delta(d, self.n)
        if self.infinite:
            return math.inf
        if not self._acc.history:
            return 0.0
        return float(self._acc.get_epsilon(delta=d))

    def __repr__(self) -> str:
        return f"Accountant(kind={self.kind!r}, delta={self.delta}, n={self.n}, steps={self.steps})"
