package tunnel

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
)

// Lightweight-tunnel attributes (include/uapi/linux/lwtunnel.h). The same
// numbers serve LWTUNNEL_IP_* and LWTUNNEL_IP6_*.
const (
	lwtunnelIPID  = 1
	lwtunnelIPDst = 2
)

// ipEncap is a route's "encap ip id <vni> dst <node>": the lightweight-tunnel
// metadata a collect-metadata (external) tunnel device reads to address the
// outer packet. Geneve mode uses it because a Geneve device, unlike a VXLAN
// one, has no FDB to map a MAC to a remote.
//
// The netlink library encodes any netlink.Encap but cannot decode this type
// when it lists routes (the field reads back nil); Set therefore trusts its
// own record of the encap it installed. See routeMatches.
type ipEncap struct {
	id  uint64
	dst netip.Addr
}

var _ netlink.Encap = (*ipEncap)(nil)

func (e *ipEncap) Type() int {
	if e.dst.Is4() {
		return nl.LWTUNNEL_ENCAP_IP
	}
	return nl.LWTUNNEL_ENCAP_IP6
}

func (e *ipEncap) Encode() ([]byte, error) {
	if !e.dst.IsValid() {
		return nil, fmt.Errorf("encap ip: no destination")
	}
	var b []byte
	id := make([]byte, 8)
	binary.BigEndian.PutUint64(id, e.id) // __be64 tunnel id, as iproute2's htonll
	b = append(b, nl.NewRtAttr(lwtunnelIPID, id).Serialize()...)
	b = append(b, nl.NewRtAttr(lwtunnelIPDst, e.dst.AsSlice()).Serialize()...)
	return b, nil
}

func (e *ipEncap) Decode(buf []byte) error {
	attrs, err := nl.ParseRouteAttr(buf)
	if err != nil {
		return err
	}
	for _, a := range attrs {
		switch a.Attr.Type {
		case lwtunnelIPID:
			if len(a.Value) == 8 {
				e.id = binary.BigEndian.Uint64(a.Value)
			}
		case lwtunnelIPDst:
			if ip, ok := netip.AddrFromSlice(a.Value); ok {
				e.dst = ip.Unmap()
			}
		}
	}
	return nil
}

func (e *ipEncap) String() string { return fmt.Sprintf("ip id %d dst %s", e.id, e.dst) }

func (e *ipEncap) Equal(x netlink.Encap) bool {
	o, ok := x.(*ipEncap)
	return ok && o != nil && e.id == o.id && e.dst == o.dst
}
