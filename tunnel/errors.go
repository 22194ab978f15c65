package tunnel

import (
	"errors"
	"fmt"
)

// ErrNotSupported matches every error that says the running kernel lacks a
// feature a Config asks for. Test with errors.Is; errors.As with
// *UnsupportedFeatureError gives the details.
var ErrNotSupported = errors.New("not supported by this kernel")

// ErrNotOnLink matches the error native routing returns for a remote node
// whose IP is not on a subnet of the underlay device: native routing needs
// L2 adjacency, so such a node needs a tunnel mode.
var ErrNotOnLink = errors.New("not on a subnet of the underlay device")

// ErrClosed is returned by methods called after Close.
var ErrClosed = errors.New("tunnel: closed")

// UnsupportedFeatureError names the kernel feature that is missing and, when
// the fix is known, what to do instead.
type UnsupportedFeatureError struct {
	// Feature is what the caller asked for, e.g. "Geneve tunnel device".
	Feature string
	// Kernel names the build option and module that provide it, e.g.
	// "CONFIG_GENEVE (module geneve)".
	Kernel string
	// Hint is the workaround, e.g. "use Mode vxlan".
	Hint string
	// Err is the error the kernel returned.
	Err error
}

func (e *UnsupportedFeatureError) Error() string {
	msg := fmt.Sprintf("%s %s: needs %s", e.Feature, ErrNotSupported, e.Kernel)
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	if e.Hint != "" {
		msg += " (" + e.Hint + ")"
	}
	return msg
}

// Is makes errors.Is(err, ErrNotSupported) true.
func (e *UnsupportedFeatureError) Is(target error) bool { return target == ErrNotSupported }

// Unwrap returns the kernel's error.
func (e *UnsupportedFeatureError) Unwrap() error { return e.Err }
