"""The hospital's privacy budget: noise calibration and a ledger on disk.

DP-SGD (Abadi et al. 2016) clips each sample's gradient to L2 norm C and adds
N(0, sigma^2 C^2) noise to the sum of a Poisson-sampled batch (rate q). Each
step is a subsampled Gaussian mechanism; the accountant (Opacus' PRV
accountant, Gopi et al. 2021) composes all steps ever taken on a dataset into
one (epsilon, delta). The ledger keeps that step history per dataset across
rounds, client restarts and later studies, so the epsilon it reports is the
true cumulative spend, not one round's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write
from common.cache import cache_root
from common.errors import FedradError

ACCOUNTANT = "prv"
LEDGER_FILE = "privacy-ledger.json"
LOCK_FILE = "privacy-ledger.lock"
LOCK_WAIT_S = 900.0  # the longest a process waits for another's hold on the ledger (a study's default round timeout)

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)

# PRV takes log(1 - q) = -inf at q = 1 (a site smaller than one batch: no amplification); it handles the inf.
# Filtered here, where every accountant call is (training, 'fedrad privacy', the start-up budget line).
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.accountants\.analysis\.prv")


def epsilon_of(history: History, delta: float) -> float:
    """Cumulative epsilon of a step history at ``delta`` (0 for no steps)."""
    if not history:
        return 0.0
    accountant = _accountant()
    accountant.history = compose(history)
    # numpy's BLAS on one thread: PRV's arrays are small, and OpenBLAS' second thread busy-waits after
    # each call, taking as much CPU as the accounting itself from the training beside it (measured).
    with _BLAS.limit(limits=1, user_api="blas"):
        return float(accountant.get_epsilon(delta=delta))


def _accountant() -> Any:
    """A fresh Opacus PRV accountant (``ACCOUNTANT``) on an FFT-friendly domain, with Opacus' RDP curve
    memoised (both below).

    Opacus is imported here, on first use, not with this module: its import takes ~3 s (it pulls in
    torch.distributed, sympy, scipy.stats), and the simulation's driver imports the client only to hand
    the ClientApp to Ray, while Ray starts: it never accounts.
    """
    global _exact_compute_rdp, _BLAS
    from opacus.accountants.analysis import rdp
    from threadpoolctl import ThreadpoolController

    if _BLAS is None:  # after Opacus' import, which loads scipy's BLAS beside numpy's
        _BLAS = ThreadpoolController()
    if rdp.compute_rdp is not _memoised_compute_rdp:
        _exact_compute_rdp = rdp.compute_rdp
        rdp.compute_rdp = _memoised_compute_rdp
    return _smooth_domain_prv()()


def _fft_friendly_size(n: int) -> int:
    """The least even size >= n whose only prime factors are 2, 3 and 5 (fast for pocketfft)."""
    from scipy.fft import next_fast_len

    size = next_fast_len(n, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    return size


@lru_cache(maxsize=1)
def _smooth_domain_prv() -> type:
    """Opacus' PRV accountant on a discretisation domain widened to an FFT-friendly size.

    The PRV accountant (Gopi, Lee and Wutschitz 2021) discretises each step's privacy loss on a mesh of
    width h over [-L, L] and composes n steps as irfft(rfft(pmf)^n). Its error bound holds for any
    domain at least as wide as the safe size L it computes (a wider one truncates less), for the same
    h. Opacus' domain has 2L/h points, often a size with a large prime factor (409,140 = 2^2 3^2 5 2273
    for a default-study site), where pocketfft falls back to Bluestein's algorithm at several times the
    cost of a 2,3,5-smooth size. Widening the domain by a few mesh points to such a size keeps h and
    the alignment and gives the same epsilon (relative difference < 1e-8 over the studies measured) in
    a third to a fifteenth of the time: 64 ms instead of 199 ms for a site's 20th round.
    """
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv.domain import Domain

    class SmoothDomainPRVAccountant(PRVAccountant):
        def _get_domain(self, **kwargs: Any) -> Domain:
            domain = super()._get_domain(**kwargs)
            size = _fft_friendly_size(domain.size)
            below = (size - domain.size) // 2
            above = size - domain.size - below
            return Domain(domain.t_min - below * domain.dt, domain.t_max + above * domain.dt, size)

    return SmoothDomainPRVAccountant


_exact_compute_rdp: Any = None  # Opacus' compute_rdp, once _accountant has imported it
_BLAS: Any = None  # threadpoolctl's view of the BLAS libraries loaded, once _accountant has looked


@lru_cache(maxsize=1024)
def _rdp_of_one_step(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    return np.asarray(_exact_compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)))


def _memoised_compute_rdp(*, q: float, noise_multiplier: float, steps: int, orders: Any) -> Any:
    """Opacus' ``compute_rdp`` with the per-step curve memoised (the same numbers, bit for bit).

    RDP composes linearly, rdp(steps) = steps x rdp(1 step), and Opacus computes exactly
    ``rdp(1) * steps``. The PRV accountant sizes its domain with two RDP curves per call, ~0.1 s
    of series sums at the 99 fractional orders; a site re-accounts the same (q, sigma) every
    round (its ledger keeps one entry per pair), so the curve is computed once per process.
    """
    if not isinstance(orders, (list, tuple)):
        return _exact_compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    return _rdp_of_one_step(float(q), float(noise_multiplier), tuple(orders)) * steps


def compose(history: History) -> History:
    """The same mechanism with one entry per (sigma, q): composition is commutative, so n steps here
    and m there at equal (sigma, q) are n + m steps. The ledger keeps one entry per round (it only
    grows); the accountant's cost grows with the entries (measured 0.24 s for one, 1.8 s for ten)."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


CALIBRATION_FILE = "noise-calibration.json"
# Bumped when epsilon_of's numbers can move, however little: a sigma calibrated by other numbers could
# plan a study whose last round the budget check then refuses by a hair.
CALIBRATION_VERSION = 2  # 2: the FFT-friendly PRV domain


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, total_steps: int) -> float:
    """Noise multiplier sigma so that ``total_steps`` steps at rate q spend ``epsilon``.

    Computed once for the whole planned study (rounds x local epochs x steps per
    epoch); calibrating per round would spend the target every round.
    The search takes ~5 s of PRV evaluations, and every process of a simulation
    (one per Ray actor) would repeat it for every site it serves, so results are
    memoised in memory and in the fedrad cache folder. The value is a pure
    function of public numbers; a wrong stored value cannot overspend, because
    the client checks the planned history's epsilon against the budget before
    it trains.
    """
    key = f"{ACCOUNTANT}|{CALIBRATION_VERSION}|{epsilon!r}|{delta!r}|{sample_rate!r}|{total_steps}"
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    path = cache_root() / CALIBRATION_FILE
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    sigma = stored.get(key)
    if not isinstance(sigma, float):
        sigma = search_noise(epsilon, delta, sample_rate, total_steps)
        try:  # a read-only cache only costs the next process the search again
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda fh: fh.write(json.dumps({**stored, key: sigma}, indent=1).encode()))
        except OSError:
            pass
    _CALIBRATED[key] = sigma
    return sigma


_CALIBRATED: dict[str, float] = {}

MAX_SIGMA = 1e6  # Opacus' limit: a budget that needs more noise than this is too small to train with


def search_noise(epsilon: float, delta: float, sample_rate: float, steps: int, tolerance: float = 0.005) -> float:
    """The noise multiplier sigma with eps(sigma) in [epsilon - tolerance, epsilon], eps(sigma) being the
    epsilon of ``steps`` steps at rate q (PRV accountant, at ``delta``).

    eps(sigma) falls monotonically, and log eps is close to linear in log sigma, so the root of
    f(x) = log eps(e^x) - log epsilon is bracketed by steps from sigma = 1 (below) and then found by
    regula falsi with the Illinois rule (a stale end's f is halved, so both ends move). That takes ~5 PRV
    evaluations where Opacus' ``get_noise_multiplier`` bisects [0, 20] in ~14, some at small sigma where
    the PRV domain, and its cost, grow (~3 s per site before). Like Opacus, it returns the bracket's
    high-noise end, so the planned study never spends more than ``epsilon``.
    """
    if not (epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps > 0):
        raise FedradError(f"cannot calibrate noise for epsilon {epsilon}, delta {delta}, sample rate {sample_rate}, "
                          f"{steps} steps")

    def f(x: float) -> float:
        spent = epsilon_of([(math.exp(x), sample_rate, steps)], delta)
        return math.log(max(spent, 1e-300)) - math.log(epsilon)  # huge noise can round epsilon to 0

    # Bracket the root: from sigma = 1, step in log sigma by the slope -1 guess (eps ~ 1/sigma when many
    # steps compose), 20% past it but at most a factor 2 in sigma, until f changes sign; upwards the step
    # doubles each time, downwards not (PRV's cost grows fast as sigma falls).
    x, f_x = 0.0, f(0.0)
    step = math.copysign(min(max(1.2 * abs(f_x), 0.05), math.log(2)), f_x)
    while True:
        if f_x <= 0 and epsilon - epsilon * math.exp(f_x) <= tolerance:
            return math.exp(x)
        y = x + step
        if y > math.log(MAX_SIGMA):
            raise FedradError(f"epsilon {epsilon} is too small a budget for {steps} steps at sample rate "
                              f"{sample_rate:.4g}: it needs more noise than sigma {MAX_SIGMA:g}")
        if y < math.log(1e-3):  # a budget so large that almost no noise spends it
            return math.exp(x)
        f_y = f(y)
        if (f_y > 0) != (f_x > 0):
            break
        x, f_x, step = y, f_y, 2 * step if step > 0 else step
    (lo, f_lo), (hi, f_hi) = sorted([(x, f_x), (y, f_y)])
    eps_hi = epsilon * math.exp(f_hi)  # the true value: the Illinois rule scales f_hi below
    stale = 0  # which end stayed put last time: -1 the low end, +1 the high end
    for _ in range(100):
        if epsilon - eps_hi <= tolerance or hi - lo < 1e-12:
            break
        # PRV can overflow at very little noise: bisect until the low end's value is finite.
        x = hi - f_hi * (hi - lo) / (f_hi - f_lo) if math.isfinite(f_lo) else (lo + hi) / 2
        f_x = f(x)
        if f_x <= 0:
            hi, f_hi, eps_hi = x, f_x, epsilon * math.exp(f_x)
            if stale == -1:
                f_lo /= 2
            stale = -1
        else:
            lo, f_lo = x, f_x
            if stale == 1:
                f_hi /= 2
            stale = 1
    return math.exp(hi)


def record_ids(keys: list[str]) -> list[str]:
    """Short, non-reversible ids of training records (no file names are stored in the ledger)."""
    return sorted(hashlib.sha256(k.encode()).hexdigest()[:16] for k in keys)


@dataclass
class DatasetEntry:
    """One training set's spend, as the ledger charges it.

    ``history`` is every DP step any of its images went through: its own steps
    and those of every other stored training set sharing an image with it.
    """

    name: str
    delta: float
    history: History
    rounds: list[dict[str, Any]]
    records: list[str] = field(default_factory=list)  # record_ids of the training set
    own: History = field(default_factory=list)  # steps taken on exactly this training set
    overlapping: list[str] = field(default_factory=list)  # other sets whose steps ``history`` includes

    def epsilon(self, extra: History | None = None, delta: float | None = None) -> float:
        """Cumulative epsilon of the history (plus ``extra`` planned steps)."""
        return epsilon_of(self.history + (extra or []), delta or self.delta)


class PrivacyLedger:
    """Append-only record of privacy spent, one entry per training set (fingerprint).

    When a hospital adds or removes images, its training set (and fingerprint)
    changes, but shared images keep their past: an entry's history includes
    the steps of every stored set that shares an image with it. That bounds
    each image's true history from above (images not shared are over-charged,
    the safe side), and no step is counted twice.
    Stored as JSON in the hospital's state dir and rewritten atomically, so a
    crash never leaves a half-written ledger. Several processes may share one
    state dir (two studies at one hospital): ``locked`` serialises a round's
    budget check, training and record, and ``record`` merges into the file as it
    is under the lock, so no process's steps are ever lost.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self._lock: int | None = None  # the lock file's descriptor while this object holds the lock
        self._data: dict[str, Any] = {}
        self._load()

    def _load(self) -> None:
        """Read the file (an empty ledger when there is none yet)."""
        try:
            self._data = json.loads(self.path.read_text())
        except FileNotFoundError:
            self._data = {"version": 1, "datasets": {}}
        except (OSError, json.JSONDecodeError) as exc:
            # Never silently reset a budget: refusing to train is the safe failure.
            raise FedradError(f"privacy ledger {self.path} is unreadable ({type(exc).__name__}); "
                              "restore it from backup: training stays off until then") from None

    @contextmanager
    def locked(self, timeout: float = LOCK_WAIT_S) -> Iterator[PrivacyLedger]:
        """Hold the ledger's lock, with the ledger read again under it: for a budget check, the training
        it allows and its ``record`` as one step no other process can interleave.

        Without it, two processes could both read the same past, both pass the budget check and both
        spend, and the later write would drop the earlier one's steps. The lock is an exclusive
        ``flock`` on ``privacy-ledger.lock`` in the state dir; the kernel releases it when the process
        exits, so a crash never leaves the ledger locked. Waits at most ``timeout`` seconds for another
        process's hold, then raises LedgerLockError (the site declines the round rather than hang).
        Re-entrant within this object.
        """
        if self._lock is not None:
            yield self
            return
        self._lock = _lock_file(self.path.parent / LOCK_FILE, timeout)
        try:
            self._load()
            yield self
        finally:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def entry(
        self, fingerprint: str, name: str = "", delta: float = 1e-5, keys: list[str] | None = None
    ) -> DatasetEntry:
        """The ledger entry of a training set (``keys`` identify its records), new or stored."""
        stored = self._data["datasets"].get(fingerprint)
        if stored is None:
            stored = {"name": name, "delta": delta, "history": [], "rounds": [], "records": record_ids(keys or [])}
        return self._entry(fingerprint, stored)

    def _entry(self, fingerprint: str, stored: dict[str, Any]) -> DatasetEntry:
        """``stored`` (the training set's own record) with the steps of every set sharing an image."""
        mine = set(stored["records"])
        history = [tuple(h) for h in stored["history"]]
        overlapping = []
        for other_fp, other in self._data["datasets"].items():
            if other_fp != fingerprint and mine.intersection(other["records"]):
                history += [tuple(h) for h in other["history"]]
                overlapping.append(other_fp)
        own = [tuple(h) for h in stored["history"]]
        return DatasetEntry(stored["name"], stored["delta"], history, stored["rounds"], stored["records"], own,
                            overlapping)

    def record(
        self, fingerprint: str, entry: DatasetEntry, history: History, study_id: str, server_round: int,
        known: tuple[History, float] | None = None,
    ) -> float:
        """Store the steps ``history`` adds to ``entry.history`` and log the round; return epsilon.

        Under the lock (taken here unless the caller holds it) the file is read again and the added
        steps are appended to the entry as it is now: steps another process recorded since ``entry``
        was read are kept, and the epsilon returned is that of everything now charged to the set
        (those steps included). ``known`` is a (history, epsilon) pair already computed (the budget
        check's); it is reused only when it is exactly that history, saving a second PRV pass.
        """
        if history[: len(entry.history)] != entry.history:
            raise ValueError("ledger history may only grow")
        added = [tuple(h) for h in history[len(entry.history) :]]
        with self.locked():
            stored = self._data["datasets"].get(fingerprint) or {
                "name": entry.name, "delta": entry.delta, "history": [], "rounds": [], "records": entry.records}
            now = self._entry(fingerprint, stored)
            total = now.history + added
            if known is not None and [tuple(h) for h in known[0]] == total:
                epsilon = known[1]
            else:
                epsilon = epsilon_of(total, now.delta)
            rounds = now.rounds + [
                {"study": study_id, "round": server_round, "steps": sum(h[2] for h in added), "epsilon": epsilon,
                 "time": time.time()}
            ]
            self._data["datasets"][fingerprint] = {
                "name": now.name,
                "delta": now.delta,
                "history": [list(h) for h in now.own + added],
                "rounds": rounds,
                "records": now.records,
            }
            atomic_write(self.path, lambda fh: fh.write(json.dumps(self._data, indent=1).encode()))
        return epsilon

    def datasets(self) -> dict[str, DatasetEntry]:
        return {fp: self.entry(fp) for fp in self._data["datasets"]}


class LedgerLockError(FedradError):
    """The ledger's lock could not be had: held by another process too long, or no lock file could be locked."""


def _lock_file(path: Path, timeout: float) -> int:
    """An open descriptor of ``path`` holding an exclusive flock, waited for at most ``timeout`` seconds.

    Polls (non-blocking attempts, pauses growing from 10 ms to 100 ms) so that the wait is bounded
    without signals, which would not work off the main thread.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise LedgerLockError(f"cannot lock the privacy ledger in {path.parent} ({exc.strerror})") from None
    deadline, pause = time.monotonic() + timeout, 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                os.close(fd)
                raise LedgerLockError(f"the privacy ledger in {path.parent} is locked by another process for "
                                      f"over {timeout:g} s") from None
            time.sleep(min(pause, left))
            pause = min(2 * pause, 0.1)
        except OSError as exc:  # a file system without flock
            os.close(fd)
            raise LedgerLockError(f"cannot lock the privacy ledger in {path.parent} ({exc.strerror})") from None
