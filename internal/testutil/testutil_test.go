package testutil

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"
)

// recorder is a testing.TB whose Fatalf records the message and ends the
// goroutine, as the real one does.
type recorder struct {
	testing.TB
	fatal string
}

func (r *recorder) Helper() {}

func (r *recorder) Fatalf(format string, args ...any) {
	r.fatal = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// run calls fn with a recorder on a goroutine of its own (Fatalf ends it)
// and returns the fatal message, "" when fn returned normally.
func run(t *testing.T, fn func(testing.TB)) string {
	r := &recorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(r)
	}()
	<-done
	return r.fatal
}

func TestEventually(t *testing.T) {
	calls := 0
	if msg := run(t, func(tb testing.TB) {
		Eventually(tb, time.Minute, "the third call", func() bool { calls++; return calls == 3 })
	}); msg != "" || calls != 3 {
		t.Errorf("Eventually: %d calls, fatal %q; want 3 calls and no failure", calls, msg)
	}
	if msg := run(t, func(tb testing.TB) {
		Eventually(tb, 0, "never", func() bool { return false })
	}); !strings.Contains(msg, "waiting for never") {
		t.Errorf("Eventually on a condition that never holds: fatal %q", msg)
	}
}

func TestEventuallyNoError(t *testing.T) {
	calls := 0
	if msg := run(t, func(tb testing.TB) {
		EventuallyNoError(tb, time.Minute, "the third call", func() error {
			if calls++; calls < 3 {
				return errors.New("not yet")
			}
			return nil
		})
	}); msg != "" || calls != 3 {
		t.Errorf("EventuallyNoError: %d calls, fatal %q; want 3 calls and no failure", calls, msg)
	}
	calls = 0
	msg := run(t, func(tb testing.TB) {
		EventuallyNoError(tb, 0, "never", func() error { calls++; return fmt.Errorf("still wrong after %d calls", calls) })
	})
	if !strings.Contains(msg, "waiting for never: still wrong after 1 calls") {
		t.Errorf("EventuallyNoError on a check that never passes: fatal %q; want the last error", msg)
	}
}

func TestConsistently(t *testing.T) {
	calls := 0
	if msg := run(t, func(tb testing.TB) {
		Consistently(tb, 3*pollInterval, "quiet", func() bool { calls++; return true })
	}); msg != "" || calls < 2 {
		t.Errorf("Consistently on a property that holds: %d calls, fatal %q; want at least 2 calls and no failure", calls, msg)
	}
	calls = 0
	msg := run(t, func(tb testing.TB) {
		Consistently(tb, time.Minute, "quiet", func() bool { calls++; return calls < 3 })
	})
	if !strings.Contains(msg, "quiet stopped holding") || calls != 3 {
		t.Errorf("Consistently on a property that breaks at the third look: %d calls, fatal %q", calls, msg)
	}
}
