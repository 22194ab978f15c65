package k8s

import (
	"fmt"
	"reflect"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
)

// syncNode publishes the node key.name as the cache has it (see
// nodeFromK8s) and unpublishes it when it is gone or has no InternalIP. It
// writes to the sink only when the node changed; a refusal is reported and
// not retried.
func (s *Source) syncNode(key objectKey) error {
	obj := key.String()
	n, err := s.nodeList.Get(key.name)
	if apierrors.IsNotFound(err) {
		s.unpublishNode(key.name)
		s.forget(obj)
		return nil
	}
	if err != nil {
		return fmt.Errorf("get %s: %w", obj, err)
	}
	node, skipped, err := nodeFromK8s(s.cfg.Cluster, s.cfg.Region, s.cfg.Zone, n)
	s.reportList(obj, ProblemUnparsable, skipped)
	if err != nil {
		s.report(obj, ProblemNodeWithoutInternalIP, err.Error())
		s.unpublishNode(key.name)
		return nil
	}
	s.clear(obj, ProblemNodeWithoutInternalIP)

	s.mu.Lock()
	prev, ok := s.nodes[key.name]
	s.mu.Unlock()
	if ok && reflect.DeepEqual(prev, node) {
		return nil
	}
	if err := s.cfg.Sink.UpsertNode(node); err != nil {
		s.report(obj, ProblemSinkRefused, err.Error())
		return nil
	}
	s.clear(obj, ProblemSinkRefused)
	s.mu.Lock()
	s.nodes[key.name] = node
	s.mu.Unlock()
	s.log.Debug("published node", "node", node.Name, "ips", node.IPs, "podCIDRs", node.PodCIDRs)
	return nil
}

// unpublishNode deletes a node this source published. When the sink
// refuses, the record stays, so that a later sync (a resync) tries again.
func (s *Source) unpublishNode(name string) {
	s.mu.Lock()
	_, ok := s.nodes[name]
	s.mu.Unlock()
	if !ok {
		return
	}
	if err := s.cfg.Sink.DeleteNode(name); err != nil {
		// Keep the record: a later sync (resync) tries again.
		s.report("node "+name, ProblemSinkRefused, "delete: "+err.Error())
		return
	}
	s.mu.Lock()
	delete(s.nodes, name)
	s.mu.Unlock()
	s.log.Debug("deleted node", "node", name)
}
