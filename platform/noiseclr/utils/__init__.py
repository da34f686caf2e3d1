"""Small shared helpers (image grids, atomic writes)."""
