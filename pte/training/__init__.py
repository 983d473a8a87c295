"""Training: the GRPO/SFT objectives, tasks, rewards and data, the four methods, and the Lightning glue around them."""
