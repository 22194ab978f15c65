//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"

	"github.com/cilium/ebpf"
)

// ServiceMap is the services map: ServiceKey -> ServiceValue.
type ServiceMap struct {
	typedMap[ServiceKey, ServiceValue, socklbLb4Key, socklbLb4Service]
}

// SlotMap is the backend slots map: SlotKey -> backend ID.
type SlotMap struct {
	typedMap[SlotKey, uint32, socklbLb4SlotKey, uint32]
}

// BackendMap is the backends map: backend ID -> Backend.
type BackendMap struct {
	typedMap[uint32, Backend, uint32, socklbLb4Backend]
}

// RevNATMap is the reverse-translation LRU map the programs write at
// connect4/sendmsg4: (socket cookie, backend) -> the VIP:port the socket
// asked for. User space only reads it (and may delete from it).
type RevNATMap struct {
	typedMap[RevNATKey, netip.AddrPort, socklbLb4RevKey, socklbLb4RevValue]
}

func newServiceMap(m *ebpf.Map) *ServiceMap {
	return &ServiceMap{typedMap[ServiceKey, ServiceValue, socklbLb4Key, socklbLb4Service]{
		m: m, name: "services",
		keyToRaw: ServiceKey.raw, keyFromRaw: serviceKeyFromRaw,
		valToRaw: ServiceValue.raw, valFromRaw: serviceValueFromRaw,
	}}
}

func newSlotMap(m *ebpf.Map) *SlotMap {
	return &SlotMap{typedMap[SlotKey, uint32, socklbLb4SlotKey, uint32]{
		m: m, name: "slots",
		keyToRaw: SlotKey.raw, keyFromRaw: slotKeyFromRaw,
		valToRaw: rawU32, valFromRaw: u32FromRaw,
	}}
}

func newBackendMap(m *ebpf.Map) *BackendMap {
	return &BackendMap{typedMap[uint32, Backend, uint32, socklbLb4Backend]{
		m: m, name: "backends",
		keyToRaw: rawU32, keyFromRaw: u32FromRaw,
		valToRaw: Backend.raw, valFromRaw: backendFromRaw,
	}}
}

func newRevNATMap(m *ebpf.Map) *RevNATMap {
	return &RevNATMap{typedMap[RevNATKey, netip.AddrPort, socklbLb4RevKey, socklbLb4RevValue]{
		m: m, name: "revnat",
		keyToRaw: RevNATKey.raw, keyFromRaw: revNATKeyFromRaw,
		valToRaw: rawRevNATValue, valFromRaw: revNATValueFromRaw,
	}}
}

// dumpChunk is the number of entries one batch lookup asks for. It must be
// larger than the longest hash bucket, or the kernel answers ENOSPC.
const dumpChunk = 4096

// typedMap converts between the Go key/value types (K, V) and the structs
// bpf2go generated from the C source (RK, RV). Batch operations fall back
// to one syscall per element on kernels without BPF_MAP_*_BATCH.
type typedMap[K comparable, V any, RK any, RV any] struct {
	m          *ebpf.Map
	name       string
	keyToRaw   func(K) (RK, error)
	keyFromRaw func(RK) K
	valToRaw   func(V) (RV, error)
	valFromRaw func(RV) V

	// noBatch is set once the kernel said it has no batch API.
	noBatch atomic.Bool
}

// Map returns the underlying map. It stays owned by the Objects it came
// from: do not Close it.
func (t *typedMap[K, V, RK, RV]) Map() *ebpf.Map { return t.m }

// MaxEntries is the number of entries the map holds at most.
func (t *typedMap[K, V, RK, RV]) MaxEntries() uint32 { return t.m.MaxEntries() }

// Lookup returns the value stored under k. A missing key is an error that
// matches ebpf.ErrKeyNotExist.
func (t *typedMap[K, V, RK, RV]) Lookup(k K) (V, error) {
	var zero V
	rk, err := t.keyToRaw(k)
	if err != nil {
		return zero, fmt.Errorf("%s: lookup: %w", t.name, err)
	}
	var rv RV
	if err := t.m.Lookup(&rk, &rv); err != nil {
		return zero, fmt.Errorf("%s: lookup %v: %w", t.name, k, err)
	}
	return t.valFromRaw(rv), nil
}

// Update creates or replaces the entry k.
func (t *typedMap[K, V, RK, RV]) Update(k K, v V) error {
	rk, rv, err := t.kv(k, v)
	if err != nil {
		return fmt.Errorf("%s: update: %w", t.name, err)
	}
	if err := t.m.Update(&rk, &rv, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("%s: update %v: %w", t.name, k, err)
	}
	return nil
}

// Delete removes the entry k. A missing key is an error that matches
// ebpf.ErrKeyNotExist.
func (t *typedMap[K, V, RK, RV]) Delete(k K) error {
	rk, err := t.keyToRaw(k)
	if err != nil {
		return fmt.Errorf("%s: delete: %w", t.name, err)
	}
	if err := t.m.Delete(&rk); err != nil {
		return fmt.Errorf("%s: delete %v: %w", t.name, k, err)
	}
	return nil
}

func (t *typedMap[K, V, RK, RV]) kv(k K, v V) (RK, RV, error) {
	rk, err := t.keyToRaw(k)
	if err != nil {
		var rv RV
		return rk, rv, err
	}
	rv, err := t.valToRaw(v)
	return rk, rv, err
}

// BatchUpdate creates or replaces the entries keys[i] -> values[i] with
// BPF_MAP_UPDATE_BATCH, or one update per entry where the kernel lacks it.
// Entries are written in order.
func (t *typedMap[K, V, RK, RV]) BatchUpdate(keys []K, values []V) error {
	if len(keys) != len(values) {
		return fmt.Errorf("%s: batch update: %d keys but %d values", t.name, len(keys), len(values))
	}
	if len(keys) == 0 {
		return nil
	}
	rks := make([]RK, len(keys))
	rvs := make([]RV, len(keys))
	for i := range keys {
		var err error
		if rks[i], rvs[i], err = t.kv(keys[i], values[i]); err != nil {
			return fmt.Errorf("%s: batch update: %w", t.name, err)
		}
	}
	if !t.noBatch.Load() {
		_, err := t.m.BatchUpdate(rks, rvs, nil)
		if err == nil {
			return nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("%s: batch update of %d entries: %w", t.name, len(keys), err)
		}
		t.noBatch.Store(true)
	}
	for i := range rks {
		if err := t.m.Update(&rks[i], &rvs[i], ebpf.UpdateAny); err != nil {
			return fmt.Errorf("%s: update %v: %w", t.name, keys[i], err)
		}
	}
	return nil
}

// BatchDelete removes the entries keys with BPF_MAP_DELETE_BATCH, or one
// delete per entry where the kernel lacks it. Keys that are already gone
// are not an error.
func (t *typedMap[K, V, RK, RV]) BatchDelete(keys []K) error {
	if len(keys) == 0 {
		return nil
	}
	rks := make([]RK, len(keys))
	for i := range keys {
		var err error
		if rks[i], err = t.keyToRaw(keys[i]); err != nil {
			return fmt.Errorf("%s: batch delete: %w", t.name, err)
		}
	}
	done := 0
	if !t.noBatch.Load() {
		n, err := t.m.BatchDelete(rks, nil)
		if err == nil {
			return nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			t.noBatch.Store(true)
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("%s: batch delete of %d entries: %w", t.name, len(keys), err)
		} else {
			// The batch stopped at a key that is gone; delete the rest
			// one by one.
			done = n
		}
	}
	for i := done; i < len(rks); i++ {
		if err := t.m.Delete(&rks[i]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("%s: delete %v: %w", t.name, keys[i], err)
		}
	}
	return nil
}

// Dump returns every entry of the map. Concurrent writers (the programs
// write RevNATMap) may make the result a mix of before and after.
func (t *typedMap[K, V, RK, RV]) Dump() (map[K]V, error) {
	out := make(map[K]V)
	if !t.noBatch.Load() {
		err := t.batchDump(out)
		if err == nil {
			return out, nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return nil, fmt.Errorf("%s: dump: %w", t.name, err)
		}
		t.noBatch.Store(true)
		clear(out)
	}
	var rk RK
	var rv RV
	it := t.m.Iterate()
	for it.Next(&rk, &rv) {
		out[t.keyFromRaw(rk)] = t.valFromRaw(rv)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("%s: dump: %w", t.name, err)
	}
	return out, nil
}

func (t *typedMap[K, V, RK, RV]) batchDump(out map[K]V) error {
	size := min(int(t.m.MaxEntries()), dumpChunk)
	rks := make([]RK, size)
	rvs := make([]RV, size)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := t.m.BatchLookup(&cursor, rks, rvs, nil)
		for i := range n {
			out[t.keyFromRaw(rks[i])] = t.valFromRaw(rvs[i])
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}
