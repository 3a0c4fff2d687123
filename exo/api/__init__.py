"""ChatGPT-compatible HTTP API (Starlette on uvicorn, msgspec schemas)."""
