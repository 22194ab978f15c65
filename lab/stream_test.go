package lab

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// testStream is a podStream (long-lived, checked TCP between two pods)
// that a test starts, checks between its steps and reports at the end.
type testStream struct{ *podStream }

func startStream(t *testing.T, src, dst *podLayout, port uint16, marker []byte) testStream {
	t.Helper()
	s, err := startPodStream(context.Background(), src, dst, port, marker)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.stop() })
	return testStream{s}
}

// check fails t when the stream broke, and otherwise waits for it to echo
// more: it must be alive, not merely not dead yet.
func (s testStream) check(t *testing.T, when string) {
	t.Helper()
	if err := s.awaitEcho(context.Background(), podStreamTimeout); err != nil {
		t.Fatalf("TCP stream %s: %v", when, err)
	}
}

func (s testStream) err() error { return s.stats().Err }

// summary is the stream's figures for the log.
func (s testStream) summary() string {
	st := s.stats()
	return fmt.Sprintf("%s: %d KiB echoed, longest pause %s (ended at %s), error %v", s.name, st.Echoed>>10,
		st.MaxStall.Round(time.Millisecond), st.StallEnd.Format("15:04:05.000"), st.Err)
}

// inNS runs fn in the named network namespace (a socket made there stays
// there).
func inNS(t *testing.T, name string, fn func() error) {
	t.Helper()
	if err := inNetNS(name, fn); err != nil {
		t.Fatalf("in netns %s: %v", name, err)
	}
}
