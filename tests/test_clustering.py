"""k-means pieces and the clustering strategies (kmeans, diverse-minibatch) against references."""

from __future__ import annotations

import numpy as np
import pytest

from alselect.errors import UsageError
from alselect.strategies import PoolInputs, clustering, make_strategy
from alselect.strategies.clustering import kmeans_fit, nearest_unique, pick_shares
from alselect.strategies.uncertainty import top_two


def blobs(n: int, dims: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dims)) * 20
    label = np.arange(n) % k
    return (centres[label] + rng.standard_normal((n, dims))).astype(np.float32), label, centres


def brute_greedy_matching(points: np.ndarray, centroids: np.ndarray) -> list[int]:
    """All (distance, row, centroid) pairs in increasing order; take a pair when both are free."""
    pairs = sorted(
        (float(((points[i].astype(np.float64) - centroids[c]) ** 2).sum()), i, c)
        for i in range(points.shape[0])
        for c in range(centroids.shape[0])
    )
    picks = [-1] * centroids.shape[0]
    taken: set[int] = set()
    for _, i, c in pairs:
        if picks[c] < 0 and i not in taken:
            picks[c] = i
            taken.add(i)
    return picks


def test_kmeans_recovers_separated_blobs() -> None:
    x, _, centres = blobs(600, 5, 4, seed=1)
    fitted = kmeans_fit(x, 4, rng=np.random.default_rng(0), device="cpu")
    # every true centre has a fitted centroid within the blob's standard error
    distance = np.sqrt(((fitted[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2))
    assert (distance.min(axis=0) < 0.5).all()


def test_single_weighted_cluster_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    w = rng.random(50)
    fitted = kmeans_fit(x, 1, rng=np.random.default_rng(0), weights=w, device="cpu")
    np.testing.assert_allclose(fitted[0], (x * w[:, None]).sum(axis=0) / w.sum(), atol=1e-5)


def test_weights_pull_centroids_towards_heavy_points() -> None:
    # two tight groups; one group's far half is heavy: the weighted centroid moves towards it
    x = np.array([[0.0], [1.0], [10.0], [11.0]], dtype=np.float32)
    plain = kmeans_fit(x, 2, rng=np.random.default_rng(0), device="cpu")
    heavy = kmeans_fit(
        x, 2, rng=np.random.default_rng(0), weights=np.array([1.0, 9.0, 1.0, 1.0]), device="cpu"
    )
    assert sorted(plain.ravel().tolist()) == pytest.approx([0.5, 10.5])
    assert sorted(heavy.ravel().tolist()) == pytest.approx([0.9, 10.5])


def test_nearest_unique_equals_greedy_matching_when_lists_are_complete(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(3)
    points = rng.standard_normal((40, 3)).astype(np.float32)
    centroids = rng.standard_normal((12, 3)).astype(np.float32) * 0.3  # crowded: they compete
    monkeypatch.setattr(clustering, "NEAREST_PER_CENTROID", 40)
    picks = nearest_unique(points, np.arange(40), centroids, device="cpu")
    assert picks.tolist() == brute_greedy_matching(points, centroids)


def test_nearest_unique_hand_case_closer_pair_wins() -> None:
    points = np.array([[0.0], [1.0], [5.0]], dtype=np.float32)
    centroids = np.array([[0.4], [0.1]], dtype=np.float32)  # both nearest to row 0; centroid 1 is closer
    picks = nearest_unique(points, np.arange(3), centroids, device="cpu")
    assert picks.tolist() == [1, 0]


def test_nearest_unique_second_pass_when_short_lists_run_out(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    points = rng.standard_normal((30, 2)).astype(np.float32)
    centroids = np.zeros((10, 2), dtype=np.float32) + rng.standard_normal((10, 2)).astype(np.float32) * 1e-3
    monkeypatch.setattr(clustering, "NEAREST_PER_CENTROID", 1)  # one candidate each: all want the same row
    rows = np.arange(100, 130)
    big = np.zeros((130, 2), dtype=np.float32)
    big[rows] = points
    picks = nearest_unique(big, rows, centroids, device="cpu")
    assert len(set(picks.tolist())) == 10 and set(picks.tolist()) <= set(rows.tolist())
    # the ten rows nearest the (almost identical) centroids are the ones taken
    order = np.argsort((points**2).sum(axis=1))
    assert set(picks.tolist()) == set((rows[order[:10]]).tolist())


def test_pick_shares_match_a_brute_force_nearest_pick_count() -> None:
    rng = np.random.default_rng(8)
    h = rng.standard_normal((60, 4)).astype(np.float32)
    candidates = np.arange(5, 60, 2)
    picks = candidates[[3, 10, 0, 20]]
    shares = pick_shares(h, candidates, picks, device="cpu")
    d2 = ((h[candidates][:, None, :] - h[picks][None, :, :]) ** 2).sum(axis=2)
    expected = np.bincount(d2.argmin(axis=1), minlength=4) / candidates.size
    np.testing.assert_allclose(shares, expected)
    assert shares.sum() == pytest.approx(1.0) and (shares > 0).all()


def test_copies_of_one_image_share_what_they_represent_and_no_score_is_zero() -> None:
    """Six copies of one image (identical embeddings) and two other images: k-means with more
    centroids than distinct images must still give every pick a score in (0, 1], never increasing."""
    rng = np.random.default_rng(9)
    copy, others = (
        rng.standard_normal(6).astype(np.float32),
        rng.standard_normal((2, 6)).astype(np.float32) * 5,
    )
    x = np.vstack([np.tile(copy, (6, 1)), others])
    inputs = PoolInputs(probs=np.zeros((8, 2)), labeled=np.zeros(8, dtype=bool), embeddings=x)
    for budget in range(1, 9):
        selection = make_strategy("kmeans", seed=0, device="cpu").select(budget, inputs)
        scores, rows = selection.scores, selection.indices
        assert len(set(rows.tolist())) == budget
        assert ((scores > 0) & (scores <= 1)).all(), (budget, scores)
        assert np.all(np.diff(scores) <= 0)
        assert scores.sum() == pytest.approx(1.0)  # what the batch represents adds up to the pool
        copies = rows < 6
        if budget >= 3:  # one pick per distinct image at least: the copies together hold 6 of 8
            assert scores[copies].sum() == pytest.approx(0.75) and set(rows[~copies].tolist()) == {6, 7}
            np.testing.assert_allclose(scores[copies], 0.75 / copies.sum())
            np.testing.assert_allclose(scores[~copies], 0.125)


def test_kmeans_strategy_picks_one_image_per_blob_largest_first() -> None:
    x, label, _ = blobs(300, 6, 5, seed=4)
    keep = np.ones(300, dtype=bool)
    keep[(label == 4) & (np.arange(300) % 2 == 0)] = False  # blob 4: half the size
    x, label = x[keep], label[keep]
    inputs = PoolInputs(
        probs=np.zeros((x.shape[0], 2)), labeled=np.zeros(x.shape[0], dtype=bool), embeddings=x
    )
    selection = make_strategy("kmeans", seed=0, device="cpu").select(5, inputs)
    assert sorted(label[selection.indices].tolist()) == [0, 1, 2, 3, 4]
    assert label[selection.indices[-1]] == 4  # the smallest cluster last
    sizes = np.bincount(label)
    np.testing.assert_allclose(selection.scores, sizes[label[selection.indices]] / x.shape[0])


def test_kmeans_fits_on_a_sample_when_the_pool_is_large() -> None:
    x, label, _ = blobs(2000, 4, 3, seed=6)
    inputs = PoolInputs(probs=np.zeros((2000, 2)), labeled=np.zeros(2000, dtype=bool), embeddings=x)
    selection = make_strategy("kmeans", fit_size=30, seed=1, device="cpu").select(3, inputs)
    assert sorted(label[selection.indices].tolist()) == [0, 1, 2]
    # the sizes still count every candidate, not just the fitted sample
    assert selection.scores.sum() == pytest.approx(1.0)


def test_diverse_minibatch_prefilters_by_margin_and_spreads() -> None:
    x, label, _ = blobs(600, 4, 6, seed=7)
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(3), 600).astype(np.float32)
    probs[label == 5] = [0.98, 0.01, 0.01]  # blob 5 is confident: never among the uncertain
    inputs = PoolInputs(probs=probs, labeled=np.zeros(600, dtype=bool), embeddings=x)
    selection = make_strategy("diverse-minibatch", beta=10, seed=0, device="cpu").select(5, inputs)
    first, second = top_two(probs)
    informativeness = 1.0 - (first - second)
    kept = np.argsort(-informativeness, kind="stable")[:50]
    assert set(selection.indices.tolist()) <= set(kept.tolist())
    assert 5 not in label[selection.indices]
    assert len(set(label[selection.indices].tolist())) == 5  # one per blob: diverse
    np.testing.assert_allclose(selection.scores, informativeness[selection.indices])
    assert np.all(np.diff(selection.scores) <= 0)


def test_clustering_parameters_are_validated() -> None:
    x, _, _ = blobs(50, 2, 2, seed=0)
    inputs = PoolInputs(
        probs=np.full((50, 2), 0.5, dtype=np.float32), labeled=np.zeros(50, dtype=bool), embeddings=x
    )
    with pytest.raises(UsageError, match="beta"):
        make_strategy("diverse-minibatch", beta=0).select(3, inputs)
    with pytest.raises(UsageError, match="fit_size"):
        make_strategy("kmeans", fit_size=0).select(3, inputs)
