"""NoiseCLR discovery: starting directions, the contrastive loss, the micro-step, the training loop."""
