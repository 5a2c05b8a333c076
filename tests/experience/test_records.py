"""Decision records built from a real distribution's arrays, as the server builds them."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from policy_server.experience.records import PendingDecisions, decision_records, pending_records
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


def _pending(
    index: int, distribution: Categorical | DiagGaussian, masked: bool = False, version: str = "v"
) -> PendingDecisions:
    """One answered call of `index + 1` rows, as the request path hands it to the log."""
    rng = np.random.default_rng(index)
    width = 5 if isinstance(distribution, Categorical) else 4
    logits: npt.NDArray[np.floating[Any]] = rng.normal(size=(index + 1, width))
    masks = None
    if masked:
        masks = np.ones(logits.shape, dtype=bool)
        masks[0, 0] = False
        assert isinstance(distribution, Categorical)
        logits = distribution.masked(logits, masks)
    return PendingDecisions(
        time=1000.0 + index,
        policy="p",
        version=version,
        worker="0",
        decision_ids=new_ids.take(index + 1),
        episodes=[(f"e{index}", row) for row in range(index + 1)],
        rows=rng.normal(size=(index + 1, 3)).astype(np.float32),
        logits=logits,
        chosen=distribution.sample(logits, rng),
        values=rng.normal(size=index + 1).astype(np.float32),
        sampled=True,
        action_distribution=distribution,
        masks=masks,
        allocation=0.5,
    )


@pytest.mark.parametrize("distribution", [Categorical((2, 3)), DiagGaussian(2)])
def test_calls_built_together_give_the_records_built_one_by_one(
    distribution: Categorical | DiagGaussian,
) -> None:
    """The writer builds consecutive calls of one version as one batch; each call's records
    (its time included) are the ones it would have alone. A masked call, and another
    version's, are built apart, in their place."""
    calls = [_pending(i, distribution) for i in range(4)]
    calls.insert(2, _pending(4, distribution, masked=isinstance(distribution, Categorical)))
    calls.append(_pending(5, distribution, version="w"))
    together = pending_records(calls)
    alone = [call.records() for call in calls]
    assert together == alone
    assert [len(records) for records in together] == [1, 2, 5, 3, 4, 6]
    assert {record["time"] for record in together[1]} == {1001.0}
