//go:build linux

package cgroup2

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// Mount finds this machine's cgroup2 hierarchy, wherever it is mounted.
func TestMountIsCgroup2(t *testing.T) {
	path, err := Mount()
	if errors.Is(err, ErrNotMounted) {
		t.Skip("this machine has no cgroup2 mount:", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatalf("statfs %s: %v", path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Fatalf("Mount() = %s, which is not a cgroup2 filesystem (type %#x)", path, st.Type)
	}
}
