"""``python -m vfiopy.bench``."""

from vfiopy.bench._cli import main

raise SystemExit(main())
