"""Triton's sequences as our episodes: the one place where `sequence_id`, `sequence_start`,
`sequence_end` and `reward` become the service's episode calls.

A sequence is an episode: its steps reach one version (sticky routing on the episode id),
the server counts its steps (`sequence_start` restarts the count), `sequence_end` ends it
(and closes it in the decision log), and `reward` is joined, in the decision log, to the
episode's previous decision. Whatever the service learns to keep per episode (a recurrent
policy's state) flows through the `Episode` built here.
"""

from __future__ import annotations

from collections import OrderedDict

from policy_server.experience.log import DecisionLog
from policy_server.protocols.v2.parameters import Options
from policy_server.serving.service import Episode, PolicyService, Prediction


class Sequences:
    def __init__(
        self, service: PolicyService, log: DecisionLog | None, capacity: int = 100_000
    ) -> None:
        self.service = service
        self.log = log
        # The last decision of each episode this process answered, for the next `reward`.
        self._last: OrderedDict[str, str] = OrderedDict()
        self._capacity = capacity

    def episode(self, options: Options) -> Episode | None:
        if options.episode_id is None:
            return None
        step = options.step if options.step is not None else 0 if options.sequence_start else None
        return Episode(options.episode_id, step)

    async def before(self, options: Options) -> None:
        """The reward that followed the episode's previous decision, before this step."""
        episode_id = options.episode_id
        if episode_id is None or options.sequence_start:
            self._last.pop(episode_id or "", None)
            return
        previous = self._last.get(episode_id)
        if options.reward is not None and previous is not None and self.log is not None:
            await self.log.add_rewards([{"decision_id": previous, "reward": options.reward}])

    async def after(self, options: Options, prediction: Prediction) -> None:
        episode_id = options.episode_id
        if episode_id is None:
            return
        if options.sequence_end:
            self._last.pop(episode_id, None)
            self.service.end_episode(episode_id)
            if self.log is not None:
                await self.log.end_episode(episode_id, True, False)
            return
        self._last[episode_id] = prediction["decision_id"]
        self._last.move_to_end(episode_id)
        if len(self._last) > self._capacity:
            self._last.popitem(last=False)
