"""radfed's Flower ServerApp (thin wiring over the installed radfed package)."""
