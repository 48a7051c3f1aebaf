"""Thresholds with a guarantee: distribution-free risk control of early exit on calibration images.

A threshold scan runs from the most conservative threshold (every image at the final exit, loss 0) towards
cheaper ones. The per-image loss is the early exit's error beyond the full network's (`error`:
max(0, 1[early wrong] - 1[full wrong])) or its disagreement with the full network (`consistency`:
1[early prediction != full prediction], which reads no labels). With n calibration images and level alpha:

The risk is the expected per-image loss; a budget acc-drop=P sets the level alpha = P/100.

- `crc`, Conformal Risk Control (Angelopoulos et al., 2022): the cheapest threshold whose empirical risk is
  at most ((n + 1) alpha - B) / n, B = 1 the loss bound; E[loss on a new image] <= alpha, the expectation taken
  over the calibration images and the new image together (marginal), not given the calibration draw. CRC needs a
  loss that never falls as the threshold gets more conservative, so it scans each image's running maximum from the
  conservative end (an upper bound of the loss itself).
- `ltt`, Learn-then-Test (Angelopoulos et al., 2021): fixed-sequence testing of H0: risk > alpha over LTT_GRID,
  a grid fixed before calibration, from the conservative end with the Hoeffding-Bentkus p-value, stopping at
  the first threshold it cannot reject at level delta; with probability >= 1 - delta over the calibration draw,
  the risk (expected loss on new images) of the chosen threshold is <= alpha.
- `none`, the empirical rule: the cheapest threshold whose accuracy drop on the calibration images is at
  most alpha; no guarantee.

When nothing can be certified, the scan's first threshold (no early exit) is chosen and the number of
calibration images that would be needed is returned.
"""
import math
from typing import NamedTuple

import numpy as np
import torch

from evaluation.operating_points import MAX_CELLS, distinct_thresholds, exits_at

RISK_RULES = ('none', 'crc', 'ltt')
DEFAULT_DELTA = 0.1
RISK_LOSSES = ('error', 'consistency')
GUARANTEES = {'none': 'none',
              'crc': 'E[loss] <= P/100, marginal over the calibration images and the new image',
              'ltt': 'risk (expected loss on new images) <= P/100 with probability >= 1 - delta over the '
                     'calibration draw'}
LOSS_BOUND = 1.0  # B: both losses are 0/1
# Every exit score lies in [0, 1] (gate and max probabilities, 1 - normalised entropy): above the next float32
# after 1 nobody exits, new images included.
NO_EXIT = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
# LTT's thresholds, fixed before any calibration image is seen (fixed-sequence testing needs its hypotheses and
# their order set in advance): NO_EXIT, then 1.000, 0.999, ..., 0.000.
LTT_GRID = torch.cat([torch.tensor([NO_EXIT], dtype=torch.float64), torch.linspace(1, 0, 1001, dtype=torch.float64)])


class RiskControl(NamedTuple):
    """How --eval turns an acc-drop budget into a threshold: `rule` (none, crc, ltt), its `delta` (ltt) and
    the per-image `loss` (error, consistency)."""
    rule: str = 'none'
    delta: float = DEFAULT_DELTA
    loss: str = 'error'


class ThresholdScan(NamedTuple):
    """Loss counts over n images at each threshold of a scan, most conservative first (index 0)."""
    thresholds: torch.Tensor  # (T,) float64, descending
    n: int
    loss: np.ndarray  # (T,) images whose loss is 1 at the threshold
    running_max: np.ndarray  # (T,) images whose loss was 1 at this or any more conservative threshold
    accuracy_drop: np.ndarray  # (T,) wrong at the exit minus wrong at the final head (needs labels)


class Selection(NamedTuple):
    """The threshold a rule chose: its index in the scan, whether the rule certified it, and (when it could
    not) how many calibration images it would need."""
    index: int
    threshold: float
    certified: bool
    needed_images: int | None


def image_losses(exit_predictions: torch.Tensor, full_predictions: torch.Tensor, targets: torch.Tensor,
                 loss: str) -> torch.Tensor:
    """(..., N) bool per-image loss of predictions made at the exits against the full network's (N,)."""
    if loss == 'consistency':
        return exit_predictions != full_predictions
    if loss == 'error':  # wrong here while the full network is right: max(0, wrong_exit - wrong_full)
        return (exit_predictions != targets) & (full_predictions == targets)
    raise ValueError(f'unknown risk loss {loss!r}')


def scan_thresholds(scores: torch.Tensor) -> torch.Tensor:
    """The thresholds a scan walks, descending: NO_EXIT, then every distinct score. The first is above any
    score a new image can have, so an uncertified rule sends new images to the final exit as well."""
    thresholds = distinct_thresholds(scores)
    thresholds[0] = max(float(thresholds[0]), NO_EXIT)
    return thresholds


def scan(predictions: torch.Tensor, targets: torch.Tensor, scores: torch.Tensor, thresholds: torch.Tensor,
         loss: str) -> ThresholdScan:
    """Loss counts of early exit at every threshold (descending): predictions (E, N) of each exit, scores
    (G, N) of the E - 1 intermediate exits. Chunked over thresholds so memory stays bounded."""
    full, n = predictions[-1], predictions.shape[1]
    wrong = predictions != targets  # (E, N)
    chunk = max(1, MAX_CELLS // max(1, scores.numel()))
    running = torch.zeros(n, dtype=torch.bool)
    losses, maxima, drops = [], [], []
    for start in range(0, len(thresholds), chunk):
        exits = exits_at(scores, thresholds[start:start + chunk])  # (t, N)
        lost = image_losses(predictions.gather(0, exits), full, targets, loss)
        # running maximum along the scan, carried over from the previous chunk
        seen = (lost.cumsum(dim=0) > 0) | running
        running = seen[-1]
        losses.append(lost.sum(dim=1))
        maxima.append(seen.sum(dim=1))
        drops.append(wrong.gather(0, exits).sum(dim=1) - wrong[-1].sum())
    return ThresholdScan(thresholds, n, torch.cat(losses).numpy(), torch.cat(maxima).numpy(),
                         torch.cat(drops).numpy())


def crc_bound(n: int, alpha: float) -> float:
    """The empirical risk CRC allows on n images: ((n + 1) alpha - B) / n."""
    return ((n + 1) * alpha - LOSS_BOUND) / n if n > 0 else -math.inf


def crc_needed_images(alpha: float) -> int:
    """The fewest calibration images with which CRC certifies anything: (n + 1) alpha - B >= 0."""
    n = max(1, math.ceil(LOSS_BOUND / alpha - 1))
    while crc_bound(n, alpha) < 0:  # float rounding in 1 / alpha
        n += 1
    return n


def hoeffding_bentkus_pvalue(losses: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """p-values of H0: risk > alpha from `losses` (counts of 0/1 losses over n images):
    min(exp(-n h1(min(R, alpha), alpha)), e P(Binom(n, alpha) <= ceil(n R))), h1 the Bernoulli KL divergence."""
    from scipy.special import bdtr  # the binomial CDF; imported here, so training processes never load scipy
    counts = np.asarray(losses, dtype=np.float64)
    risk = np.minimum(counts / n, alpha)
    with np.errstate(divide='ignore', invalid='ignore'):
        h1 = (np.where(risk > 0, risk * np.log(risk / alpha), 0.0)
              + (1 - risk) * np.log((1 - risk) / (1 - alpha)))
    hoeffding = np.exp(-n * h1)
    bentkus = math.e * bdtr(counts, n, alpha)  # P(Binom(n, alpha) <= counts); counts = n R, whole numbers
    return np.minimum(hoeffding, bentkus)


def ltt_needed_images(alpha: float, delta: float) -> int:
    """The fewest calibration images with which LTT rejects at zero loss: (1 - alpha)^n <= delta."""
    n = max(1, math.ceil(math.log(delta) / math.log1p(-alpha)))
    while hoeffding_bentkus_pvalue(np.zeros(1), n, alpha)[0] > delta:
        n += 1
    while n > 1 and hoeffding_bentkus_pvalue(np.zeros(1), n - 1, alpha)[0] <= delta:
        n -= 1
    return n


def select(risk_scan: ThresholdScan, rule: str, alpha: float, delta: float) -> Selection:
    """The threshold `rule` picks for level alpha (and delta for ltt); the scan's cost never rises with the
    index, so the cheapest admissible threshold is the last admissible index."""
    n = risk_scan.n
    if rule == 'none':
        admissible = np.flatnonzero(risk_scan.accuracy_drop <= alpha * n + 1e-9)
        return _pick(risk_scan, int(admissible[-1]) if admissible.size else 0, False, None)
    if rule == 'crc':
        # running_max never falls along the scan, so the admissible thresholds are a prefix of it
        admissible = risk_scan.running_max <= (n + 1) * alpha - LOSS_BOUND + 1e-9  # n times crc_bound
        needed = crc_needed_images(alpha)
    elif rule == 'ltt':
        admissible = (hoeffding_bentkus_pvalue(risk_scan.loss, n, alpha) <= delta if n
                      else np.zeros(len(risk_scan.loss), dtype=bool))
        needed = ltt_needed_images(alpha, delta)
    else:
        raise ValueError(f'unknown risk rule {rule!r}')
    if not admissible[0]:  # not even the final exit alone: too few images for alpha (and delta)
        return _pick(risk_scan, 0, False, needed)
    # fixed-sequence: the last threshold before the first one that fails
    last = int(np.argmin(admissible)) - 1 if not admissible.all() else len(admissible) - 1
    return _pick(risk_scan, last, True, None)


def _pick(risk_scan: ThresholdScan, index: int, certified: bool, needed: int | None) -> Selection:
    return Selection(index, float(risk_scan.thresholds[index]), certified, needed)
