//go:build linux

package strict

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// kernelLPM is one of the LPM trie maps. A key is the prefix length (a
// host-order u32) followed by the address in network byte order, as the
// kernel's struct bpf_lpm_trie_key_u8 has it; the value is valueMember.
type kernelLPM struct {
	m       *ebpf.Map
	name    string
	addrLen int // 4 or 16
}

func (k *kernelLPM) mapName() string { return k.name }
func (k *kernelLPM) capacity() int   { return int(k.m.MaxEntries()) }

func (k *kernelLPM) key(p netip.Prefix) []byte {
	b := binary.NativeEndian.AppendUint32(make([]byte, 0, 4+k.addrLen), uint32(p.Bits()))
	return append(b, p.Addr().AsSlice()...)
}

func (k *kernelLPM) prefix(key []byte) (netip.Prefix, error) {
	if len(key) != 4+k.addrLen {
		return netip.Prefix{}, fmt.Errorf("key of %d bytes", len(key))
	}
	bits := binary.NativeEndian.Uint32(key)
	addr, _ := netip.AddrFromSlice(key[4:])
	p := netip.PrefixFrom(addr, int(bits))
	if !p.IsValid() {
		return netip.Prefix{}, fmt.Errorf("prefix length %d", bits)
	}
	return p, nil
}

func (k *kernelLPM) entries() (map[netip.Prefix]uint32, error) {
	out := map[netip.Prefix]uint32{}
	key := make([]byte, 4+k.addrLen)
	var val uint32
	it := k.m.Iterate()
	for it.Next(&key, &val) {
		p, err := k.prefix(key)
		if err != nil {
			return nil, fmt.Errorf("strict: read %s: %w", k.name, err)
		}
		// The trie compares only the first prefixlen bits, so a key
		// someone wrote with host bits set is the masked prefix: an
		// update or delete of that replaces or removes it.
		out[p.Masked()] = val
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("strict: read %s: %w", k.name, err)
	}
	return out, nil
}

func (k *kernelLPM) put(p netip.Prefix) error {
	if err := k.m.Update(k.key(p), valueMember, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("strict: put %s in %s: %w", p, k.name, err)
	}
	return nil
}

func (k *kernelLPM) delete(p netip.Prefix) error {
	if err := k.m.Delete(k.key(p)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("strict: delete %s from %s: %w", p, k.name, err)
	}
	return nil
}
