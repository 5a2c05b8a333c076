"""Runtimes run a policy's network: observations in, logits and value estimates out."""
