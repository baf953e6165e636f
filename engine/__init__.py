"""The model-execution core both workers share: models, paged KV cache, scheduler, sampler."""
