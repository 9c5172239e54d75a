"""Beside the flow: `validate` (prove a cache complete and correct, or name each damage), `info`, `show` (a PCA
picture of a patch grid) and `bench` (how fast this machine extracts).
"""
