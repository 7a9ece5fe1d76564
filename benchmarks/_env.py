"""Environment every benchmark sets before torch, transformers or ray are imported (``import _env`` first): offline
hub, quiet logs, a private Ray without token auth or usage stats, the Ray Data footer setting of docs/ray-guide.md; and
the repository on ``sys.path`` so ``metakd_ray`` imports from this checkout."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
