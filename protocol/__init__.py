"""What the router and the workers must agree on, free of torch: block hashes, KV events, tokenizer."""
