"""``python -m mock_vfio list|dump SPEC``: the simulator's topologies."""

from __future__ import annotations

import sys

from mock_vfio.topology_dump import main

sys.exit(main())
