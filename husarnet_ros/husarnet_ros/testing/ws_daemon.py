"""The ROS-free daemon plus one test-only flag: ``--websetup-whitelist ADDR`` (repeatable).

Why: ``python -m husarnet_ros.daemon`` has no flag for ``EngineConfig.websetup_whitelist`` and the engine
replaces the persisted websetup whitelist with the configured one (empty = nobody may send), so without
this wrapper no dashboard could ever reach a daemon's websetup server in an end-to-end test. Everything
else is the real daemon: same flags, same control socket, same exit codes.

    python -m husarnet_ros.testing.ws_daemon --state-dir DIR --websetup-whitelist fc94:... [daemon flags]
"""

from __future__ import annotations

import argparse
import sys

from .. import daemon


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--websetup-whitelist", action="append", default=[])
    ns, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    original = daemon.config_from_args

    def config_from_args(args: argparse.Namespace):
        config = original(args)
        config.websetup_whitelist = list(ns.websetup_whitelist)
        return config

    daemon.config_from_args = config_from_args
    return daemon.main(rest)


if __name__ == "__main__":
    sys.exit(main())
