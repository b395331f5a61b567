"""gdnsq: GDNSQ quantization-aware fine-tuning down to W1A1, and deployment of the result."""
__version__ = "0.1.0"
