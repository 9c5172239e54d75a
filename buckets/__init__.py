"""`import buckets`: the aspect-ratio bucket tables a DiT dataloader shares with a dinofeat cache (pure Python: no
torch, no zarr). The code lives in `dinofeat.buckets`, so that a `buckets.py` of yours in the working directory can
never break `import dinofeat`; this name is the same objects, for code that imports `buckets` directly."""

from dinofeat.buckets import *  # noqa: F403
from dinofeat.buckets import __all__  # noqa: F401
