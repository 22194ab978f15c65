package ipsec

import (
	"errors"
	"fmt"
	"strings"
)

// ErrNotSupported matches every error that says the running kernel lacks
// something IPsec needs. Test with errors.Is; errors.As with
// *UnsupportedError gives the missing pieces. Such errors also match
// errors.ErrUnsupported, which privtest.SkipIfNotSupported knows.
var ErrNotSupported = errors.New("not supported by this kernel")

// ErrClosed is returned by methods called after Close.
var ErrClosed = errors.New("ipsec: closed")

// ErrBadKeyFile matches every error about the content or the permissions of
// the pre-shared key file.
var ErrBadKeyFile = errors.New("bad ipsec key file")

// NotSupportedHint is what an operator can do about a kernel without
// IPsec; UnsupportedError ends with it.
const NotSupportedHint = "use --type wireguard, or a kernel with these options built in or as modules it can load"

// UnsupportedError says which pieces of IPsec the kernel lacks, each with
// the kernel build options that provide it.
type UnsupportedError struct {
	Missing []MissingFeature
}

// MissingFeature is one piece the kernel lacks.
type MissingFeature struct {
	// Feature is what is missing, e.g. "ESP over IPv4".
	Feature string
	// Options are the kernel build options that provide it, e.g.
	// CONFIG_INET_ESP. When the kernel's configuration was readable
	// (/proc/config.gz), only the options it does not have built in.
	Options []string
	// Err is the kernel's answer to the probe (an errno, with the
	// kernel's message when it sent one).
	Err error
}

func (e *UnsupportedError) Error() string {
	var b strings.Builder
	b.WriteString("ipsec: ")
	b.WriteString(ErrNotSupported.Error())
	for i, m := range e.Missing {
		if i == 0 {
			b.WriteString(": ")
		} else {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s needs %s", m.Feature, strings.Join(m.Options, ", "))
		if m.Err != nil {
			fmt.Fprintf(&b, " (kernel: %v)", m.Err)
		}
	}
	b.WriteString(" (" + NotSupportedHint + ")")
	return b.String()
}

// Options returns every missing kernel option, each once, in the order the
// features were found missing.
func (e *UnsupportedError) Options() []string {
	var out []string
	seen := map[string]bool{}
	for _, m := range e.Missing {
		for _, o := range m.Options {
			if !seen[o] {
				seen[o] = true
				out = append(out, o)
			}
		}
	}
	return out
}

// Is makes errors.Is(err, ErrNotSupported) and errors.Is(err,
// errors.ErrUnsupported) true.
func (e *UnsupportedError) Is(target error) bool {
	return target == ErrNotSupported || target == errors.ErrUnsupported
}

// Unwrap returns the kernel's answers, so that errors.Is(err, unix.ENOSYS)
// works.
func (e *UnsupportedError) Unwrap() []error {
	var out []error
	for _, m := range e.Missing {
		if m.Err != nil {
			out = append(out, m.Err)
		}
	}
	return out
}

// add records m unless a feature of the same name is already recorded.
func (e *UnsupportedError) add(m MissingFeature) {
	for _, have := range e.Missing {
		if have.Feature == m.Feature {
			return
		}
	}
	e.Missing = append(e.Missing, m)
}
