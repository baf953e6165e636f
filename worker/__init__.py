"""What the prefill and decode workers share: config, runtime (engine + transport), common routes."""
