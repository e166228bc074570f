"""FID/IS arithmetic against closed forms on Gaussians [P §3.1]."""

import numpy as np
import pytest

from dalle_dist.eval.fid import fid_from_features, frechet_distance, gaussian_blur, gaussian_stats, inception_score


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_closed_form_commuting_full_covariances():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    l1, l2 = rng.uniform(0.2, 2, 5), rng.uniform(0.2, 2, 5)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T  # same eigenvectors: (Σ1Σ2)^½ = Q diag(√(l1 l2)) Qᵀ
    want = np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    assert frechet_distance(np.zeros(5), s1, np.zeros(5), s2) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_properties_and_sampling():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4000, 3))
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    b = rng.normal(loc=1.0, scale=1.0, size=(4000, 3))  # shift by 1 in each of 3 dims: FID → 3
    assert fid_from_features(a, b) == pytest.approx(3.0, abs=0.15)
    mu, sigma = gaussian_stats(a)
    assert mu.shape == (3,) and sigma.shape == (3, 3)
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(3))


def test_inception_score_bounds():
    c = 10
    confident_diverse = np.eye(c)[np.arange(1000) % c]  # one-hot, uniform marginal → IS = C
    assert inception_score(confident_diverse)[0] == pytest.approx(c, rel=1e-6)
    uniform = np.full((100, c), 1 / c)  # no confidence → IS = 1
    assert inception_score(uniform)[0] == pytest.approx(1.0)
    mean, std = inception_score(confident_diverse, splits=10)
    assert mean == pytest.approx(c, rel=1e-6) and std == pytest.approx(0.0, abs=1e-9)


def test_gaussian_blur_radius():
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 16, 16] = 255
    assert gaussian_blur(img, 0) is img
    b1, b4 = gaussian_blur(img, 1), gaussian_blur(img, 4)
    assert b1[0, 16, 16, 0] < 255 and b4[0, 16, 16, 0] < b1[0, 16, 16, 0]
    with pytest.raises(ValueError):
        gaussian_blur(img, -1)
