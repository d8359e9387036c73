"""Which ASPP branches a released head was trained with (NumPy only).

The ASPP-sum bug (docs/methods/README.md): AdaptSegNet's and MaxSquare's heads return after summing
branches 0 and 1, so in their checkpoints branches 2 and 3 never trained and still look like
their N(0, 0.01) initialisation. `detect_aspp_branches` tells such heads apart (see
`looks_like_deeplab_init` for the thresholds); a disagreement with the model's
`num_aspp_branches` is an error unless the check is switched off.
"""

import math
from collections.abc import Mapping

import numpy as np

# DeepLabV2's head init: weights N(0, INIT_STD); biases PyTorch's default U(+-1/sqrt(fan_in)).
INIT_STD = 0.01
# A branch "looks untrained" when its weights' standard deviation is within this relative
# distance of INIT_STD (or SIGMAS standard errors of a sample std, if larger) ...
STD_RELATIVE_TOLERANCE = 0.02
# ... its weights' mean is within SIGMAS standard errors of 0 (INIT_STD / sqrt(n)), and every
# bias lies in PyTorch's default-init range. For a released head (19 x 2048 x 3 x 3 = 350,208
# weights) that is std in [0.0098, 0.0102] and |mean| < 1.0e-4: a freshly drawn N(0, 0.01)
# tensor passes with near certainty (its std's standard error is 0.12 %), a tensor that trained
# for thousands of SGD steps (weight decay alone shrinks it by several percent) does not.
SIGMAS = 6.0


def looks_like_deeplab_init(weight: np.ndarray, bias: np.ndarray | None = None):
    """(bool, stats): does one ASPP branch (PyTorch [out, in, kh, kw]) look untrained?"""
    weight = np.asarray(weight, np.float64)
    n = weight.size
    std, mean = float(weight.std()), float(weight.mean())
    std_tolerance = max(STD_RELATIVE_TOLERANCE, SIGMAS / math.sqrt(2 * n))
    mean_tolerance = SIGMAS * INIT_STD / math.sqrt(n)
    bias_bound = 1.0 / math.sqrt(n / weight.shape[0])  # 1 / sqrt(fan_in)
    max_bias = float(np.abs(bias).max()) if bias is not None and np.size(bias) else 0.0
    untrained = (
        abs(std / INIT_STD - 1.0) <= std_tolerance
        and abs(mean) <= mean_tolerance
        and max_bias <= bias_bound
    )
    stats = {
        "std": std,
        "mean": mean,
        "max_abs_bias": max_bias,
        "looks_untrained": bool(untrained),
    }
    return bool(untrained), stats


def detect_aspp_branches(branches: Mapping[int, tuple]) -> tuple[int | None, list[dict]]:
    """(2, 4 or None, per-branch stats) for one head's {index: (weight, bias)} (PyTorch layout).

    2: branches 2 and 3 look untrained while branch 0 or 1 does not (the ASPP-sum bug);
    4: neither branch 2 nor 3 looks untrained; None: fewer than four branches, every branch
    looks untrained (a fresh model) or a mixed picture.
    """
    if not all(i in branches for i in range(4)):
        return None, []
    flags, stats = [], []
    for i in range(4):
        untrained, s = looks_like_deeplab_init(*branches[i])
        flags.append(untrained)
        stats.append({"branch": i, **s})
    if flags[2] and flags[3] and not (flags[0] and flags[1]):
        return 2, stats
    if not flags[2] and not flags[3]:
        return 4, stats
    return None, stats
