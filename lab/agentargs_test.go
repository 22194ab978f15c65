package lab

import (
	"slices"
	"strings"
	"testing"
)

// cgroupRootOf is the value of the last --cgroup-root in argv, "" if none.
func cgroupRootOf(argv []string) string {
	root := ""
	for i, a := range argv {
		if a == "--cgroup-root" && i+1 < len(argv) {
			root = argv[i+1]
		} else if v, ok := strings.CutPrefix(a, "--cgroup-root="); ok {
			root = v
		}
	}
	return root
}

// No lab agent runs without an explicit --cgroup-root: without datapath
// it says none, since the agent's default is the machine's root cgroup.
func TestAgentArgsCgroupRoot(t *testing.T) {
	lay := defaultLayout(t)
	l := &lab{opts: Options{Binary: "/usr/bin/trellis"}, lay: lay}
	for _, n := range lay.allNodes() {
		with := l.agentArgs(n, true)
		if got := cgroupRootOf(with); got != n.cgroup {
			t.Errorf("%s with datapath: --cgroup-root %q, want the node's cgroup %s", n.ref(), got, n.cgroup)
		}
		without := l.agentArgs(n, false)
		if got := cgroupRootOf(without); got != "none" {
			t.Errorf("%s without datapath: --cgroup-root %q, want none (argv %v)", n.ref(), got, without)
		}
		if !slices.Equal(withCgroupRoot(without), without) || !slices.Equal(withCgroupRoot(with), with) {
			t.Errorf("%s: withCgroupRoot changed an argv that names a cgroup root", n.ref())
		}
	}
}

// An agent argv recorded without --cgroup-root (by an older trellis) is
// restarted with --cgroup-root none; other daemons are left alone.
func TestWithCgroupRoot(t *testing.T) {
	for _, tc := range []struct {
		argv []string
		want string
	}{
		{[]string{"/bin/trellis", "agent", "--node-name", "n1"}, "none"},
		{[]string{"/bin/trellis", "agent", "--node-name", "n1", "--cgroup-root", "/sys/fs/cgroup/x"}, "/sys/fs/cgroup/x"},
		{[]string{"/bin/trellis", "agent", "--cgroup-root=/sys/fs/cgroup/y"}, "/sys/fs/cgroup/y"},
		{[]string{"/bin/trellis", "apiserver", "--cluster-name", "eu"}, ""},
		{[]string{"/bin/trellis", "lab", "echo-server", "agent"}, ""},
	} {
		orig := slices.Clone(tc.argv)
		got := withCgroupRoot(tc.argv)
		if root := cgroupRootOf(got); root != tc.want {
			t.Errorf("withCgroupRoot(%v) = %v: --cgroup-root %q, want %q", orig, got, root, tc.want)
		}
		if !slices.Equal(tc.argv, orig) {
			t.Errorf("withCgroupRoot changed its input: %v", tc.argv)
		}
	}
}
