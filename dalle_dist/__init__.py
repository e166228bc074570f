"""dalle_dist: distributed training of DALL-E-style text-to-image models (Ramesh et al. 2021)."""

__version__ = "0.1.0"
