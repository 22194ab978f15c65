//go:build linux

package privtest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	Main(m, map[string]Helper{
		// whereami prints the inode of its network namespace and its cgroup.
		"whereami": func(_ []string, _ io.Reader, stdout io.Writer) int {
			var st unix.Stat_t
			if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
				return 1
			}
			cg, err := os.ReadFile("/proc/self/cgroup")
			if err != nil {
				return 1
			}
			for _, line := range strings.Split(string(cg), "\n") {
				if path, ok := strings.CutPrefix(line, "0::"); ok {
					fmt.Fprintf(stdout, "%d %s\n", st.Ino, path)
				}
			}
			return 0
		},
	})
}

// TestNetNSCgroupAndChild checks that a child starts inside both the
// namespace and the cgroup, and that cleanup removes both.
func TestNetNSCgroupAndChild(t *testing.T) {
	RequireRoot(t)
	var nsName, cgPath string
	t.Run("inside", func(t *testing.T) {
		ns, name := NewNetNS(t)
		nsName = name
		cgPath = NewCgroup(t)
		var nsStat unix.Stat_t
		if err := unix.Fstat(int(ns), &nsStat); err != nil {
			t.Fatal(err)
		}
		root, err := CgroupV2Root()
		if err != nil {
			t.Fatal(err)
		}

		cmd := HelperCommand("whereami")
		var out bytes.Buffer
		cmd.Stdout = &out
		if err := RunInNetNSAndCgroup(t, cmd, ns, cgPath); err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("%d %s\n", nsStat.Ino, strings.TrimPrefix(cgPath, root))
		if out.String() != want {
			t.Fatalf("child is at %q, want %q", out.String(), want)
		}

		// A long-running child left behind is killed at cleanup, so the
		// cgroup can go.
		sleeper := exec.Command("sleep", "60")
		if err := StartInNetNSAndCgroup(t, sleeper, ns, cgPath); err != nil {
			t.Fatal(err)
		}
	})
	if _, err := os.Stat(filepath.Join("/var/run/netns", nsName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("netns %s still there: %v", nsName, err)
	}
	if _, err := os.Stat(cgPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cgroup %s still there: %v", cgPath, err)
	}
}

func TestSkipIfNotSupported(t *testing.T) {
	for _, err := range []error{
		fmt.Errorf("load: %w", ebpf.ErrNotSupported),
		fmt.Errorf("geneve: %w", errors.ErrUnsupported),
	} {
		var sub *testing.T
		t.Run("skips", func(t *testing.T) {
			sub = t
			SkipIfNotSupported(t, err)
			t.Error("not skipped")
		})
		if !sub.Skipped() {
			t.Errorf("%v did not skip", err)
		}
	}
	SkipIfNotSupported(t, nil) // nil is fine
}

// TestNetNSWithPrefixAndHandle checks that the namespace carries the
// prefix, that a handle from NetlinkHandle works inside it and not in the
// test's own namespace, and that cleanup removes the namespace.
func TestNetNSWithPrefixAndHandle(t *testing.T) {
	RequireRoot(t)
	var nsName string
	t.Run("inside", func(t *testing.T) {
		ns, name := NewNetNSWithPrefix(t, "trellis-privtest")
		nsName = name
		if !strings.HasPrefix(name, "trellis-privtest-") {
			t.Errorf("namespace %q lacks the prefix", name)
		}
		if _, err := os.Stat(filepath.Join("/var/run/netns", name)); err != nil {
			t.Fatalf("namespace %s not visible to ip netns: %v", name, err)
		}
		h := NetlinkHandle(t, ns)
		lo, err := h.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		if lo.Attrs().Flags&net.FlagUp == 0 {
			t.Error("loopback of the new namespace is down")
		}
		veth := UniqueShortName("pt")
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: veth}, PeerName: veth + "p"}); err != nil {
			t.Fatalf("add veth %s through the handle: %v", veth, err)
		}
		if _, err := h.LinkByName(veth); err != nil {
			t.Errorf("veth %s not in the namespace: %v", veth, err)
		}
		if _, err := netlink.LinkByName(veth); err == nil {
			t.Errorf("veth %s showed up in the test's own namespace", veth)
		}
	})
	if _, err := os.Stat(filepath.Join("/var/run/netns", nsName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("netns %s still there: %v", nsName, err)
	}
}

func TestUniqueShortName(t *testing.T) {
	a, b := UniqueShortName("t"), UniqueShortName("t")
	for _, n := range []string{a, b} {
		if !regexp.MustCompile(`^t[0-9a-f]{6}$`).MatchString(n) {
			t.Errorf("UniqueShortName(\"t\") = %q, want t and 6 hex digits", n)
		}
	}
	if a == b {
		t.Errorf("two calls gave the same name %q", a)
	}
}
