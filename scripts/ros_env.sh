# Environment for using the colcon build of this repository with the venv's ROS 2 wheels.
# Source it (bash or POSIX sh), do not run it:
#
#   . scripts/ros_env.sh           # after scripts/build_ros.sh
#   VENV=/other/venv . scripts/ros_env.sh
#
# It plays the role of a ROS install's setup.bash: the venv is the underlay (the wheels put their
# ament index and libraries under the venv prefix) and <repo>/install is the overlay with
# husarnet_msgs (and husarnet_ros once it has package.xml/setup.py). Sourcing twice adds nothing twice.
#
# Why LD_LIBRARY_PATH matters: rosidl loads a message package's type support library
# (libhusarnet_msgs__rosidl_typesupport_fastrtps_c.so) by name at run time, which only finds
# libraries on LD_LIBRARY_PATH; RPATHs do not help there.

if [ -n "${BASH_SOURCE:-}" ]; then
    _hn_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
elif [ -n "${ZSH_VERSION:-}" ]; then
    # shellcheck disable=SC2296
    _hn_repo="$(cd "$(dirname "${(%):-%x}")/.." && pwd)"
else
    # POSIX sh has no way to know the sourced file's path: use HUSARNET_REPO or the working dir.
    _hn_repo="${HUSARNET_REPO:-$(pwd)}"
fi
_hn_venv="${VENV:-$_hn_repo/.venv}"
_hn_install="$_hn_repo/install"

# _hn_prepend VAR DIR: put DIR in front of the colon list VAR unless it is already in it.
_hn_prepend() {
    eval "_hn_cur=\${$1:-}"
    case ":$_hn_cur:" in
    *":$2:"*) ;;
    *) eval "export $1=\"$2\${_hn_cur:+:\$_hn_cur}\"" ;;
    esac
}

_hn_site=""
for _hn_d in "$_hn_install"/lib/python3*/site-packages; do
    [ -d "$_hn_d" ] && _hn_site="$_hn_d"
done
if [ ! -d "$_hn_install/lib" ] || [ -z "$_hn_site" ]; then
    echo "ros_env.sh: $_hn_install has no build; run scripts/build_ros.sh first" >&2
fi

# Underlay first (prepended first, ends up last), then the overlay in front of it.
_hn_prepend AMENT_PREFIX_PATH "$_hn_venv"
_hn_prepend CMAKE_PREFIX_PATH "$_hn_venv"
_hn_prepend LD_LIBRARY_PATH "$_hn_venv/lib"
_hn_prepend PATH "$_hn_venv/bin"
_hn_prepend AMENT_PREFIX_PATH "$_hn_install"
_hn_prepend CMAKE_PREFIX_PATH "$_hn_install"
_hn_prepend LD_LIBRARY_PATH "$_hn_install/lib"
_hn_prepend PATH "$_hn_install/bin"
[ -n "$_hn_site" ] && _hn_prepend PYTHONPATH "$_hn_site"
# The source tree, so `python -m husarnet_ros.daemon` etc. work without installing.
_hn_prepend PYTHONPATH "$_hn_repo/husarnet_ros"

# The only RMW in the wheels; DESIGN.md section 6 relies on Fast DDS profiles.
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export ROS_VERSION=2
export ROS_PYTHON_VERSION=3
export ROS_DISTRO="${ROS_DISTRO:-kilted}"
# The wheels' bootstrapper re-execs python once to extend LD_LIBRARY_PATH with its own libs; that
# keeps working because it only adds to what we exported here.

unset _hn_repo _hn_venv _hn_install _hn_site _hn_d _hn_cur
unset -f _hn_prepend
