"""The prefill worker: computes prompts' KV and writes it into the blocks decode workers reserved."""
