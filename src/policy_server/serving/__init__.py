"""Serving: the registry of policy versions, their lifecycle, the policy service, batching,
episodes and the observers of answered predictions. No wire format here."""
