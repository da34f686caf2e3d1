"""NoiseCLR discovery: direction banks, the contrastive loss, batched noise evaluation, the trainer."""
