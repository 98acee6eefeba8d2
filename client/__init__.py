"""radfed's Flower ClientApp (thin wiring over the installed radfed package)."""
