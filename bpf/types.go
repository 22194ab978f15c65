//go:build linux

package bpf

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Protocol is an IP protocol number as the kernel reports it for a socket
// (sk->sk_protocol).
type Protocol uint8

// Protocols the load balancer translates.
const (
	TCP Protocol = 6  // IPPROTO_TCP
	UDP Protocol = 17 // IPPROTO_UDP
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return fmt.Sprintf("proto(%d)", uint8(p))
}

// ServiceKey is a key of the services map: a frontend VIP, port (host
// order) and protocol. Only IPv4 VIPs are supported (an IPv4-mapped IPv6
// address is accepted and unmapped).
type ServiceKey struct {
	VIP   netip.Addr
	Port  uint16
	Proto Protocol
}

func (k ServiceKey) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(k.VIP, k.Port), k.Proto)
}

// InlineSlots is the number of slots whose backends a ServiceValue
// carries.
const InlineSlots = 4

// ServiceValue is a value of the services map.
type ServiceValue struct {
	// ID names the service in the slots map; IDs start at 1.
	ID uint32
	// Count is the number of active slots, [0, Count). (It was 16 bits
	// followed by 16 reserved zero bits: maps pinned by that layout read the
	// same, see c/socklb.c.)
	Count uint32
	// Inline holds the addresses of the backends in slots [0, min(Count,
	// InlineSlots)), as the slots and backends maps also have them; the
	// rest are the zero AddrPort. The programs read a slot below
	// InlineSlots from here, so connecting to a small service costs one
	// map lookup instead of three.
	Inline [InlineSlots]netip.AddrPort
}

// SlotKey is a key of the slots map. Its value is a backend ID.
type SlotKey struct {
	ServiceID uint32
	Slot      uint32
}

// Backend is a value of the backends map and an entry of Service.Backends:
// an IPv4 address, a port (host order) and the cluster it belongs to.
type Backend struct {
	IP        netip.Addr
	Port      uint16
	ClusterID uint32
}

func (b Backend) String() string {
	return fmt.Sprintf("%s@%d", netip.AddrPortFrom(b.IP, b.Port), b.ClusterID)
}

// RevNATKey is a key of the reverse-translation map written by the
// programs: a socket cookie and the backend that socket was sent to.
type RevNATKey struct {
	Cookie  uint64
	Backend netip.AddrPort
}

// Byte order. The kernel hands sock_addr programs sin_addr and sin_port as
// they are in struct sockaddr_in: network byte order. The C structs store
// them unchanged, so a map key holds the address bytes 10.0.0.1 as the
// bytes 0a 00 00 01 in memory. bpf2go maps those fields to Go uint32 and
// uint16, which cilium/ebpf marshals in host byte order; the helpers below
// produce the integer whose host-order bytes are the network-order bytes.

// rawIP4 converts an IPv4 address to its in-kernel representation.
func rawIP4(a netip.Addr) (uint32, error) {
	a = a.Unmap()
	if !a.Is4() {
		return 0, fmt.Errorf("%v is not an IPv4 address", a)
	}
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:]), nil
}

// ip4FromRaw is the inverse of rawIP4.
func ip4FromRaw(u uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], u)
	return netip.AddrFrom4(b)
}

// rawPort converts a host-order port to its in-kernel representation.
func rawPort(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

// portFromRaw is the inverse of rawPort.
func portFromRaw(u uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], u)
	return binary.BigEndian.Uint16(b[:])
}

func (k ServiceKey) raw() (socklbLb4Key, error) {
	ip, err := rawIP4(k.VIP)
	if err != nil {
		return socklbLb4Key{}, fmt.Errorf("service %v: %w", k, err)
	}
	return socklbLb4Key{Vip: ip, Port: rawPort(k.Port), Proto: uint8(k.Proto)}, nil
}

func serviceKeyFromRaw(r socklbLb4Key) ServiceKey {
	return ServiceKey{VIP: ip4FromRaw(r.Vip), Port: portFromRaw(r.Port), Proto: Protocol(r.Proto)}
}

func (v ServiceValue) raw() (socklbLb4Service, error) {
	r := socklbLb4Service{Id: v.ID, Count: v.Count}
	for i, a := range v.Inline {
		if !a.IsValid() {
			continue
		}
		ip, err := rawIP4(a.Addr())
		if err != nil {
			return r, fmt.Errorf("service id %d: inline slot %d: %w", v.ID, i, err)
		}
		r.InlineBe[i].Ip, r.InlineBe[i].Port = ip, rawPort(a.Port())
	}
	return r, nil
}

func serviceValueFromRaw(r socklbLb4Service) ServiceValue {
	v := ServiceValue{ID: r.Id, Count: r.Count}
	for i, a := range r.InlineBe {
		if a.Ip != 0 || a.Port != 0 {
			v.Inline[i] = netip.AddrPortFrom(ip4FromRaw(a.Ip), portFromRaw(a.Port))
		}
	}
	return v
}

func (k SlotKey) raw() (socklbLb4SlotKey, error) {
	return socklbLb4SlotKey{ServiceId: k.ServiceID, Slot: k.Slot}, nil
}

func slotKeyFromRaw(r socklbLb4SlotKey) SlotKey {
	return SlotKey{ServiceID: r.ServiceId, Slot: r.Slot}
}

func (b Backend) raw() (socklbLb4Backend, error) {
	ip, err := rawIP4(b.IP)
	if err != nil {
		return socklbLb4Backend{}, fmt.Errorf("backend %v: %w", b, err)
	}
	return socklbLb4Backend{Ip: ip, Port: rawPort(b.Port), ClusterId: b.ClusterID}, nil
}

func backendFromRaw(r socklbLb4Backend) Backend {
	return Backend{IP: ip4FromRaw(r.Ip), Port: portFromRaw(r.Port), ClusterID: r.ClusterId}
}

func (k RevNATKey) raw() (socklbLb4RevKey, error) {
	ip, err := rawIP4(k.Backend.Addr())
	if err != nil {
		return socklbLb4RevKey{}, err
	}
	return socklbLb4RevKey{Cookie: k.Cookie, Ip: ip, Port: rawPort(k.Backend.Port())}, nil
}

func revNATKeyFromRaw(r socklbLb4RevKey) RevNATKey {
	return RevNATKey{Cookie: r.Cookie, Backend: netip.AddrPortFrom(ip4FromRaw(r.Ip), portFromRaw(r.Port))}
}

func rawRevNATValue(v netip.AddrPort) (socklbLb4RevValue, error) {
	ip, err := rawIP4(v.Addr())
	if err != nil {
		return socklbLb4RevValue{}, err
	}
	return socklbLb4RevValue{Vip: ip, Port: rawPort(v.Port())}, nil
}

func revNATValueFromRaw(r socklbLb4RevValue) netip.AddrPort {
	return netip.AddrPortFrom(ip4FromRaw(r.Vip), portFromRaw(r.Port))
}

func rawU32(v uint32) (uint32, error) { return v, nil }
func u32FromRaw(v uint32) uint32      { return v }
