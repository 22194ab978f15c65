package identity

import (
	"context"
	"testing"
)

// A cluster whose ID changes gets identities with the new ID's bits for
// label sets it had allocated under the old one: the old index entry is
// recognised as unusable and the labels are allocated again.
func TestClusterIDChangeReallocates(t *testing.T) {
	e := startEtcd(t)
	ctx := context.Background()
	labels := map[string]string{"k8s:io.kubernetes.pod.namespace": "default", "k8s:app": "echo"}

	old := newAllocator(t, e, "r1", nil)
	oldID, err := old.Acquire(ctx, labels)
	if err != nil {
		t.Fatal(err)
	}
	old.Close()

	const newClusterID = testClusterID + 1
	renamed := newAllocator(t, e, "r1", func(c *Config) { c.ClusterID = newClusterID })
	newID, err := renamed.Acquire(ctx, labels)
	if err != nil {
		t.Fatal(err)
	}
	if newID.ClusterID() != newClusterID || oldID.ClusterID() != testClusterID {
		t.Fatalf("identity after the ID change = %d (cluster bits %d), before %d; want bits %d", newID, newID.ClusterID(), oldID, newClusterID)
	}
	again, err := renamed.Acquire(ctx, labels)
	if err != nil || again != newID {
		t.Fatalf("second acquire = %d, %v; want the same %d", again, err, newID)
	}
}
