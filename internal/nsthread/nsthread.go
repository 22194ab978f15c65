// Package nsthread runs code on an OS thread inside another network
// namespace. Sockets opened there stay in that namespace for life, and
// processes started there are born in it. Used by the lab and by
// privileged tests.
package nsthread

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// errTainted means a thread could not return to its original namespace;
// it stays locked so the runtime discards it with its goroutine rather
// than reuse a thread in the wrong namespace.
type errTainted struct{ err error }

func (e errTainted) Error() string { return "restore thread netns: " + e.err.Error() }

// Locked runs fn on a locked OS thread of its own. The thread is unlocked
// afterwards unless fn's error says it could not restore the namespace.
func Locked(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		err := fn()
		var tainted errTainted
		if !errors.As(err, &tainted) {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// Do runs fn on a thread that has entered ns and returns it to its
// namespace afterwards. Goroutines fn starts do not run in ns.
func Do(ns netns.NsHandle, fn func() error) error {
	return Locked(func() error {
		orig, err := netns.Get()
		if err != nil {
			return fmt.Errorf("get current netns: %w", err)
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("enter netns: %w", err)
		}
		fnErr := fn()
		if err := netns.Set(orig); err != nil {
			return errors.Join(fnErr, errTainted{err})
		}
		return fnErr
	})
}

// DoPath is Do for the namespace bound at path (/var/run/netns/<name>).
func DoPath(path string, fn func() error) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	return Do(ns, fn)
}

// CreateNamed creates a namespace bound at /var/run/netns/<name>, as `ip
// netns add` does, without moving the caller.
func CreateNamed(name string) error {
	return Locked(func() error {
		orig, err := netns.Get()
		if err != nil {
			return fmt.Errorf("get current netns: %w", err)
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name)
		if err == nil {
			ns.Close()
		}
		if setErr := netns.Set(orig); setErr != nil {
			return errors.Join(err, errTainted{setErr})
		}
		return err
	})
}
