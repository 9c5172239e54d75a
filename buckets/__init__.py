"""`import buckets` from a checkout: the aspect-ratio bucket tables a DiT dataloader shares with a dinofeat cache
(pure Python: no torch, no zarr). The code lives in `dinofeat.buckets`, so that a `buckets.py` of yours in the
working directory can never break `import dinofeat`; this name is the same objects, for code run from a checkout
that imports `buckets` directly. It is not installed (as cli.py is not): a top-level `buckets` in site-packages
would clash with anyone's own module or another distribution's package of that name. Installed, import
`dinofeat.buckets`."""

from dinofeat.buckets import *  # noqa: F403
from dinofeat.buckets import __all__  # noqa: F401
