package k8s

import (
	"errors"
	"fmt"
	"reflect"

	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/trellis-mesh/trellis/apiserver/source"
)

// syncService publishes a global Service with the backends of its
// EndpointSlices (see serviceFromK8s), and unpublishes it when it is
// deleted or no longer global. It writes to the sink only when the service
// changed; a refusal is reported and not retried.
func (s *Source) syncService(key objectKey) error {
	obj := key.String()
	svc, err := s.serviceList.Services(key.namespace).Get(key.name)
	if apierrors.IsNotFound(err) {
		s.unpublishService(key)
		s.forget(obj)
		return nil
	}
	if err != nil {
		return fmt.Errorf("get %s: %w", obj, err)
	}
	opts, errs := source.ParseAnnotations(svc.Annotations)
	if len(errs) > 0 {
		s.report(obj, ProblemMalformedAnnotation, errors.Join(errs...).Error())
	} else {
		s.clear(obj, ProblemMalformedAnnotation)
	}
	if !opts.Global {
		s.unpublishService(key)
		s.clear(obj, ProblemUnparsable, ProblemSinkRefused)
		return nil
	}

	items, err := s.sliceIndexer.ByIndex(serviceIndex, key.namespace+"/"+key.name)
	if err != nil {
		return fmt.Errorf("list endpointslices of %s: %w", obj, err)
	}
	eps := make([]*discoveryv1.EndpointSlice, 0, len(items))
	for _, it := range items {
		if es, ok := it.(*discoveryv1.EndpointSlice); ok {
			eps = append(eps, es)
		}
	}
	out, skipped := serviceFromK8s(s.cfg.Cluster, opts, svc, eps)
	s.reportList(obj, ProblemUnparsable, skipped)
	s.markUnhealthy(&out)

	s.mu.Lock()
	prev, ok := s.services[key]
	s.mu.Unlock()
	if ok && reflect.DeepEqual(prev, out) {
		return nil
	}
	if err := s.cfg.Sink.UpsertService(out); err != nil {
		s.report(obj, ProblemSinkRefused, err.Error())
		return nil
	}
	s.clear(obj, ProblemSinkRefused)
	s.mu.Lock()
	s.services[key] = out
	s.mu.Unlock()
	s.log.Debug("published service", "service", key.namespace+"/"+key.name,
		"backends", len(out.Backends), "shared", out.Shared, "affinity", out.Affinity)
	return nil
}

// unpublishService deletes a service this source published. When the sink
// refuses, the record stays, so that a later sync (a resync) tries again.
func (s *Source) unpublishService(key objectKey) {
	s.mu.Lock()
	_, ok := s.services[key]
	s.mu.Unlock()
	if !ok {
		return
	}
	if err := s.cfg.Sink.DeleteService(key.namespace, key.name); err != nil {
		s.report(key.String(), ProblemSinkRefused, "delete: "+err.Error())
		return
	}
	s.mu.Lock()
	delete(s.services, key)
	s.mu.Unlock()
	s.log.Debug("deleted service", "service", key.namespace+"/"+key.name)
}
