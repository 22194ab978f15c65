//go:build linux

package strict

import (
	"testing"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

// TestMain fails the run when a test leaves an eBPF file descriptor open
// (a Filter, link or map not closed).
func TestMain(m *testing.M) { privtest.Main(m, nil) }
