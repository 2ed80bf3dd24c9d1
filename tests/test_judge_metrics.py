"""The judge and the sample-quality scores in its features: known answers."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from pyrovae.data import Dataset
from pyrovae.evaluate import (
    JudgeConfig,
    frechet_distance,
    judge_for,
    kernel_distance,
    precision_recall,
    sample_scores,
    train_judge,
)


def gaussian_features(n, mean, cov, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.as_tensor(mean, dtype=torch.float64) + torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ (
        torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64)).T
    )


def test_frechet_distance_of_a_set_against_itself_is_zero():
    f = gaussian_features(500, [0.0, 1.0, 2.0], np.diag([1.0, 2.0, 0.5]), 0)
    assert abs(frechet_distance(f, f)) < 1e-9


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    f = gaussian_features(500, [0.0, 1.0, 2.0], np.diag([1.0, 2.0, 0.5]), 0)
    shift = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    assert frechet_distance(f, f + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)


def test_frechet_distance_is_the_closed_form_for_the_sets_moments():
    f1 = gaussian_features(400, [0.0, 0.0, 0.0], [[1.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 0.5]], 1)
    f2 = gaussian_features(300, [1.0, -1.0, 0.5], [[0.5, 0.0, 0.1], [0.0, 1.0, 0.0], [0.1, 0.0, 3.0]], 2)
    m1, m2, s1, s2 = f1.mean(0).numpy(), f2.mean(0).numpy(), np.cov(f1.T.numpy()), np.cov(f2.T.numpy())
    closed = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(f1, f2) == pytest.approx(closed, rel=1e-8)


def test_kid_of_two_samples_of_one_distribution_averages_zero():
    values = torch.tensor(
        [
            kernel_distance(
                gaussian_features(100, [0.0, 0.0], np.eye(2), 2 * i),
                gaussian_features(100, [0.0, 0.0], np.eye(2), 2 * i + 1),
            )["kid"]
            for i in range(200)
        ]
    )
    assert abs(values.mean()) < 4 * values.std() / math.sqrt(len(values))


def test_kid_is_unbiased_for_the_closed_form_mmd():
    # 1-D features, k(a, b) = (a b + 1)^3 = 1 + 3 ab + 3 a^2 b^2 + a^3 b^3, so
    # MMD^2 = 3 (m1 - m1')^2 + 3 (m2 - m2')^2 + (m3 - m3')^2 with m_k = E x^k:
    # N(0, 1): m = (0, 1, 0); N(0.5, 1): m = (0.5, 1.25, 0.5^3 + 3 * 0.5)
    closed = 3 * 0.5**2 + 3 * 0.25**2 + (0.125 + 1.5) ** 2
    values = torch.tensor(
        [
            kernel_distance(
                gaussian_features(50, [0.0], [[1.0]], 2 * i), gaussian_features(50, [0.5], [[1.0]], 2 * i + 1)
            )["kid"]
            for i in range(400)
        ]
    )
    assert abs(values.mean() - closed) < 4 * values.std() / math.sqrt(len(values))


def test_kid_over_subsets_reports_their_spread():
    f1 = gaussian_features(300, [0.0, 0.0], np.eye(2), 0)
    f2 = gaussian_features(300, [1.0, 0.0], np.eye(2), 1)
    result = kernel_distance(f1, f2, subsets=10, subset_size=100)
    assert result["kid"] > 0 and result["kid_std"] > 0


def test_kid_of_one_subset_reports_no_spread_rather_than_zero():
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g) + 0.5
    assert kernel_distance(f1, f2, subset_size=100)["kid_std"] is None
    assert kernel_distance(f1, f2, subsets=1, subset_size=20)["kid_std"] is None


def test_precision_and_recall_of_a_set_against_itself_are_one():
    f = gaussian_features(200, [0.0, 0.0], np.eye(2), 0)
    assert precision_recall(f, f) == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(f, f + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}


def test_mismatched_features_name_the_arguments():
    with pytest.raises(ValueError, match="f1 and f2"):
        frechet_distance(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="f1 must"):
        kernel_distance(torch.zeros(5), torch.zeros(5, 3))


def tiny_images(n=120, seed=0):
    """Two classes of 8x8 images: a bright left half or a bright right half, with noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    x[y == 0, :, :, :4] += 0.6
    x[y == 1, :, :, 4:] += 0.6
    return x.reshape(n, 64).clamp(0, 1), y


def tiny_dataset():
    x, y = tiny_images()
    return Dataset("tiny", x[:80], y[:80], x[80:], y[80:], (1, 8, 8))


def test_the_judge_is_deterministic_given_its_seed():
    x, y = tiny_images()
    config = JudgeConfig(epochs=1, width=8, features=16)
    a, b = train_judge(x, y, (1, 8, 8), config), train_judge(x, y, (1, 8, 8), config)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)


def test_a_second_judge_for_the_same_data_is_read_from_the_cache(tmp_path):
    config = JudgeConfig(epochs=1, width=8, features=16)
    first = judge_for(tiny_dataset(), str(tmp_path), config)
    second = judge_for(tiny_dataset(), str(tmp_path), config)
    assert not first.from_cache and second.from_cache
    assert second.test_accuracy == first.test_accuracy
    for p, q in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(p, q)


def test_sample_scores_report_the_judges_accuracy(tmp_path):
    ds = tiny_dataset()
    judge = judge_for(ds, str(tmp_path), JudgeConfig(epochs=1, width=8, features=16))
    scores = sample_scores(judge, ds.x_test, ds.x_test, precision_and_recall=True)
    assert abs(scores["fd_judge"]) < 1e-9 and scores["judge_test_accuracy"] == judge.test_accuracy
    assert scores["precision"] == scores["recall"] == 1.0


def test_a_judge_needs_two_classes():
    x, _ = tiny_images(10)
    with pytest.raises(ValueError, match="2 classes"):
        train_judge(x, torch.zeros(10, dtype=torch.long), (1, 8, 8), JudgeConfig(epochs=1))
