"""Peer methods that prune after the vision encoder (stage-1 rules)."""
