//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/trellis-mesh/trellis/internal/cgroup2"
)

// BPFFSPath is where Trellis expects (and, if needed, mounts) the BPF
// filesystem.
const BPFFSPath = "/sys/fs/bpf"

// DefaultPinRoot is the directory under which each agent scope pins its
// maps and links: DefaultPinRoot/<scope>.
const DefaultPinRoot = BPFFSPath + "/trellis"

// PinDir returns the pin directory of a scope, DefaultPinRoot/<scope>.
func PinDir(scope string) string { return filepath.Join(DefaultPinRoot, scope) }

// EnsureBPFFS mounts the BPF filesystem at /sys/fs/bpf unless a bpffs is
// already mounted there. The mount is left in place: pins under it must
// outlive the agent.
func EnsureBPFFS() error {
	mounted, err := isBPFFS(BPFFSPath)
	if err != nil {
		return err
	}
	if mounted {
		return nil
	}
	if err := os.MkdirAll(BPFFSPath, 0o755); err != nil {
		return fmt.Errorf("bpffs: create %s: %w", BPFFSPath, err)
	}
	if err := unix.Mount("bpffs", BPFFSPath, "bpf", 0, "mode=0700"); err != nil {
		// Another process may have mounted it meanwhile.
		if ok, _ := isBPFFS(BPFFSPath); ok {
			return nil
		}
		return fmt.Errorf("bpffs: mount at %s: %w (needs CAP_SYS_ADMIN)", BPFFSPath, err)
	}
	return nil
}

func isBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, fmt.Errorf("bpffs: statfs %s: %w", path, err)
	}
	return st.Type == unix.BPF_FS_MAGIC, nil
}

// ErrNoCgroupV2 is what CgroupV2Root returns (wrapped) when no cgroup2
// filesystem is mounted.
var ErrNoCgroupV2 = cgroup2.ErrNotMounted

// CgroupV2Root returns the mount point of the cgroup v2 (unified)
// hierarchy, read from /proc/self/mounts: /sys/fs/cgroup on a unified
// host, /sys/fs/cgroup/unified on a hybrid one. It is the machine's root
// cgroup, where an agent attaches unless told otherwise.
func CgroupV2Root() (string, error) {
	root, err := cgroup2.Mount()
	if err != nil {
		return "", fmt.Errorf("bpf: %w", err)
	}
	return root, nil
}

// cgroupID returns the ID the kernel reports for a cgroup v2 directory (in
// link info, for example): its inode number on the cgroup2 filesystem.
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}
