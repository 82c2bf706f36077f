"""Fixtures for the rclpy tier: an isolated ROS context, a spinning executor and a service helper.

Every test gets its own rclpy Context on a random ROS_DOMAIN_ID with discovery limited to
this host, so concurrent runs (other engineers, CI) never see each other's nodes.
Tests skip with a reason when rclpy or the built husarnet_msgs cannot be used, and fail with it in CI
(``CI=true``), where ``make test`` builds both: a broken build must not turn the tier into skips.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from husarnet_ros.testing.ci import skip_or_fail
from husarnet_ros.testing.ports import free_udp_ports

BUILD_HINT = "build with scripts/build_ros.sh and `source scripts/ros_env.sh` (make test does both)"


def _ros_skip_reason() -> str | None:
    try:
        import rclpy  # noqa: F401
    except ImportError as exc:
        return f"rclpy not importable ({exc}); {BUILD_HINT}"
    try:
        import husarnet_msgs.msg  # noqa: F401
    except ImportError as exc:
        return f"husarnet_msgs not importable ({exc}); {BUILD_HINT}"
    # The type support libraries are loaded by name at run time: they must be on LD_LIBRARY_PATH.
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    if not any(glob.glob(os.path.join(d, "libhusarnet_msgs__rosidl_typesupport_c.so")) for d in dirs):
        return f"husarnet_msgs libraries not on LD_LIBRARY_PATH; {BUILD_HINT}"
    return None


SKIP_REASON = _ros_skip_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.ros)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (fail in CI) every test of this tier when the ROS environment is not usable."""
    if SKIP_REASON:
        skip_or_fail(SKIP_REASON)


@pytest.fixture
def ros_context(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh rclpy Context on a random domain, discovery on this host only, no profile inherited."""
    import rclpy

    for var in (
        "FASTDDS_DEFAULT_PROFILES_FILE",
        "FASTRTPS_DEFAULT_PROFILES_FILE",
        "CYCLONEDDS_URI",
        "ROS_STATIC_PEERS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=random.randint(100, 200))
    try:
        yield ctx
    finally:
        ctx.try_shutdown()


class Spinner:
    """A multi-threaded executor spinning in a background thread, plus blocking helpers.

    The thread spins with ``spin_once`` and its own stop flag, and :meth:`shutdown` joins it before
    it shuts the executor down.  ``Executor.shutdown`` (rclpy, Kilted) does not wait for a running
    ``spin()``: it empties the node set and destroys the executor's guard condition at once, and a
    ``spin()`` that had just passed its shutdown check then waits on an empty wait set and dies with
    "wait set is empty" (a rare PytestUnhandledThreadExceptionWarning at teardown).  The node's own
    ``main`` spins the same way, so the product never meets that race.
    """

    def __init__(self, context: Any) -> None:
        from rclpy.executors import MultiThreadedExecutor

        self.context = context
        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="test-spin", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        with contextlib.suppress(ExternalShutdownException):
            while not self._stop.is_set() and self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)

    def add(self, node: Any) -> Any:
        self.executor.add_node(node)
        return node

    def call(
        self, node: Any, srv_type: Any, name: str, wait: float = 10.0, resend: float | None = None, **fields: Any
    ) -> Any:
        """Call service ``name`` with a request built from ``fields``; fail the test after ``wait`` s.

        Requests that are harmless to repeat pass ``resend`` (see ``husarnet_ros.service_call``):
        a service that never answers still fails the test.
        """
        from husarnet_ros.service_call import call_resending

        def spin_until(pred: Any, timeout: float) -> Any:  # the executor spins in its own thread
            end = time.monotonic() + timeout
            while not (value := pred()) and time.monotonic() < end:
                time.sleep(0.01)
            return value

        client = node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=wait), f"service {name} not available"
            answer = call_resending(client, srv_type.Request(**fields), spin_until, wait, resend)
            assert answer is not None, f"service {name} did not answer within {wait} s"
            return answer[0]
        finally:
            node.destroy_client(client)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        assert not self._thread.is_alive(), "the spin thread did not stop within 5 s (a callback hangs?)"
        self.executor.shutdown(timeout_sec=2.0)


@pytest.fixture
def spinner(ros_context: Any) -> Iterator[Spinner]:
    s = Spinner(ros_context)
    try:
        yield s
    finally:
        s.shutdown()


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def unique_ifname() -> str:
    """'hnt' + pid + a random suffix: at most 15 characters, unique among concurrent runs."""
    return f"hnt{os.getpid() % 100000}{random.randint(0, 999):03d}"[:15]


@pytest.fixture
def waiter() -> Callable[..., Any]:
    """``waiter(pred, timeout, what)``: poll until ``pred()`` is truthy (test helpers cannot be imported)."""
    return wait_for


@pytest.fixture
def node_pair(ros_context: Any, spinner: Spinner, tmp_path: Path, unique_ifname: str) -> Iterator[Callable[..., Any]]:
    """``node_pair(**a_params) -> (a, b, a_id, b_id)``: two unconfigured nodes in this process.

    Each lists the other on its whitelist (b as 'nodeb' on a's, a as 'nodea' on b's) and as a static
    peer on 127.0.0.1; a is /husarnet (``a_params`` override its parameters), b is /b/husarnet.  Both
    spin in ``spinner`` and are released (engine stopped, device removed) when the test ends.
    """
    from rclpy.parameter import Parameter

    from husarnet_ros.core.identity import Identity
    from husarnet_ros.node import HusarnetNode

    made: list[Any] = []

    def make(**a_params: Any) -> tuple[Any, Any, Any, Any]:
        ids = {"a": Identity.generate(), "b": Identity.generate()}
        ports = dict(zip(ids, free_udp_ports(len(ids)), strict=True))
        for name, ident in ids.items():
            (tmp_path / name).mkdir(mode=0o700)
            ident.save(tmp_path / name / "id")

        def node(name: str, other: str, namespace: str, **extra: Any) -> Any:
            peer = ids[other].address_str
            values = {
                "state_dir": str(tmp_path / name),
                "hosts_file": "",
                "lan_discovery": False,
                "interface_name": unique_ifname[:13] + name,
                "udp_port": ports[name],
                "whitelist": [f"{peer} node{other}"],
                "peers": [f"{peer}@127.0.0.1:{ports[other]}"],
                **extra,
            }
            n = HusarnetNode(
                context=ros_context,
                namespace=namespace,
                parameter_overrides=[Parameter(k, value=v) for k, v in values.items()],
            )
            made.append(n)
            return spinner.add(n)

        return node("a", "b", "", **a_params), node("b", "a", "/b"), ids["a"], ids["b"]

    try:
        yield make
    finally:
        for n in made:
            n._release()
            n.destroy_node()
