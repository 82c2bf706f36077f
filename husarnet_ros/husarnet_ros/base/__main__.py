"""``python -m husarnet_ros.base``: the same as the ``husarnet-base`` entry point."""

import sys

from .server import main

sys.exit(main())
