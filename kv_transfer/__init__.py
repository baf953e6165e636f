"""Moving a request's KV blocks from a prefill worker's pool into blocks a decode worker reserved."""
