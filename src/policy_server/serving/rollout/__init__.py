"""Rollouts: a candidate version earns its traffic step by step, on evidence (`controller`),
by a rule (`rule`) over the rollouts' shared record (`ledger`)."""
