package k8s

import (
	"context"
	"fmt"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// The work queue: its keys, the event handlers that fill it, the initial
// publication (which decides when each kind's Synced is called) and the
// worker loop that drains it.

// kind is what a queue key refers to.
type kind uint8

const (
	kindNode kind = iota + 1
	kindService
	kindPod
)

// String names the kind in logs: "node", "service" or "pod".
func (k kind) String() string {
	switch k {
	case kindNode:
		return "node"
	case kindService:
		return "service"
	case kindPod:
		return "pod"
	}
	return "unknown"
}

// syncedKinds are the sink kinds a source kind feeds, in the order their
// Synced calls are made.
func (k kind) syncedKinds() []v1.Kind {
	switch k {
	case kindNode:
		return []v1.Kind{v1.KindNodes}
	case kindService:
		return []v1.Kind{v1.KindServices}
	case kindPod:
		return []v1.Kind{v1.KindIdentities, v1.KindEndpoints}
	}
	return nil
}

// objectKey is a workqueue key: one Kubernetes object. EndpointSlices are
// queued as their Service.
type objectKey struct {
	kind      kind
	namespace string
	name      string
}

// String is the key as logs and problem reports name it: the kind, then
// the namespace/name.
func (k objectKey) String() string {
	if k.namespace == "" {
		return k.kind.String() + " " + k.name
	}
	return k.kind.String() + " " + k.namespace + "/" + k.name
}

// startInitialSync records every object in the caches as pending for its
// kind and queues it. Kinds with no objects are synced at once.
func (s *Source) startInitialSync() error {
	pending := map[kind]map[objectKey]struct{}{kindNode: {}, kindService: {}, kindPod: {}}
	nodes, err := s.nodeList.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("k8s source: cluster %s: list nodes: %w", s.cfg.Cluster, err)
	}
	for _, n := range nodes {
		pending[kindNode][objectKey{kind: kindNode, name: n.Name}] = struct{}{}
	}
	svcs, err := s.serviceList.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("k8s source: cluster %s: list services: %w", s.cfg.Cluster, err)
	}
	for _, o := range svcs {
		pending[kindService][objectKey{kind: kindService, namespace: o.Namespace, name: o.Name}] = struct{}{}
	}
	pods, err := s.podList.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("k8s source: cluster %s: list pods: %w", s.cfg.Cluster, err)
	}
	for _, o := range pods {
		pending[kindPod][objectKey{kind: kindPod, namespace: o.Namespace, name: o.Name}] = struct{}{}
	}
	s.log.Info("initial publication", "nodes", len(nodes), "services", len(svcs), "pods", len(pods))

	var done []kind
	s.mu.Lock()
	s.pending = map[kind]map[objectKey]struct{}{}
	for _, k := range []kind{kindNode, kindService, kindPod} {
		if len(pending[k]) == 0 {
			done = append(done, k)
			continue
		}
		s.pending[k] = pending[k]
	}
	s.mu.Unlock()
	for _, k := range done {
		s.signalSynced(k)
	}
	// The handlers have queued (or are about to queue) all of these; adding
	// them again is free and makes the pending sets certain to drain.
	for _, set := range pending {
		for key := range set {
			s.queue.Add(key)
		}
	}
	return nil
}

// initialDone marks key as processed for the initial publication.
func (s *Source) initialDone(key objectKey) {
	s.mu.Lock()
	set, ok := s.pending[key.kind]
	fire := false
	if ok {
		if _, in := set[key]; in {
			delete(set, key)
			if len(set) == 0 {
				delete(s.pending, key.kind)
				fire = true
			}
		}
	}
	s.mu.Unlock()
	if fire {
		s.signalSynced(key.kind)
	}
}

// signalSynced tells the sink that the initial state of every sink kind
// that source kind k feeds has been delivered.
func (s *Source) signalSynced(k kind) {
	for _, sk := range k.syncedKinds() {
		s.cfg.Sink.Synced(sk)
		s.log.Info("initial state delivered", "kind", sk)
	}
}

// processNext handles one key, sample-controller style. It returns false
// once the queue is shut down.
func (s *Source) processNext(ctx context.Context) bool {
	key, quit := s.queue.Get()
	if quit {
		return false
	}
	defer s.queue.Done(key)
	err := s.sync(ctx, key)
	if err == nil {
		s.queue.Forget(key)
		s.initialDone(key)
		return true
	}
	if ctx.Err() != nil {
		return true // shutting down; the queue stops next
	}
	attempt := s.queue.NumRequeues(key) + 1
	s.log.Warn("sync failed; will retry", "object", key.String(), "attempt", attempt, "error", err)
	s.pmu.Lock()
	s.stats.Retries++
	s.pmu.Unlock()
	s.cfg.Metrics.retry()
	if attempt >= maxInitialAttempts {
		s.initialDone(key)
	}
	s.queue.AddRateLimited(key)
	return true
}

// sync hands key to its kind's sync function. An error is transient
// (identity allocation): processNext retries the key with backoff.
// Problems the source cannot fix by retrying are reported, not returned.
func (s *Source) sync(ctx context.Context, key objectKey) error {
	switch key.kind {
	case kindNode:
		return s.syncNode(key)
	case kindService:
		return s.syncService(key)
	case kindPod:
		return s.syncPod(ctx, key)
	}
	return nil
}

// objectHandler queues the object itself.
func (s *Source) objectHandler(k kind) cache.ResourceEventHandler {
	add := func(obj any) {
		if key, ok := keyOf(k, obj); ok {
			s.queue.Add(key)
		}
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    add,
		UpdateFunc: func(_, obj any) { add(obj) },
		DeleteFunc: add,
	}
}

// sliceHandler queues the Service an EndpointSlice belongs to (both of
// them, when an update moves the slice).
func (s *Source) sliceHandler() cache.ResourceEventHandler {
	add := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		es, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok {
			return
		}
		if name := es.Labels[LabelServiceName]; name != "" {
			s.queue.Add(objectKey{kind: kindService, namespace: es.Namespace, name: name})
		}
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc: add,
		UpdateFunc: func(old, obj any) {
			add(old)
			add(obj)
		},
		DeleteFunc: add,
	}
}

// keyOf is the queue key of an object of kind k, also for the tombstone an
// informer hands over for a delete it saw only in a relist
// (cache.DeletedFinalStateUnknown).
func keyOf(k kind, obj any) (objectKey, bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		if m, ok := t.Obj.(metav1.Object); ok {
			return objectKey{kind: k, namespace: m.GetNamespace(), name: m.GetName()}, true
		}
		ns, name, err := cache.SplitMetaNamespaceKey(t.Key)
		if err != nil {
			return objectKey{}, false
		}
		return objectKey{kind: k, namespace: ns, name: name}, true
	}
	m, ok := obj.(metav1.Object)
	if !ok {
		return objectKey{}, false
	}
	return objectKey{kind: k, namespace: m.GetNamespace(), name: m.GetName()}, true
}
