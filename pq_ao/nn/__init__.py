"""Modules that replace parts of an HF decoder: attention with prefix and KV quantizers, online-Hadamard linears."""
