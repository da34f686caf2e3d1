"""Editing with discovered directions: the sampler, DDIM inversion, galleries."""
