package apiserver_test

import (
	"os"
	"testing"

	"github.com/trellis-mesh/trellis/internal/etcdchild"
)

// TestMain lets this test binary serve as an etcd member for the tests
// that run a real etcd cluster (etcdchild re-executes it).
func TestMain(m *testing.M) {
	etcdchild.ServeIfChild()
	os.Exit(m.Run())
}
