"""Sample-quality scores in a judge's feature space (:mod:`pyrovae.evaluate.judge`).

They are named for what they are: "FD in the judge's features", not FID,
which means Inception-v3 features (not available here); the same for KID.

- Fréchet distance between Gaussians fitted to two feature sets:

      FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

  (Heusel et al. 2017), biased for finite samples (it is positive between two
  samples of one distribution), so compare FDs of equally many samples only.
- Kernel distance, KID (Binkowski et al. 2018): the unbiased estimate of the
  squared MMD with the polynomial kernel k(a, b) = (a.b / d + 1)^3, d the
  feature dimension,

      MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
                - 2/(m n) sum_{i, j} k(x_i, y_j),

  averaged over random subsets; unbiased, so it can be negative, and its mean
  over samples of one distribution is 0.
- Precision and recall (Kynkäänniemi et al. 2019): the share of generated
  features inside the real features' manifold (the union of balls reaching
  each real point's k-th nearest real neighbour), and the share of real
  features inside the generated ones'.

Features are ``(N, d)`` tensors; every score is computed in float64.
"""

from __future__ import annotations

import torch


def _check_features(name: str, f: torch.Tensor, min_rows: int = 2) -> torch.Tensor:
    if not torch.is_tensor(f) or f.dim() != 2 or len(f) < min_rows:
        raise ValueError(
            f"{name} must be a (N >= {min_rows}, d) tensor of features, got {tuple(getattr(f, 'shape', ()))}"
        )
    return f.double()


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """FD between Gaussians with the two feature sets' means and (unbiased)
    covariances. Tr (S_1 S_2)^{1/2} is the sum of the square roots of the
    eigenvalues of S_1^{1/2} S_2 S_1^{1/2} (symmetric, positive semi-definite)."""
    f1, f2 = _check_features("f1", f1), _check_features("f2", f2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"f1 and f2 must have as many features, got {f1.shape[1]} and {f2.shape[1]}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T).reshape(f1.shape[1], -1), torch.cov(f2.T).reshape(f2.shape[1], -1)
    vals, vecs = torch.linalg.eigh(s1)
    root1 = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * cross)


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return (
        (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
        + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
        - 2 * k_xy.mean()
    )


def kernel_distance(
    f1: torch.Tensor, f2: torch.Tensor, subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> dict:
    """KID: the unbiased MMD^2 with the cubic polynomial kernel, averaged over
    ``subsets`` pairs of random subsets of ``subset_size`` rows of each set (all
    rows, once, when a set has no more than that). Returns ``kid`` (the mean)
    and ``kid_std`` (the spread over subsets, as Binkowski et al. report it;
    ``None`` where there is one subset, so no spread to report)."""
    f1, f2 = _check_features("f1", f1), _check_features("f2", f2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"f1 and f2 must have as many features, got {f1.shape[1]} and {f2.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"subsets must be >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    if max(len(f1), len(f2)) <= subset_size:
        return {"kid": float(_mmd2_unbiased(f1, f2)), "kid_std": None}
    g = torch.Generator().manual_seed(seed)
    m, n = min(subset_size, len(f1)), min(subset_size, len(f2))
    values = torch.stack(
        [
            _mmd2_unbiased(f1[torch.randperm(len(f1), generator=g)[:m]], f2[torch.randperm(len(f2), generator=g)[:n]])
            for _ in range(subsets)
        ]
    )
    return {"kid": float(values.mean()), "kid_std": float(values.std()) if subsets > 1 else None}


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """Kynkäänniemi et al.'s improved precision and recall with k-th nearest
    neighbour radii: ``precision`` = share of ``fake`` rows within some real
    row's radius, ``recall`` = share of ``real`` rows within some fake row's."""
    real, fake = _check_features("real", real, k + 1), _check_features("fake", fake, k + 1)

    def inside(support: torch.Tensor, query: torch.Tensor) -> float:
        # the k-th neighbour other than the point itself: column k of the sorted distances
        radii = torch.cdist(support, support).kthvalue(k + 1, dim=1).values
        return float((torch.cdist(query, support) <= radii).any(1).double().mean())

    return {"precision": inside(real, fake), "recall": inside(fake, real)}


def sample_scores(judge, samples: torch.Tensor, reference: torch.Tensor, precision_and_recall: bool = False) -> dict:
    """FD and KID (and optionally precision and recall) between ``samples``
    and ``reference`` rows (both in the data set's convention, e.g. the test
    split) in ``judge``'s features, with the judge's own test accuracy:
    ``fd_judge``, ``kid_judge``, ``kid_judge_std``, [``precision``, ``recall``],
    ``judge_test_accuracy``, ``scored_samples``, ``reference_examples``."""
    fs, fr = judge.embed(samples), judge.embed(reference)
    kid = kernel_distance(fs, fr)
    scores = {"fd_judge": frechet_distance(fs, fr), "kid_judge": kid["kid"], "kid_judge_std": kid["kid_std"]}
    if precision_and_recall:
        scores.update(precision_recall(fr, fs))
    scores["judge_test_accuracy"] = judge.test_accuracy
    scores["scored_samples"], scores["reference_examples"] = len(samples), len(reference)
    return scores
