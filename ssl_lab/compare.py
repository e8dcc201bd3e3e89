"""`python -m ssl_lab.compare <dir> [--out DIR]`: one comparison table over every run under <dir>, and the mean ± std
over the seeds of each configuration."""
from __future__ import annotations

from ssl_lab.evaluation.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
