"""Training paths in eager PyTorch (SDPA attention, autograd): ReVersion relation inversion, PatchDPO."""
