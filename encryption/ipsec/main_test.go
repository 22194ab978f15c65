package ipsec

import (
	"testing"

	"github.com/trellis-mesh/trellis/internal/privtest"
)

func TestMain(m *testing.M) { privtest.MainCheckingFDs(m, "ipsec tests") }
