"""Where the repository and its cache are: REPO (the repository root) and CACHE (REPO/.cache: the default model
converted once, downloaded texts)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent
CACHE = REPO / ".cache"
