//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
)

// MapSizes are the max_entries of the maps Load creates. A zero field
// keeps the default compiled into the object (65536 services, 262144
// slots, 262144 backends, 131072 reverse-translation entries). Pinned maps
// that Load adopts keep the size they were created with. The connected
// sockets' reverse-translation array (131072 slots) has a fixed size: the
// programs find a socket's slot with a mask.
//
// A slot is one backend of one frontend (VIP, port, protocol), so the
// defaults hold, for example, one service of 100 000 backends on two ports
// beside 60 000 more slots; a backend ID is one (IP, port, cluster), and
// there are never more of those than slots, so a service's backends can
// all be replaced at once (old and new are both in the map for a moment).
// The maps are preallocated hash maps: by the kernel's own count
// (fdinfo memlock) the defaults take 20 MiB for slots, 22 MiB for
// backends (5.5 MiB at the former 65536), 7 MiB for services and 11 MiB
// for reverse translations. Set refuses a state that would not fit,
// naming the map (ErrMapFull).
type MapSizes struct {
	Services, Slots, Backends, RevNAT uint32
}

// LoadOptions control Load. The zero value loads fresh, unpinned maps.
type LoadOptions struct {
	// PinDir, when not empty, is a directory on a bpffs. Maps already
	// pinned there are adopted; maps that are not are created and pinned
	// there. The directory is created if needed.
	PinDir string
	// Sizes of maps that are created (not adopted).
	Sizes MapSizes
}

// Objects are the loaded programs and their maps.
type Objects struct {
	Services *ServiceMap
	Slots    *SlotMap
	Backends *BackendMap
	RevNAT   *RevNATMap

	Connect4     *ebpf.Program
	Sendmsg4     *ebpf.Program
	Recvmsg4     *ebpf.Program
	Getpeername4 *ebpf.Program

	// Adopted lists the maps (by name) that were taken over from pins.
	Adopted []string

	objs socklbObjects
}

// mapNames are the maps of the object, which are also their pin names.
var mapNames = []string{socklbMapTrellisSvc4, socklbMapTrellisSlot4, socklbMapTrellisBe4, socklbMapTrellisRev4, socklbMapTrellisConn4}

// Load loads the programs into the kernel, creating their maps or adopting
// the ones pinned in opts.PinDir. Nothing is attached yet.
func Load(opts LoadOptions) (_ *Objects, err error) {
	// A no-op on kernels that account BPF memory to the cgroup (5.11+).
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("bpf: load: %w", err)
	}
	spec, err := loadSocklb()
	if err != nil {
		return nil, fmt.Errorf("bpf: load: %w", err)
	}
	for name, size := range map[string]uint32{
		socklbMapTrellisSvc4:  opts.Sizes.Services,
		socklbMapTrellisSlot4: opts.Sizes.Slots,
		socklbMapTrellisBe4:   opts.Sizes.Backends,
		socklbMapTrellisRev4:  opts.Sizes.RevNAT,
	} {
		if size != 0 {
			spec.Maps[name].MaxEntries = size
		}
	}

	replacements := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range replacements {
			m.Close() // LoadAndAssign cloned them.
		}
	}()
	if opts.PinDir != "" {
		if err := os.MkdirAll(opts.PinDir, 0o700); err != nil {
			return nil, fmt.Errorf("bpf: load: create pin dir: %w", err)
		}
		for _, name := range mapNames {
			path := filepath.Join(opts.PinDir, name)
			m, err := ebpf.LoadPinnedMap(path, nil)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("bpf: load: adopt pinned map %s: %w", path, err)
			}
			ms := spec.Maps[name]
			if name != socklbMapTrellisConn4 { // fixed size: must match
				ms.MaxEntries = m.MaxEntries()
			}
			if err := ms.Compatible(m); err != nil {
				m.Close()
				return nil, fmt.Errorf("bpf: load: adopt pinned map %s: %w (pinned by an incompatible version: run Uninstall on %s)", path, err, opts.PinDir)
			}
			replacements[name] = m
		}
	}

	o := &Objects{}
	if err := spec.LoadAndAssign(&o.objs, &ebpf.CollectionOptions{MapReplacements: replacements}); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("bpf: load programs: %+v", verr)
		}
		return nil, fmt.Errorf("bpf: load programs: %w", err)
	}
	defer func() {
		if err != nil {
			o.Close()
		}
	}()
	o.Services = newServiceMap(o.objs.TrellisSvc4)
	o.Slots = newSlotMap(o.objs.TrellisSlot4)
	o.Backends = newBackendMap(o.objs.TrellisBe4)
	o.RevNAT = newRevNATMap(o.objs.TrellisRev4)
	o.Connect4 = o.objs.TrellisConnect4
	o.Sendmsg4 = o.objs.TrellisSendmsg4
	o.Recvmsg4 = o.objs.TrellisRecvmsg4
	o.Getpeername4 = o.objs.TrellisGetpeername4

	if opts.PinDir != "" {
		for _, name := range mapNames {
			if _, ok := replacements[name]; ok {
				o.Adopted = append(o.Adopted, name)
				continue
			}
			path := filepath.Join(opts.PinDir, name)
			if err := o.mapByName(name).Pin(path); err != nil {
				return nil, fmt.Errorf("bpf: load: pin map: %w", err)
			}
		}
	}
	return o, nil
}

func (o *Objects) mapByName(name string) *ebpf.Map {
	switch name {
	case socklbMapTrellisSvc4:
		return o.objs.TrellisSvc4
	case socklbMapTrellisSlot4:
		return o.objs.TrellisSlot4
	case socklbMapTrellisBe4:
		return o.objs.TrellisBe4
	case socklbMapTrellisRev4:
		return o.objs.TrellisRev4
	case socklbMapTrellisConn4:
		return o.objs.TrellisConn4
	}
	return nil
}

// Close releases the programs and maps. Pinned maps, and programs held by
// pinned links, stay in the kernel. Close on nil Objects is fine.
func (o *Objects) Close() error {
	if o == nil {
		return nil
	}
	err := o.objs.Close()
	o.objs = socklbObjects{}
	return err
}

// hook is one attach point of the load balancer.
type hook struct {
	name   string // also the link's pin name, "link_" + name
	attach ebpf.AttachType
	prog   func(*Objects) *ebpf.Program
	link   func(*Links) *link.Link
}

var hooks = []hook{
	{"connect4", ebpf.AttachCGroupInet4Connect,
		func(o *Objects) *ebpf.Program { return o.Connect4 }, func(l *Links) *link.Link { return &l.Connect4 }},
	{"sendmsg4", ebpf.AttachCGroupUDP4Sendmsg,
		func(o *Objects) *ebpf.Program { return o.Sendmsg4 }, func(l *Links) *link.Link { return &l.Sendmsg4 }},
	{"recvmsg4", ebpf.AttachCGroupUDP4Recvmsg,
		func(o *Objects) *ebpf.Program { return o.Recvmsg4 }, func(l *Links) *link.Link { return &l.Recvmsg4 }},
	{"getpeername4", ebpf.AttachCgroupInet4GetPeername,
		func(o *Objects) *ebpf.Program { return o.Getpeername4 }, func(l *Links) *link.Link { return &l.Getpeername4 }},
}

func linkPinPath(dir string, h hook) string { return filepath.Join(dir, "link_"+h.name) }

// Links are the four programs attached to one cgroup.
type Links struct {
	Connect4     link.Link
	Sendmsg4     link.Link
	Recvmsg4     link.Link
	Getpeername4 link.Link
}

// AttachCgroup attaches the four programs to the cgroup v2 directory
// cgroupPath (multi-attach links: other programs on the cgroup stay). They
// translate for every process in that cgroup and its descendants. The
// links detach when closed, unless pinned first (Links.Pin).
func (o *Objects) AttachCgroup(cgroupPath string) (_ *Links, err error) {
	l := &Links{}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	for _, h := range hooks {
		lk, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupPath, Attach: h.attach, Program: h.prog(o)})
		if err != nil {
			return nil, fmt.Errorf("bpf: attach %s to cgroup %s: %w", h.name, cgroupPath, err)
		}
		*h.link(l) = lk
	}
	return l, nil
}

// Pin pins the links as dir/link_<hook>, so they stay attached after Close.
func (l *Links) Pin(dir string) error {
	for _, h := range hooks {
		lk := *h.link(l)
		if lk == nil {
			continue
		}
		if err := lk.Pin(linkPinPath(dir, h)); err != nil {
			return fmt.Errorf("bpf: pin %s link: %w", h.name, err)
		}
	}
	return nil
}

// Close releases the links. A link that is not pinned detaches. Close on
// nil Links is fine.
func (l *Links) Close() error {
	if l == nil {
		return nil
	}
	var errs []error
	for _, h := range hooks {
		p := h.link(l)
		if *p == nil {
			continue
		}
		if err := (*p).Close(); err != nil {
			errs = append(errs, fmt.Errorf("bpf: close %s link: %w", h.name, err))
		}
		*p = nil
	}
	return errors.Join(errs...)
}
