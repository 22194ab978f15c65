#!/usr/bin/env bash
# Runs a command as root: directly when already root, through sudo when
# sudo exists, otherwise it says plainly what to do.
set -euo pipefail
if [ "$(id -u)" -eq 0 ]; then
	exec "$@"
fi
if command -v sudo >/dev/null 2>&1; then
	echo "This needs root (network namespaces, eBPF, cgroups); re-running with sudo." >&2
	exec sudo -E env "PATH=$PATH" "$@"
fi
echo "This needs root (it creates network namespaces, cgroups and eBPF programs)," >&2
echo "and sudo is not installed. Run it as root, for example: su -c 'make demo'" >&2
exit 1
