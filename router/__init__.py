"""The torch-free front door: OpenAI-compatible API, cache- and load-aware routing, worker health."""
