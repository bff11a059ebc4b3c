"""Peer methods that prune inside the LLM (LLM rules)."""
