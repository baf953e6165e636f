"""The decode worker: reserves blocks, receives KV, and decodes in its continuous batch."""
