"""Close the loop: log decisions, join rewards, export experience, evaluate offline.

- `log`: `DecisionLog`, the writer the server appends decisions, rewards and episode ends to.
- `records`: the records' shapes, `decision_records()` for a batch.
- `export`: `export_experience()` to RLlib rows, Parquet, Minari or DSJSON.
- `evaluation`: `evaluate()`, off-policy estimates of a `candidate.Candidate`.
- `cli`: the `export-experience` and `evaluate` commands.

Only the log and the records are imported here; the exports import their heavy dependencies
(pyarrow, minari) inside the functions that need them.
"""

from policy_server.experience.log import DecisionLog, DecisionLogClosed
from policy_server.experience.records import decision_records

__all__ = ["DecisionLog", "DecisionLogClosed", "decision_records"]
