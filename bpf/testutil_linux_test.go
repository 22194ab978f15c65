//go:build linux

package bpf

import (
	"encoding/binary"
	"io"

	"golang.org/x/sys/unix"
)

func ebpfBinaryWrite(w io.Writer, v any) error { return binary.Write(w, binary.NativeEndian, v) }

func isCgroup2(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, err
	}
	return st.Type == unix.CGROUP2_SUPER_MAGIC, nil
}
