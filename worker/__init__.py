"""What the prefill and decode workers share: config, the engine core and its process, the frontend process
and its routes, Ray actor groups for parallel workers."""
