package v1

import (
	"errors"
	"strconv"
)

// Sentinel errors. Every error this package returns matches at most one of
// them with errors.Is; [Reason] turns that into a metric label.
var (
	// ErrTooLarge: a value is larger than MaxValueSize.
	ErrTooLarge = errors.New("value too large")
	// ErrUnsupportedVersion: a value's "v" is not Version.
	ErrUnsupportedVersion = errors.New("unsupported version")
	// ErrKeyMismatch: a value's body names a different object than its key.
	ErrKeyMismatch = errors.New("key and value disagree")
	// ErrInvalid: a value failed validation. Such errors are
	// *ValidationError.
	ErrInvalid = errors.New("invalid value")
	// ErrBadKey: a key is not a well-formed Trellis key, or is the wrong
	// kind for the decoder it was given to.
	ErrBadKey = errors.New("bad key")
)

// Reason returns a short, stable label for why err rejected an entry:
// "too-large", "version", "key-mismatch", "invalid", "bad-key", or "decode"
// for anything else (malformed JSON, wrong JSON types). It returns "" for a
// nil error. Readers use it to count rejections by reason.
func Reason(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, ErrTooLarge):
		return "too-large"
	case errors.Is(err, ErrUnsupportedVersion):
		return "version"
	case errors.Is(err, ErrKeyMismatch):
		return "key-mismatch"
	case errors.Is(err, ErrBadKey):
		return "bad-key"
	case errors.Is(err, ErrInvalid):
		return "invalid"
	}
	return "decode"
}

// ValidationError is what Validate returns: which object, which field, the
// value found there and what would have been allowed. It matches
// [ErrInvalid].
type ValidationError struct {
	// Object is the type, e.g. "endpoint".
	Object string
	// Name identifies the object, e.g. "cluster-1/10.0.0.1".
	Name string
	// Field is the JSON path of the offending field, e.g.
	// "backends[2].ports[0].port".
	Field string
	// Value is the offending value as text, cut to a readable length.
	Value string
	// Allowed says what the field may hold.
	Allowed string
}

func (e *ValidationError) Error() string {
	return "invalid " + e.Object + " " + quote(e.Name) + ": " + e.Field + " " + quote(e.Value) + ": " + e.Allowed
}

// Is makes errors.Is(err, ErrInvalid) true.
func (e *ValidationError) Is(target error) bool { return target == ErrInvalid }

// maxQuoted bounds how much of a hostile key or value ends up in an error
// message (and so in logs).
const maxQuoted = 256

// quote returns s in Go quotes, cut to maxQuoted bytes.
func quote(s string) string {
	if len(s) > maxQuoted {
		return strconv.Quote(s[:maxQuoted]) + "..."
	}
	return strconv.Quote(s)
}
