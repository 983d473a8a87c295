"""The method: bounded KV cache and its eviction policy, thought state and low-rank update, rollout, replay."""
