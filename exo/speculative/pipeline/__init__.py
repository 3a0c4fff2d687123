"""Schedulers that drive drafting and verification for one request."""
