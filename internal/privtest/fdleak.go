package privtest

import (
	"fmt"
	"net"
	"os"
	"slices"
	"testing"
)

// MainCheckingFDs runs the tests and exits, failing the run when they
// leaked file descriptors: a netlink handle, a socket or a namespace
// handle left open would keep a test's namespace alive after the test.
// what names the tests in the report. Call it from TestMain.
func MainCheckingFDs(m *testing.M, what string) {
	// Warm up what the runtime opens once and keeps (the netpoller).
	if c, err := net.ListenPacket("udp", "127.0.0.1:0"); err == nil {
		c.Close()
	}
	before := openFDs()
	code := m.Run()
	if code == 0 {
		if leaked := slices.DeleteFunc(openFDs(), func(fd string) bool { return slices.Contains(before, fd) }); len(leaked) > 0 {
			fmt.Fprintf(os.Stderr, "%s leaked %d file descriptors:\n", what, len(leaked))
			for _, fd := range leaked {
				target, _ := os.Readlink("/proc/self/fd/" + fd)
				fmt.Fprintf(os.Stderr, "  fd %s → %s\n", fd, target)
			}
			code = 1
		}
	}
	os.Exit(code)
}

func openFDs() []string {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}
