package cgroup2

import (
	"errors"
	"strings"
	"testing"
)

func TestFindMount(t *testing.T) {
	for _, tc := range []struct {
		name, mounts, want string
		err                error
	}{
		{"unified", `sysfs /sys sysfs rw,nosuid 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
`, "/sys/fs/cgroup", nil},
		{"hybrid: v1 controllers first, then the unified hierarchy", `tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
`, "/sys/fs/cgroup/unified", nil},
		{"the first of two", `cgroup2 /a cgroup2 rw 0 0
cgroup2 /b cgroup2 rw 0 0
`, "/a", nil},
		{"escaped path", `cgroup2 /sys/fs/cgroup/unified\040dir cgroup2 rw,relatime 0 0
`, "/sys/fs/cgroup/unified dir", nil},
		{"cgroup v1 only", `cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
`, "", ErrNotMounted},
		{"empty", "", "", ErrNotMounted},
		{"a cgroup2 device mounted as another type is not it", `cgroup2 /mnt/x tmpfs rw 0 0
`, "", ErrNotMounted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := FindMount(strings.NewReader(tc.mounts))
			if got != tc.want || !errors.Is(err, tc.err) {
				t.Fatalf("FindMount = %q, %v; want %q, %v", got, err, tc.want, tc.err)
			}
		})
	}
}

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/plain`:        "/plain",
		`/a\040b`:       "/a b",
		`/tab\011x`:     "/tab\tx",
		`/back\134sl`:   `/back\sl`,
		`/short\04`:     `/short\04`,
		`/not\999octal`: `/not\999octal`,
	} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}
