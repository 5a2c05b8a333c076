"""Triton's sequences as our episodes: the one place where `sequence_id`, `sequence_start`,
`sequence_end` and `reward` become the service's episode calls.

A sequence is an episode: its steps reach one version (sticky routing on the episode id),
the server counts its steps (`sequence_start` restarts the count), `sequence_end` ends it
(and closes it in the decision log), and `reward` is joined, in the decision log, to the
episode's previous decision. Whatever the service learns to keep per episode (a recurrent
policy's state) flows through the `Episode` built here.
"""

from __future__ import annotations

from policy_server.experience.log import DecisionLog
from policy_server.protocols.v2.parameters import Options
from policy_server.serving.service import Episode, PolicyService


class Sequences:
    def __init__(self, service: PolicyService, log: DecisionLog | None) -> None:
        self.service = service
        self.log = log

    def episode(self, options: Options) -> Episode | None:
        """The step's episode; its `reward` is joined by the service to the episode's
        previous decision (whichever worker answered it), except at `sequence_start`."""
        if options.episode_id is None:
            return None
        step = options.step if options.step is not None else 0 if options.sequence_start else None
        reward = None if options.sequence_start else options.reward
        return Episode(options.episode_id, step, reward)

    async def after(self, options: Options) -> None:
        """`sequence_end` ends the episode: its state is freed, and the log closes it."""
        episode_id = options.episode_id
        if episode_id is None or not options.sequence_end:
            return
        await self.service.end_episode(episode_id)
        if self.log is not None:
            await self.log.end_episode(episode_id, True, False)
