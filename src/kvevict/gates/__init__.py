"""Trainable gate modules (Fast KVzip's sink-attention gates, Attention-Gate) and their checkpoints."""
