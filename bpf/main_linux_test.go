//go:build linux

package bpf

import (
	"testing"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

func TestMain(m *testing.M) {
	privtest.Main(m, map[string]privtest.Helper{
		"tcp":   helperTCP,
		"udp":   helperUDP,
		"loop":  helperLoop,
		"bench": helperBenchConnect,
	})
}
