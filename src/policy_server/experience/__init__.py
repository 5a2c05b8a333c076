"""Close the loop (issue #16): log decisions, join rewards, export experience, evaluate offline.

Only the decision log is imported here; export and evaluation import their heavy
dependencies (pyarrow, minari, vowpalwabbit) inside the functions that need them.
"""

from policy_server.experience.log import DecisionLog, DecisionLogClosed
from policy_server.experience.records import new_decision_id

__all__ = ["DecisionLog", "DecisionLogClosed", "new_decision_id"]
