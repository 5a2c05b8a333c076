"""Protocols: thin adapters from a wire format to the policy service and back."""
