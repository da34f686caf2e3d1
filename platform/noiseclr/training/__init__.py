"""Distributed training: Ray Train workers running the NoiseCLR step in DeepSpeed."""
