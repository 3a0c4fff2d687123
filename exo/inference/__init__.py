"""Inference engines behind one interface, plus where their weights come from."""
