//go:build linux

package bpf

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
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

// CgroupV2Root returns the mount point of the cgroup v2 (unified)
// hierarchy, read from /proc/self/mounts: /sys/fs/cgroup on a unified
// host, /sys/fs/cgroup/unified on a hybrid one.
func CgroupV2Root() (string, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	defer f.Close()
	root, err := cgroup2Mount(f)
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	return root, nil
}

// cgroup2Mount returns the first cgroup2 mount point listed in a
// /proc/<pid>/mounts file.
func cgroup2Mount(r io.Reader) (string, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && fields[2] == "cgroup2" {
			return unescapeMount(fields[1]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup2 filesystem is mounted")
}

// unescapeMount undoes the octal escapes (\040 for a space, ...) that
// /proc/self/mounts uses in paths.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// cgroupID returns the ID the kernel reports for a cgroup v2 directory (in
// link info, for example): its inode number on the cgroup2 filesystem.
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}
