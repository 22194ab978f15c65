// Package cgroup2 finds where the cgroup v2 (unified) hierarchy is
// mounted: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a
// hybrid one. That directory is the machine's root cgroup.
//
// It stands apart from bpf, whose users it serves, because the test
// helpers in internal/privtest need it too and bpf's own tests import
// those helpers.
package cgroup2

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// ErrNotMounted is what Mount and FindMount return when the mount table
// lists no cgroup2 filesystem.
var ErrNotMounted = errors.New("no cgroup2 filesystem is mounted")

// MountsFile is the mount table Mount reads.
const MountsFile = "/proc/self/mounts"

// Mount returns the first cgroup2 mount point in MountsFile.
func Mount() (string, error) {
	f, err := os.Open(MountsFile)
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	defer f.Close()
	path, err := FindMount(f)
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount in %s: %w", MountsFile, err)
	}
	return path, nil
}

// FindMount returns the first cgroup2 mount point listed in a mount table
// in the format of /proc/<pid>/mounts, or ErrNotMounted.
func FindMount(r io.Reader) (string, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && fields[2] == "cgroup2" {
			return unescape(fields[1]), nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", ErrNotMounted
}

// unescape undoes the octal escapes (\040 for a space, ...) that the
// mount table uses in paths.
func unescape(s string) string {
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
