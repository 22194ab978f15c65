package lab

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// crashGrace is how long after an unannounced crash requests may still
// fail: the node's agent probes its pods every 100 ms and takes one out
// after 3 failures, then the registry tells the other nodes.
const crashGrace = time.Second

// TestLabPodCrash kills echo servers with `lab pod crash` (kill -9, the
// registry not told) under a request loop from eu/client to eu's VIP,
// and checks that no request fails more than a second after the crash:
// one eu pod of two (the other serves alone), then both (with affinity
// local, us takes over); `lab pod start` brings them back.
func TestLabPodCrash(t *testing.T) {
	r, st, ctx := upLab(t, 5*time.Minute)
	euVIP := serviceURL(t, st, "eu")
	r.annotate(ctx, t, "trellis.io/affinity=local")
	r.awaitPods(ctx, t, "affinity local: both eu pods", []string{"eu/echo-n1", "eu/echo-n2"})

	t.Run("OnePod", func(t *testing.T) {
		t.Cleanup(func() { r.run(context.Background(), "pod", "start", "eu/echo-n2") })
		loop := r.startLoop(ctx, t, "eu/client", euVIP)
		loop.await(t, 1)
		crash := r.crash(ctx, t, loop, "eu/echo-n2")
		loop.awaitPast(t, crash.Add(3*time.Second))
		loop.halt()
		loop.checkAfter(t, "eu/client → "+euVIP+" after eu/echo-n2 crashed", crash, []string{"eu/echo-n1"})
		r.must(ctx, t, "pod", "start", "eu/echo-n2")
		r.awaitPods(ctx, t, "eu/echo-n2 back after pod start", []string{"eu/echo-n1", "eu/echo-n2"})
	})

	t.Run("BothPods", func(t *testing.T) {
		t.Cleanup(func() {
			r.run(context.Background(), "pod", "start", "eu/echo-n1")
			r.run(context.Background(), "pod", "start", "eu/echo-n2")
		})
		loop := r.startLoop(ctx, t, "eu/client", euVIP)
		loop.await(t, 1)
		r.crash(ctx, t, loop, "eu/echo-n1")
		crash := r.crash(ctx, t, loop, "eu/echo-n2")
		loop.awaitPast(t, crash.Add(3*time.Second))
		loop.halt()
		loop.checkAfter(t, "eu/client → "+euVIP+" after both eu pods crashed", crash, []string{"us/echo-n1", "us/echo-n2"})
		r.must(ctx, t, "pod", "start", "eu/echo-n1")
		r.must(ctx, t, "pod", "start", "eu/echo-n2")
		r.awaitClusters(ctx, t, "traffic back to eu after pod start", []string{"eu"})
	})
}

// crash runs `lab pod crash pod` and returns when it killed the pod's
// echo server (as the verb says, on this machine's clock).
func (r *labRun) crash(ctx context.Context, t testing.TB, loop *requestLoop, pod string) time.Time {
	t.Helper()
	begin := time.Now()
	loop.mark("crash of " + pod + " begins")
	out, err := r.run(ctx, "pod", "crash", pod)
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(out, " crashed at ")
	at, err := time.ParseInLocation(crashTimeLayout, strings.TrimSuffix(strings.Fields(rest + " ")[0], ":"), time.Local)
	if err != nil {
		t.Fatalf("lab pod crash %s said %q: no kill time: %v", pod, out, err)
	}
	y, m, d := begin.Date()
	at = time.Date(y, m, d, at.Hour(), at.Minute(), at.Second(), at.Nanosecond(), time.Local)
	if at.Before(begin.Add(-time.Second)) { // past midnight
		at = at.AddDate(0, 0, 1)
	}
	loop.mark(fmt.Sprintf("%s killed (%s after the verb began)", pod, at.Sub(begin).Round(time.Millisecond)))
	return at
}

// awaitPast waits until a batch that started after t has completed.
func (l *requestLoop) awaitPast(tb testing.TB, t time.Time) {
	tb.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		l.mu.Lock()
		n, err := len(l.batches), l.err
		var last time.Time
		if n > 0 {
			last = l.batches[n-1].start
		}
		l.mu.Unlock()
		if last.After(t) {
			return
		}
		if err != nil {
			tb.Fatalf("request loop: %v", err)
		}
		select {
		case <-l.notify:
		case <-l.done:
			tb.Fatalf("request loop ended early: %v", l.err)
		case <-time.After(time.Second):
		}
	}
	tb.Fatalf("request loop: no batch started after %s within a minute", t.Format(time.StampMilli))
}

// crashOutcome is what the loop saw after a crash.
type crashOutcome struct {
	failed, total int
	// lastFailure is how long after the crash the last failed request
	// started; 0 when none failed.
	lastFailure time.Duration
	// observed is how long after the crash the last request started.
	observed time.Duration
	// late are the failures more than crashGrace after the crash, and
	// wrong the pods that answered then although not in want.
	late  []string
	wrong map[string]int
}

func (l *requestLoop) outcome(crash time.Time, want []string) crashOutcome {
	l.mu.Lock()
	defer l.mu.Unlock()
	o := crashOutcome{wrong: map[string]int{}}
	for _, b := range l.batches {
		for _, p := range b.probes {
			if p.At.Before(crash) {
				continue
			}
			o.total++
			o.observed = max(o.observed, p.At.Sub(crash))
			late := p.At.Sub(crash) > crashGrace
			if !p.OK {
				o.failed++
				o.lastFailure = max(o.lastFailure, p.At.Sub(crash))
				if late {
					o.late = append(o.late, fmt.Sprintf("%s after the crash: %s", p.At.Sub(crash).Round(time.Millisecond), p.Error))
				}
				continue
			}
			if pod := p.From.Cluster + "/" + p.From.Pod; late && want != nil && !slices.Contains(want, pod) {
				o.wrong[pod]++
			}
		}
	}
	return o
}

// checkAfter fails t for a request that failed more than crashGrace
// after crash, or was answered then by a pod not in want.
func (l *requestLoop) checkAfter(t *testing.T, what string, crash time.Time, want []string) {
	t.Helper()
	o := l.outcome(crash, want)
	t.Logf("%s: %d requests in the %s after the crash, %d failed, the last %s after it",
		what, o.total, o.observed.Round(time.Millisecond), o.failed, o.lastFailure.Round(time.Millisecond))
	if o.observed < 2*crashGrace {
		t.Errorf("%s: the loop covered only %s after the crash", what, o.observed.Round(time.Millisecond))
	}
	l.mu.Lock()
	marks := strings.Join(l.marks, "\n  ")
	l.mu.Unlock()
	if len(o.late) > 0 {
		if len(o.late) > 20 {
			o.late = append(o.late[:20], fmt.Sprintf("… %d more", len(o.late)-20))
		}
		t.Errorf("%s: %d requests failed more than %s after the crash:\n  %s\nevents:\n  %s", what, len(o.late), crashGrace,
			strings.Join(o.late, "\n  "), marks)
	}
	if len(o.wrong) > 0 {
		t.Errorf("%s: answered more than %s after the crash by %v; want only %v", what, crashGrace, o.wrong, want)
	}
}
