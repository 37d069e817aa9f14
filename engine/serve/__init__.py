"""The OpenAI-compatible HTTP server: every response carries a receipt; /v1/audit opens it."""
