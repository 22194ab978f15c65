package gossip

import (
	"errors"
	"fmt"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// metaVersion is the first byte of a member's metadata. A decoder refuses
// any other version, so a later encoding gets a new number.
const metaVersion = 1

// flagLeaving, in the flags byte after the version, says the member is
// leaving gracefully: memberlist reports a leave and a death through the
// same hook, so the leaver announces itself first (see Gossip.run).
const flagLeaving = 1 << 0

// maxMetaSize bounds what we send and accept; memberlist's own limit
// (MetaMaxSize) is 512.
const maxMetaSize = 512

// maxRegionLen is a Kubernetes label value's limit, as a topology region
// label is one.
const maxRegionLen = 63

// Meta is what a member says of itself.
type Meta struct {
	Cluster string
	Node    string
	Region  string
}

// MemberName is the member name of node in cluster: "<cluster>/<node>".
func MemberName(cluster, node string) string { return cluster + "/" + node }

// validate checks every field.
func (m Meta) validate() error {
	var errs []error
	if err := v1.ValidateClusterName(m.Cluster); err != nil {
		errs = append(errs, err)
	}
	if err := v1.ValidateNodeName(m.Node); err != nil {
		errs = append(errs, err)
	}
	if err := validateRegion(m.Region); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// validateRegion accepts an empty region or a Kubernetes label value.
func validateRegion(r string) error {
	if r == "" {
		return nil
	}
	ok := len(r) <= maxRegionLen && alnum(r[0]) && alnum(r[len(r)-1])
	for i := 0; ok && i < len(r); i++ {
		c := r[i]
		ok = alnum(c) || c == '-' || c == '_' || c == '.'
	}
	if !ok {
		return fmt.Errorf("region %.70q: want a label value: at most 63 characters A-Z, a-z, 0-9, '-', '_' and '.', starting and ending with a letter or digit", r)
	}
	return nil
}

func alnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// encode returns version, flags, then cluster, node and region, each a
// length byte and its bytes. Fields are validated first, so each fits a
// byte.
func (m Meta) encode(flags byte) ([]byte, error) {
	if err := m.validate(); err != nil {
		return nil, err
	}
	out := make([]byte, 0, 5+len(m.Cluster)+len(m.Node)+len(m.Region))
	out = append(out, metaVersion, flags)
	for _, f := range []string{m.Cluster, m.Node, m.Region} {
		out = append(out, byte(len(f)))
		out = append(out, f...)
	}
	if len(out) > maxMetaSize {
		return nil, fmt.Errorf("metadata of %d bytes exceeds %d", len(out), maxMetaSize)
	}
	return out, nil
}

// decodeMeta parses and validates metadata a peer sent, and checks it
// against the member name it came with. Nothing in b can make it panic or
// allocate more than len(b). Unknown flags are ignored.
func decodeMeta(name string, b []byte) (Meta, byte, error) {
	if len(b) == 0 {
		return Meta{}, 0, errors.New("no metadata")
	}
	if len(b) > maxMetaSize {
		return Meta{}, 0, fmt.Errorf("metadata of %d bytes exceeds %d", len(b), maxMetaSize)
	}
	if b[0] != metaVersion {
		return Meta{}, 0, fmt.Errorf("metadata version %d, want %d", b[0], metaVersion)
	}
	if len(b) < 2 {
		return Meta{}, 0, errors.New("metadata truncated")
	}
	flags, rest := b[1], b[2:]
	var fields [3]string
	for i := range fields {
		if len(rest) == 0 {
			return Meta{}, 0, errors.New("metadata truncated")
		}
		n := int(rest[0])
		rest = rest[1:]
		if n > len(rest) {
			return Meta{}, 0, errors.New("metadata truncated")
		}
		fields[i] = string(rest[:n])
		rest = rest[n:]
	}
	if len(rest) != 0 {
		return Meta{}, 0, fmt.Errorf("%d trailing bytes after metadata", len(rest))
	}
	m := Meta{Cluster: fields[0], Node: fields[1], Region: fields[2]}
	if err := m.validate(); err != nil {
		return Meta{}, 0, err
	}
	if want := MemberName(m.Cluster, m.Node); name != want {
		return Meta{}, 0, fmt.Errorf("member name %.300q, but its metadata says %q", name, want)
	}
	return m, flags, nil
}
