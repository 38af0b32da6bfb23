"""Default locations beside a checkout, for the tools (``patchalign.tools.bench``, ``patchalign.tools.demo``).

Library code takes its paths as arguments; only the tools default to these, so a benchmark or the
demo finds the shared benchmark data (``<checkout>/../shared/data``) without a flag.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The benchmark data beside a checkout (see its README); read in place, never copied.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
