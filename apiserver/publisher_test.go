package apiserver

import (
	"net/netip"
	"testing"
)

func TestLastAddr(t *testing.T) {
	for in, want := range map[string]string{
		"10.1.0.0/16":   "10.1.255.255",
		"10.1.2.0/24":   "10.1.2.255",
		"10.1.2.3/32":   "10.1.2.3",
		"10.0.0.0/15":   "10.1.255.255",
		"fd00::/120":    "fd00::ff",
		"192.168.0.0/0": "255.255.255.255",
	} {
		if got := lastAddr(netip.MustParsePrefix(in)); got.String() != want {
			t.Errorf("lastAddr(%s) = %s, want %s", in, got, want)
		}
	}
}
