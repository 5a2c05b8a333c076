import numpy as np
import pytest

from policy_server.policy.distribution import Categorical, DiagGaussian, distribution_for
from policy_server.policy.spaces import Box, Discrete, MultiDiscrete

MASKED = -3.4e38


def test_masked_actions_get_probability_exactly_zero() -> None:
    logits = np.array([[1.0, MASKED, 2.0, MASKED]], dtype=np.float32)
    probabilities = Categorical((4,)).distribution(logits).probabilities
    assert probabilities is not None
    p = probabilities[0][0]
    assert p[1] == 0.0 and p[3] == 0.0
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p[[0, 2]], np.exp([1, 2]) / np.exp([1, 2]).sum())


def test_masked_actions_are_never_sampled() -> None:
    logits = np.tile(np.array([[MASKED, 0.0, MASKED, 0.0]], dtype=np.float32), (20_000, 1))
    chosen = Categorical((4,)).sample(logits, np.random.default_rng(0))
    assert set(np.unique(chosen.values)) == {1, 3}
    assert np.all(np.isfinite(chosen.log_prob))


def test_multi_discrete_splits_components_and_sums_log_probs() -> None:
    distribution = distribution_for(MultiDiscrete((2, 3)))
    logits = np.array([[0.0, np.log(3.0), 0.0, 0.0, np.log(2.0)]])
    mode = distribution.mode(logits)
    assert mode.values.tolist() == [[1, 2]]
    np.testing.assert_allclose(mode.log_prob, np.log(0.75) + np.log(0.5))


def test_sample_frequencies_follow_softmax() -> None:
    logits = np.tile(np.array([[0.0, 1.0, 2.0]]), (60_000, 1))
    chosen = Categorical((3,)).sample(logits, np.random.default_rng(1)).values[:, 0]
    expected = np.exp([0, 1, 2]) / np.exp([0, 1, 2]).sum()
    np.testing.assert_allclose(np.bincount(chosen) / len(chosen), expected, atol=0.01)


def test_seeded_samples_repeat() -> None:
    logits = np.zeros((50, 6))
    first = Categorical((6,)).sample(logits, np.random.default_rng(42)).values
    again = Categorical((6,)).sample(logits, np.random.default_rng(42)).values
    assert first.tolist() == again.tolist()


def test_gaussian_moments_mode_and_log_density() -> None:
    distribution = distribution_for(Box(2))
    assert isinstance(distribution, DiagGaussian)
    logits = np.array([[0.5, -1.0, np.log(2.0), 0.0]])
    moments = distribution.distribution(logits)
    assert moments.mean is not None and moments.std is not None
    np.testing.assert_allclose(moments.mean, [[0.5, -1.0]])
    np.testing.assert_allclose(moments.std, [[2.0, 1.0]])
    mode = distribution.mode(logits)
    expected = -np.log(2.0) - np.log(2 * np.pi)  # densities at the means of N(.,2) and N(.,1)
    np.testing.assert_allclose(mode.log_prob, [expected])
    samples = distribution.sample(np.repeat(logits, 40_000, axis=0), np.random.default_rng(3))
    np.testing.assert_allclose(samples.values.mean(axis=0), [0.5, -1.0], atol=0.05)
    np.testing.assert_allclose(samples.values.std(axis=0), [2.0, 1.0], atol=0.05)


@pytest.mark.parametrize("space", [Discrete(4), MultiDiscrete((3, 3)), Box(2)])
def test_logits_width_matches_layout(space: Discrete | MultiDiscrete | Box) -> None:
    assert space.logits_width == {Discrete: 4, MultiDiscrete: 6, Box: 4}[type(space)]


def test_valid_rows() -> None:
    inf, nan = np.inf, np.nan
    categorical = Categorical((2, 2))
    logits = np.array(
        [[0, 1, 2, 3], [-inf, 1, 2, -inf], [nan, 1, 2, 3], [0, inf, 1, 1], [-inf, -inf, 0, 0]]
    )
    assert categorical.valid_rows(logits).tolist() == [True, True, False, False, False]
    gaussian = DiagGaussian(1)
    assert gaussian.valid_rows(np.array([[0.0, 0.0], [-inf, 0.0]])).tolist() == [True, False]
