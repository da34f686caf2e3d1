"""Image worlds (domains) and their oracles."""
