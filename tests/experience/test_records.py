"""Decision records built from a real distribution's arrays, as the server builds them."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from policy_server.experience.records import decision_records
from policy_server.policy.distribution import Categorical, DiagGaussian
from tests.experience.records import new_ids, simple


def test_multidiscrete_records_match_the_contract_and_their_distribution() -> None:
    distribution = Categorical((2, 3))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5))
    masks = np.ones((4, 5), dtype=bool)
    masks[1, 2] = False  # row 1 may not take the first action of the second component
    masked = distribution.masked(logits, masks)
    chosen = distribution.sample(masked, rng)
    exact = distribution.distribution(masked)
    records = decision_records(
        policy="p",
        version="v",
        worker="0",
        decision_ids=new_ids.take(4),
        episodes=[("e", 0), ("e", 1), (None, None), (None, None)],
        rows=rng.normal(size=(4, 3)).astype(np.float32),
        logits=masked,
        chosen=chosen,
        values=np.arange(4, dtype=np.float32),
        sampled=True,
        distribution=exact,
        masks=masks,
    )
    assert set(records[0]) == set(simple(0))
    assert records[1]["action_mask"] == [[1, 1], [0, 1, 1]]
    assert records[1]["distribution"]["probabilities"][1][0] == 0.0
    assert exact.probabilities is not None
    for record, row in zip(records, range(4), strict=True):
        a, b = record["actions"]
        expected = exact.probabilities[0][row, a] * exact.probabilities[1][row, b]
        assert record["probability"] == pytest.approx(expected)
        assert record["value"] == row
    orjson.loads(orjson.dumps(records))  # plain JSON types only


def test_gaussian_records_carry_mean_and_std() -> None:
    distribution = DiagGaussian(2)
    logits = np.array([[0.5, -0.5, 0.0, np.log(2.0)]])
    chosen = distribution.mode(logits)
    (record,) = decision_records(
        policy="p",
        version="v",
        worker="0",
        decision_ids=new_ids.take(1),
        episodes=[(None, None)],
        rows=np.zeros((1, 3), np.float32),
        logits=logits,
        chosen=chosen,
        values=None,
        sampled=False,
        distribution=distribution.distribution(logits),
        masks=None,
    )
    assert record["distribution"] == {"mean": [0.5, -0.5], "std": [1.0, 2.0]}
    assert record["actions"] == [0.5, -0.5] and record["action_mask"] is None
    assert record["value"] is None and not record["sampled"]
