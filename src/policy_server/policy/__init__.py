"""A policy: its schema, action spaces, exact action distributions and observation rows."""
