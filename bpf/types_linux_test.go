//go:build linux

package bpf

import (
	"bytes"
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
)

// TestRawLayout checks the bytes the kernel sees: address and port in
// network byte order, whatever the host's byte order.
func TestRawLayout(t *testing.T) {
	k := ServiceKey{VIP: netip.MustParseAddr("10.96.0.1"), Port: 0x1f90 /* 8080 */, Proto: TCP}
	raw, err := k.raw()
	if err != nil {
		t.Fatal(err)
	}
	got, err := marshalRaw(raw)
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{10, 96, 0, 1, 0x1f, 0x90, 6, 0}
	if !bytes.Equal(got, want) {
		t.Fatalf("service key bytes = % x, want % x", got, want)
	}
	if back := serviceKeyFromRaw(raw); back != k {
		t.Fatalf("round trip = %v, want %v", back, k)
	}

	b := Backend{IP: netip.MustParseAddr("192.0.2.7"), Port: 443, ClusterID: 0x102}
	rb, err := b.raw()
	if err != nil {
		t.Fatal(err)
	}
	got, err = marshalRaw(rb)
	if err != nil {
		t.Fatal(err)
	}
	// cluster_id is a host-order integer.
	want = append([]byte{192, 0, 2, 7, 0x01, 0xbb, 0, 0}, hostU32(0x102)...)
	if !bytes.Equal(got, want) {
		t.Fatalf("backend bytes = % x, want % x", got, want)
	}
	if back := backendFromRaw(rb); back != b {
		t.Fatalf("round trip = %v, want %v", back, b)
	}

	// A service value: inline slots hold network-order addresses, unused
	// ones are zero and come back as the zero AddrPort.
	v := ServiceValue{ID: 3, Count: 2, Inline: [InlineSlots]netip.AddrPort{
		netip.MustParseAddrPort("192.0.2.7:443"), netip.MustParseAddrPort("192.0.2.8:80")}}
	rv, err := v.raw()
	if err != nil {
		t.Fatal(err)
	}
	got, err = marshalRaw(rv)
	if err != nil {
		t.Fatal(err)
	}
	want = append(append(hostU32(3), 2, 0, 0, 0), 192, 0, 2, 7, 0x01, 0xbb, 0, 0, 192, 0, 2, 8, 0, 80, 0, 0)
	want = append(want, make([]byte, 16)...)
	if !bytes.Equal(got, want) {
		t.Fatalf("service value bytes = % x, want % x", got, want)
	}
	if back := serviceValueFromRaw(rv); back != v {
		t.Fatalf("round trip = %+v, want %+v", back, v)
	}

	// IPv4-mapped IPv6 is unmapped; IPv6 is refused.
	mapped := ServiceKey{VIP: netip.MustParseAddr("::ffff:10.96.0.1"), Port: 8080, Proto: TCP}
	if r, err := mapped.raw(); err != nil || serviceKeyFromRaw(r) != k {
		t.Fatalf("mapped address: %v, %v", serviceKeyFromRaw(r), err)
	}
	if _, err := (ServiceKey{VIP: netip.MustParseAddr("2001:db8::1"), Port: 1, Proto: TCP}).raw(); err == nil {
		t.Fatal("IPv6 VIP accepted")
	}
}

func marshalRaw(v any) ([]byte, error) {
	var buf bytes.Buffer
	err := ebpfBinaryWrite(&buf, v)
	return buf.Bytes(), err
}

func hostU32(v uint32) []byte {
	var buf bytes.Buffer
	ebpfBinaryWrite(&buf, v)
	return buf.Bytes()
}

// TestGeneratedTypesMatchMaps checks that the Go structs bpf2go generated
// have the sizes of the maps' keys and values in the object.
func TestGeneratedTypesMatchMaps(t *testing.T) {
	spec, err := loadSocklb()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		m          string
		key, value any
	}{
		{socklbMapTrellisSvc4, socklbLb4Key{}, socklbLb4Service{}},
		{socklbMapTrellisSlot4, socklbLb4SlotKey{}, uint32(0)},
		{socklbMapTrellisBe4, uint32(0), socklbLb4Backend{}},
		{socklbMapTrellisRev4, socklbLb4RevKey{}, socklbLb4RevValue{}},
		{socklbMapTrellisConn4, uint32(0), socklbLb4Conn{}},
	} {
		ms := spec.Maps[c.m]
		k, _ := marshalRaw(c.key)
		v, _ := marshalRaw(c.value)
		if uint32(len(k)) != ms.KeySize || uint32(len(v)) != ms.ValueSize {
			t.Errorf("%s: Go key/value %d/%d bytes, map %d/%d", c.m, len(k), len(v), ms.KeySize, ms.ValueSize)
		}
	}
	if spec.Maps[socklbMapTrellisRev4].Type != ebpf.LRUHash {
		t.Errorf("revnat map is %v, want LRU hash", spec.Maps[socklbMapTrellisRev4].Type)
	}
	// The programs find a slot with cookie & (size-1).
	if ms := spec.Maps[socklbMapTrellisConn4]; ms.Type != ebpf.Array || ms.MaxEntries&(ms.MaxEntries-1) != 0 {
		t.Errorf("conn map is %v of %d entries, want an array of a power of two", ms.Type, ms.MaxEntries)
	}
}

func TestCgroupV2Root(t *testing.T) {
	root, err := CgroupV2Root()
	if errors.Is(err, ErrNoCgroupV2) {
		t.Skip("this machine has no cgroup2:", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := isCgroup2(root); !ok {
		t.Fatalf("CgroupV2Root() = %s, which is not cgroup2 (%v)", root, err)
	}
}
