"""Speculative decoding: a draft proposes, the target verifies, rejection sampling keeps it exact."""
