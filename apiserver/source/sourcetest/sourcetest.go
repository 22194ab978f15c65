// Package sourcetest has fakes of what the mesh API server gives a source,
// for the sources' tests: an identity allocator that counts references.
package sourcetest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
)

var _ source.IdentityAllocator = (*Allocator)(nil)

// Allocator hands out identities cluster<<16 | n, one per distinct label
// set, validates label sets as the real allocator does, and counts
// references, so a test can see every Acquire matched by a Release.
type Allocator struct {
	cluster v1.ClusterID

	mu       sync.Mutex
	next     uint16
	ids      map[string]v1.NumericIdentity
	refs     map[string]int
	acquires int
	releases int
	// failAcquire, while positive, makes Acquire fail (and decrements).
	failAcquire int
}

// NewAllocator returns an allocator of cluster's identities.
func NewAllocator(cluster v1.ClusterID) *Allocator {
	return &Allocator{cluster: cluster, ids: map[string]v1.NumericIdentity{}, refs: map[string]int{}}
}

func labelKey(labels map[string]string) string {
	var b strings.Builder
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		b.WriteString(k + "=" + labels[k] + ";")
	}
	return b.String()
}

// Acquire returns the label set's identity and takes a reference.
func (a *Allocator) Acquire(_ context.Context, labels map[string]string) (v1.NumericIdentity, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.failAcquire > 0 {
		a.failAcquire--
		return 0, errors.New("fake allocator: etcd unavailable")
	}
	id := v1.Identity{Cluster: "c", ID: v1.MakeIdentity(a.cluster, 1), Labels: labels}
	if err := id.Validate(); err != nil {
		return 0, err
	}
	k := labelKey(labels)
	n, ok := a.ids[k]
	if !ok {
		a.next++
		n = v1.MakeIdentity(a.cluster, a.next)
		a.ids[k] = n
	}
	a.refs[k]++
	a.acquires++
	return n, nil
}

// Release drops a reference; releasing labels without one is an error.
func (a *Allocator) Release(_ context.Context, labels map[string]string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	k := labelKey(labels)
	if a.refs[k] == 0 {
		return fmt.Errorf("fake allocator: release of unreferenced labels %s", k)
	}
	a.refs[k]--
	if a.refs[k] == 0 {
		delete(a.refs, k)
	}
	a.releases++
	return nil
}

// FailAcquires makes the next n Acquire calls fail, as an unreachable etcd
// would.
func (a *Allocator) FailAcquires(n int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.failAcquire = n
}

// RefsOf returns the references held on labels.
func (a *Allocator) RefsOf(labels map[string]string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.refs[labelKey(labels)]
}

// TotalRefs returns the references held on all label sets.
func (a *Allocator) TotalRefs() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, r := range a.refs {
		n += r
	}
	return n
}

// Counts returns how many Acquire and Release calls succeeded.
func (a *Allocator) Counts() (acquires, releases int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.acquires, a.releases
}
