"""Torch-free core shared by training and serving: the α-Rényi math and the manifest."""
