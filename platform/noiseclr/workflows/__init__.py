"""Orchestration above the maths: the discovery job and the comparison, in one place each."""
