package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/trellis-mesh/trellis/clustermesh"
	"github.com/trellis-mesh/trellis/encryption/ipsec"
)

// The IPsec half of the encryption step (encryption/ipsec does the xfrm
// work). IPsec changes no route: the xfrm policies catch pod-to-pod
// traffic between this node's and each peer's pod CIDRs, whatever path the
// tunnel routes it on. A peer runs IPsec when it publishes a key index.
//
// Rotation: the key file (the same on every node) gains an index; this
// node sends under the file's current index and publishes it, and keeps
// accepting the index it used before for ipsecGrace, so a peer that has
// not read the new file yet is still understood.

// ipsecGrace is how long a replaced key index is still accepted inbound.
const ipsecGrace = 5 * time.Minute

// ipsecState is what the encryption step keeps of IPsec.
type ipsecState struct {
	keyFile string
	mgr     *ipsec.Manager
	used    bool                // objects may be installed (Cleanup on off)
	index   uint8               // the index this node sends with
	retired map[uint8]time.Time // earlier indexes, accepted until then
}

// ipsecOn runs IPsec for snap and returns the key index to publish.
func (e *encryptor) ipsecOn(ctx context.Context, snap *clustermesh.Snapshot) (uint8, error) {
	s := &e.ipsec
	if s.mgr == nil {
		// New checks the kernel: on one without ESP it names the options.
		// First, because no key file can make up for the kernel.
		m, err := ipsec.New(ipsec.Config{Logger: e.log})
		if err != nil {
			return 0, err
		}
		s.mgr = m
	}
	if s.keyFile == "" {
		return 0, errors.New("ipsec: the agent has no --ipsec-key-file (the pre-shared key file, the same on every node)")
	}
	keys, err := ipsec.LoadKeys(s.keyFile, e.log)
	if err != nil {
		return s.index, err
	}
	now := e.now()
	if cur := keys.Current(); cur != s.index {
		if s.index != 0 {
			if s.retired == nil {
				s.retired = make(map[uint8]time.Time)
			}
			s.retired[s.index] = now.Add(ipsecGrace)
			e.log.Info("ipsec key index rotated", "from", s.index, "to", cur)
		}
		s.index = cur
	}
	var accept []uint8
	for i, until := range s.retired {
		if now.After(until) || !keys.Has(i) {
			delete(s.retired, i)
			continue
		}
		accept = append(accept, i)
	}
	slices.Sort(accept)

	self := snap.Nodes[e.node.cluster][e.node.name]
	if self == nil || len(self.IPs) == 0 {
		return s.index, errors.New("ipsec: this node is not in the mesh's state yet (not registered?)")
	}
	local := ipsec.Node{Name: e.node.String(), IP: self.IPs[0], PodCIDRs: self.PodCIDRs, KeyIndex: s.index}
	var peers []ipsec.Node
	for cluster, nodes := range snap.Nodes {
		for name, n := range nodes {
			ref := nodeRef{cluster, name}
			if ref == e.node || n.IPsecKeyIndex == 0 || len(n.IPs) == 0 {
				continue
			}
			peers = append(peers, ipsec.Node{Name: ref.String(), IP: n.IPs[0], PodCIDRs: n.PodCIDRs, KeyIndex: n.IPsecKeyIndex})
		}
	}
	desired := ipsec.Plan(local, peers, keys, ipsec.PlanOptions{Accept: accept})
	for _, p := range desired.Problems {
		e.log.Warn("ipsec: a peer is left out", "err", p)
	}
	s.used = true
	if err := s.mgr.Apply(ctx, desired); err != nil {
		return s.index, err
	}
	return s.index, nil
}

// ipsecOff removes what IPsec installed, if anything.
func (e *encryptor) ipsecOff(ctx context.Context) error {
	s := &e.ipsec
	s.index, s.retired = 0, nil
	if !s.used {
		return nil
	}
	m := s.mgr
	if m == nil {
		var err error
		if m, err = ipsec.Open(ipsec.Config{Logger: e.log}); err != nil {
			return err
		}
		defer m.Close()
	}
	if err := m.Cleanup(ctx); err != nil {
		return fmt.Errorf("ipsec: remove the xfrm states and policies: %w", err)
	}
	s.used = false
	return nil
}

// ipsecPeers lists the pod CIDRs of the peers running IPsec, for strict.
func (e *encryptor) ipsecPeers(snap *clustermesh.Snapshot) []netip.Prefix {
	var out []netip.Prefix
	for cluster, nodes := range snap.Nodes {
		for name, n := range nodes {
			if (nodeRef{cluster, name}) != e.node && n.IPsecKeyIndex != 0 {
				out = append(out, n.PodCIDRs...)
			}
		}
	}
	return out
}

func (s *ipsecState) close() error {
	if s.mgr == nil {
		return nil
	}
	return s.mgr.Close()
}
