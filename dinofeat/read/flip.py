"""The per-sample, per-epoch flip coin: pure, so the DiT side's own augmentation can toss the same coin.

`flip_coin(seed, epoch, key)` depends only on its arguments (blake2b, not Python's salted `hash`), so every process,
DataLoader worker and machine gets the same answer: the dataset that reads DINO features and the dataset that reads
VAE latents agree on which images are mirrored this epoch without talking to each other.
"""

from __future__ import annotations

import hashlib


def flip_coin(seed: int, epoch: int, key: str) -> bool:
    """True: this epoch uses the mirrored image for `key` (mirror its latent with `latent.flip(-1)`)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return bool(digest[0] & 1)
