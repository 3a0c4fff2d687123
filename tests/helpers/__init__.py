"""Shared test helpers: tiny models, a live API server, decoding references, parsers."""
