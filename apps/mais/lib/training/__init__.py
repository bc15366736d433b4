"""Training core: synthetic volumes, the interaction loop shared with inference, and the `fit` entry point."""
