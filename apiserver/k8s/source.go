package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
)

// Defaults and limits.
const (
	// DefaultResyncPeriod is how often the informers replay every object
	// when Config.ResyncPeriod is zero.
	DefaultResyncPeriod = 10 * time.Minute
	// DefaultWorkers is the number of keys processed in parallel when
	// Config.Workers is zero.
	DefaultWorkers = 4

	// Per-key backoff after a transient error, and the overall bucket, as in
	// kubernetes/sample-controller (with a lower ceiling).
	retryBaseDelay = 5 * time.Millisecond
	retryMaxDelay  = 5 * time.Minute
	queueQPS       = 50
	queueBurst     = 300
	// maxInitialAttempts: after this many failed attempts (about 5 s of
	// backoff) a key stops holding up its kind's Synced call.
	maxInitialAttempts = 10

	// serviceIndex indexes EndpointSlices by "<namespace>/<service>".
	serviceIndex = "trellis-service"
)

// Config configures a Kubernetes source. Client, Cluster, ClusterID, Sink
// and Identities are required.
type Config struct {
	// Client talks to the cluster's Kubernetes API server; see BuildClient.
	Client kubernetes.Interface
	// Cluster is the mesh cluster name written into every object.
	Cluster string
	// ClusterID is the cluster's ID; every identity the allocator returns
	// must carry it in its cluster bits.
	ClusterID v1.ClusterID
	// Region and Zone are used for nodes without topology labels.
	Region, Zone string
	// Sink receives nodes, endpoints and services.
	Sink source.Sink
	// Identities allocates pod identities.
	Identities source.IdentityAllocator
	// Logger receives the source's logs; nil discards them.
	Logger *slog.Logger
	// ResyncPeriod is how often every object is processed again, which
	// repairs drift and retries objects the sink refused (silently). Zero
	// means DefaultResyncPeriod; negative disables it.
	ResyncPeriod time.Duration
	// Workers is the number of objects processed in parallel; zero means
	// DefaultWorkers.
	Workers int
	// Metrics, when set, counts problems and retries.
	Metrics *Metrics
}

// Source publishes a Kubernetes cluster's nodes, pod endpoints, pod
// identities and global services to a Sink. Create it with New and run it
// with Run.
type Source struct {
	cfg     Config
	log     *slog.Logger
	running atomic.Bool

	// Set by Run before the workers start; read-only afterwards.
	queue        workqueue.TypedRateLimitingInterface[objectKey]
	serviceList  corelisters.ServiceLister
	sliceIndexer cache.Indexer
	nodeList     corelisters.NodeLister
	podList      corelisters.PodLister

	// mu guards the published state below. Sink endpoint calls are made
	// with mu held (see setEndpoints); other sink and allocator calls are
	// not.
	mu        sync.Mutex
	nodes     map[string]v1.Node
	services  map[objectKey]v1.Service
	pods      map[objectKey]*podState
	endpoints map[netip.Addr]endpointRecord
	claims    map[netip.Addr][]objectKey
	// pending holds, per kind, the keys the initial publication still
	// waits for. A kind is absent once its Synced has been called.
	pending map[kind]map[objectKey]struct{}

	// pmu guards problem bookkeeping; it may be taken with mu held.
	pmu      sync.Mutex
	reported map[string]map[Problem]string
	stats    Stats
}

// kind is what a queue key refers to.
type kind uint8

const (
	kindNode kind = iota + 1
	kindService
	kindPod
)

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

func (k objectKey) String() string {
	if k.namespace == "" {
		return k.kind.String() + " " + k.name
	}
	return k.kind.String() + " " + k.namespace + "/" + k.name
}

// podState is what the source holds for one pod.
type podState struct {
	// labels and id: the identity the pod holds a reference on; labels is
	// nil when it holds none.
	labels map[string]string
	id     v1.NumericIdentity
	// endpoints are the pod's desired endpoints (its claims on IPs); the
	// sink holds the ones recorded in Source.endpoints with this pod as
	// owner. Written with Source.mu held.
	endpoints map[netip.Addr]v1.Endpoint
	// release are label sets whose reference is still to be dropped
	// (after a label change or deletion, or a failed Release).
	release []map[string]string
}

func (p *podState) empty() bool {
	return p.labels == nil && len(p.endpoints) == 0 && len(p.release) == 0
}

// endpointRecord is an endpoint the sink holds and the pod that put it there.
type endpointRecord struct {
	owner objectKey
	ep    v1.Endpoint
}

// New checks cfg and returns a Source; it starts nothing.
func New(cfg Config) (*Source, error) {
	switch {
	case cfg.Client == nil:
		return nil, errors.New("k8s source: Config.Client is required")
	case cfg.Sink == nil:
		return nil, errors.New("k8s source: Config.Sink is required")
	case cfg.Identities == nil:
		return nil, errors.New("k8s source: Config.Identities is required")
	}
	if err := v1.ValidateClusterName(cfg.Cluster); err != nil {
		return nil, fmt.Errorf("k8s source: cluster %q: %w", cfg.Cluster, err)
	}
	if err := v1.ValidateClusterID(cfg.ClusterID); err != nil {
		return nil, fmt.Errorf("k8s source: cluster %s: %w", cfg.Cluster, err)
	}
	if cfg.Workers < 0 {
		return nil, fmt.Errorf("k8s source: cluster %s: Workers is %d; want 0 (default) or more", cfg.Cluster, cfg.Workers)
	}
	if cfg.Workers == 0 {
		cfg.Workers = DefaultWorkers
	}
	switch {
	case cfg.ResyncPeriod == 0:
		cfg.ResyncPeriod = DefaultResyncPeriod
	case cfg.ResyncPeriod < 0:
		cfg.ResyncPeriod = 0
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Source{
		cfg:       cfg,
		log:       log.With("source", "kubernetes", "cluster", cfg.Cluster),
		nodes:     map[string]v1.Node{},
		services:  map[objectKey]v1.Service{},
		pods:      map[objectKey]*podState{},
		endpoints: map[netip.Addr]endpointRecord{},
		claims:    map[netip.Addr][]objectKey{},
		reported:  map[string]map[Problem]string{},
		stats:     Stats{Problems: map[Problem]int{}},
	}, nil
}

// Stats returns a snapshot of the source's counters.
func (s *Source) Stats() Stats {
	s.pmu.Lock()
	defer s.pmu.Unlock()
	return s.stats.clone()
}

// Run starts the informers, publishes the initial state of every kind
// (calling Sink.Synced for each), then follows changes until ctx ends. It
// returns nil when ctx ends, after every goroutine it started has stopped,
// and an error if it cannot start. Run may be called once.
func (s *Source) Run(ctx context.Context) error {
	if !s.running.CompareAndSwap(false, true) {
		return fmt.Errorf("k8s source: cluster %s: Run called twice", s.cfg.Cluster)
	}
	factory := informers.NewSharedInformerFactoryWithOptions(s.cfg.Client, s.cfg.ResyncPeriod,
		informers.WithTransform(slim))
	defer factory.Shutdown() // waits for the informer goroutines

	services := factory.Core().V1().Services()
	slicesInf := factory.Discovery().V1().EndpointSlices()
	nodes := factory.Core().V1().Nodes()
	pods := factory.Core().V1().Pods()
	if err := slicesInf.Informer().AddIndexers(cache.Indexers{serviceIndex: sliceServiceIndex}); err != nil {
		return fmt.Errorf("k8s source: cluster %s: index endpointslices by service: %w", s.cfg.Cluster, err)
	}
	s.serviceList = services.Lister()
	s.sliceIndexer = slicesInf.Informer().GetIndexer()
	s.nodeList = nodes.Lister()
	s.podList = pods.Lister()
	s.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedMaxOfRateLimiter(
			workqueue.NewTypedItemExponentialFailureRateLimiter[objectKey](retryBaseDelay, retryMaxDelay),
			&workqueue.TypedBucketRateLimiter[objectKey]{Limiter: rate.NewLimiter(rate.Limit(queueQPS), queueBurst)},
		),
		workqueue.TypedRateLimitingQueueConfig[objectKey]{},
	)
	defer s.queue.ShutDown()

	var synced []cache.InformerSynced
	for _, h := range []struct {
		what     string
		informer cache.SharedIndexInformer
		handler  cache.ResourceEventHandler
	}{
		{"services", services.Informer(), s.objectHandler(kindService)},
		{"endpointslices", slicesInf.Informer(), s.sliceHandler()},
		{"nodes", nodes.Informer(), s.objectHandler(kindNode)},
		{"pods", pods.Informer(), s.objectHandler(kindPod)},
	} {
		reg, err := h.informer.AddEventHandler(h.handler)
		if err != nil {
			return fmt.Errorf("k8s source: cluster %s: watch %s: %w", s.cfg.Cluster, h.what, err)
		}
		synced = append(synced, reg.HasSynced)
	}

	start := time.Now()
	factory.Start(ctx.Done())
	s.log.Info("waiting for informer caches")
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil // ctx ended
	}
	s.log.Info("informer caches synced", "took", time.Since(start).Round(time.Millisecond))
	if err := s.startInitialSync(); err != nil {
		return err
	}

	var wg sync.WaitGroup
	for range s.cfg.Workers {
		wg.Go(func() {
			for s.processNext(ctx) {
			}
		})
	}
	<-ctx.Done()
	s.queue.ShutDown()
	wg.Wait()
	return nil
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

// ---- nodes ----

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

// ---- services ----

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

// ---- pods: identities and endpoints ----

func (s *Source) syncPod(ctx context.Context, key objectKey) error {
	obj := key.String()
	pod, err := s.podList.Pods(key.namespace).Get(key.name)
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("get %s: %w", obj, err)
	}
	var info podInfo
	var idLabels map[string]string
	if err == nil {
		info = podFromK8s(pod)
		if info.noHostIP {
			s.report(obj, ProblemPodWithoutHostIP, info.why)
		} else {
			s.clear(obj, ProblemPodWithoutHostIP)
		}
		if info.eligible {
			idLabels = IdentityLabels(key.namespace, pod.Labels)
			if len(idLabels) > v1.MaxIdentityLabels {
				s.report(obj, ProblemTooManyLabels, fmt.Sprintf("%d identity labels; at most %d allowed", len(idLabels), v1.MaxIdentityLabels))
				info.eligible = false
			} else {
				s.clear(obj, ProblemTooManyLabels)
			}
		}
	}

	s.mu.Lock()
	st := s.pods[key]
	if st == nil {
		if !info.eligible {
			s.mu.Unlock()
			if pod == nil {
				s.forget(obj)
			}
			return nil
		}
		st = &podState{}
		s.pods[key] = st
	}
	s.mu.Unlock()

	if info.eligible && (st.labels == nil || !maps.Equal(idLabels, st.labels)) {
		id, err := s.cfg.Identities.Acquire(ctx, idLabels)
		switch {
		case err != nil && errors.Is(err, v1.ErrInvalid):
			s.report(obj, ProblemIdentityRefused, err.Error())
			info.eligible = false
		case err != nil:
			return fmt.Errorf("acquire identity for %s: %w", obj, err)
		case id.ClusterID() != s.cfg.ClusterID:
			s.report(obj, ProblemIdentityRefused, fmt.Sprintf("allocator returned identity %s of cluster ID %d; want cluster ID %d", id, id.ClusterID(), s.cfg.ClusterID))
			st.release = append(st.release, idLabels)
			info.eligible = false
		default:
			s.clear(obj, ProblemIdentityRefused)
			if st.labels != nil {
				st.release = append(st.release, st.labels)
			}
			st.labels, st.id = idLabels, id
			s.log.Debug("pod identity", "pod", key.namespace+"/"+key.name, "identity", id)
		}
	}

	var desired map[netip.Addr]v1.Endpoint
	if info.eligible {
		desired = make(map[netip.Addr]v1.Endpoint, len(info.ips))
		for _, ip := range info.ips {
			desired[ip] = v1.Endpoint{
				Cluster:   s.cfg.Cluster,
				IP:        ip,
				Identity:  st.id,
				NodeIP:    info.hostIP,
				Namespace: key.namespace,
				Pod:       key.name,
				Ready:     info.ready,
			}
		}
	} else if st.labels != nil {
		st.release = append(st.release, st.labels)
		st.labels, st.id = nil, 0
	}
	// New endpoints (with a new identity) first, then drop old references:
	// make before break.
	s.setEndpoints(key, st, desired)
	if err := s.releaseAll(ctx, key, st); err != nil {
		return err
	}
	if st.empty() {
		s.mu.Lock()
		delete(s.pods, key)
		s.mu.Unlock()
		if pod == nil {
			s.forget(obj)
		}
	}
	return nil
}

// releaseAll drops the identity references st still owes.
func (s *Source) releaseAll(ctx context.Context, key objectKey, st *podState) error {
	for len(st.release) > 0 {
		if err := s.cfg.Identities.Release(ctx, st.release[0]); err != nil {
			return fmt.Errorf("release identity of %s: %w", key, err)
		}
		st.release = st.release[1:]
	}
	st.release = nil
	return nil
}

// setEndpoints makes desired the endpoints of pod key and converges the sink.
// An IP claimed by two pods (a new pod reusing the IP of one not yet gone)
// belongs to the pod that published it last; when its owner lets it go, it
// passes to the newest remaining claimant instead of being deleted.
func (s *Source) setEndpoints(key objectKey, st *podState, desired map[netip.Addr]v1.Endpoint) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := st.endpoints
	st.endpoints = desired

	for _, ip := range slices.SortedFunc(maps.Keys(desired), netip.Addr.Compare) {
		ep := desired[ip]
		if !slices.Contains(s.claims[ip], key) {
			s.claims[ip] = append(s.claims[ip], key)
		}
		if rec, ok := s.endpoints[ip]; ok && rec.owner == key && rec.ep == ep {
			continue
		}
		s.upsertEndpointLocked(key, ep)
	}
	for _, ip := range slices.SortedFunc(maps.Keys(old), netip.Addr.Compare) {
		if _, ok := desired[ip]; ok {
			continue
		}
		s.claims[ip] = slices.DeleteFunc(s.claims[ip], func(k objectKey) bool { return k == key })
		if len(s.claims[ip]) == 0 {
			delete(s.claims, ip)
		}
		s.clear("endpoint "+ip.String(), ProblemSinkRefused)
		rec, ok := s.endpoints[ip]
		if !ok || rec.owner != key {
			continue
		}
		if handedOver := s.handOverLocked(ip); handedOver {
			continue
		}
		if err := s.cfg.Sink.DeleteEndpoint(ip); err != nil {
			s.report("endpoint "+ip.String(), ProblemSinkRefused, "delete: "+err.Error())
		}
		delete(s.endpoints, ip)
	}
}

// handOverLocked publishes the newest remaining claimant of ip, if any.
func (s *Source) handOverLocked(ip netip.Addr) bool {
	claims := s.claims[ip]
	for i := len(claims) - 1; i >= 0; i-- {
		other := s.pods[claims[i]]
		if other == nil {
			continue
		}
		if ep, ok := other.endpoints[ip]; ok && s.upsertEndpointLocked(claims[i], ep) {
			return true
		}
	}
	return false
}

// upsertEndpointLocked publishes ep for pod key; mu is held.
func (s *Source) upsertEndpointLocked(key objectKey, ep v1.Endpoint) bool {
	obj := "endpoint " + ep.IP.String()
	if err := s.cfg.Sink.UpsertEndpoint(ep); err != nil {
		s.report(obj, ProblemSinkRefused, key.String()+": "+err.Error())
		return false
	}
	s.clear(obj, ProblemSinkRefused)
	if rec, ok := s.endpoints[ep.IP]; ok && rec.owner != key {
		s.log.Info("pod IP changed hands", "ip", ep.IP, "from", rec.owner.String(), "to", key.String())
	}
	s.endpoints[ep.IP] = endpointRecord{owner: key, ep: ep}
	return true
}

// ---- event handlers ----

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

func sliceServiceIndex(obj any) ([]string, error) {
	es, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	name := es.Labels[LabelServiceName]
	if name == "" {
		return nil, nil
	}
	return []string{es.Namespace + "/" + name}, nil
}

// slim is the informers' transform: it drops what the source never reads
// before an object is cached. managedFields are a large share of every
// object; pods and nodes are the numerous and the big ones (container specs
// and statuses, node image lists), so they keep only the fields mapping.go
// reads. The factory and its caches belong to this Source alone, so nothing
// else sees the slimmed objects.
func slim(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		out := &corev1.Pod{
			TypeMeta:   o.TypeMeta,
			ObjectMeta: o.ObjectMeta,
			Spec:       corev1.PodSpec{NodeName: o.Spec.NodeName, HostNetwork: o.Spec.HostNetwork},
			Status: corev1.PodStatus{
				Phase:      o.Status.Phase,
				Conditions: o.Status.Conditions,
				HostIP:     o.Status.HostIP,
				HostIPs:    o.Status.HostIPs,
				PodIP:      o.Status.PodIP,
				PodIPs:     o.Status.PodIPs,
			},
		}
		out.ManagedFields, out.Annotations = nil, nil
		return out, nil
	case *corev1.Node:
		out := &corev1.Node{
			TypeMeta:   o.TypeMeta,
			ObjectMeta: o.ObjectMeta,
			Spec:       corev1.NodeSpec{PodCIDR: o.Spec.PodCIDR, PodCIDRs: o.Spec.PodCIDRs},
			Status:     corev1.NodeStatus{Addresses: o.Status.Addresses},
		}
		out.ManagedFields, out.Annotations = nil, nil
		return out, nil
	case metav1.Object:
		o.SetManagedFields(nil)
	}
	return obj, nil
}

// ---- problems ----

// report logs and counts problem p of obj, once per distinct detail.
func (s *Source) report(obj string, p Problem, detail string) {
	s.pmu.Lock()
	m := s.reported[obj]
	if m == nil {
		m = map[Problem]string{}
		s.reported[obj] = m
	}
	if prev, ok := m[p]; ok && prev == detail {
		s.pmu.Unlock()
		return
	}
	m[p] = detail
	s.stats.Problems[p]++
	s.pmu.Unlock()
	s.cfg.Metrics.problem(p)
	s.log.Warn(problemMessage(p), "object", obj, "problem", string(p), "detail", detail)
}

// reportList reports a list of skipped parts, or clears p when it is empty.
func (s *Source) reportList(obj string, p Problem, parts []string) {
	if len(parts) == 0 {
		s.clear(obj, p)
		return
	}
	s.report(obj, p, "left out: "+strings.Join(parts, "; "))
}

// clear forgets problems of obj, so they are logged again if they recur.
func (s *Source) clear(obj string, ps ...Problem) {
	s.pmu.Lock()
	defer s.pmu.Unlock()
	m := s.reported[obj]
	if m == nil {
		return
	}
	for _, p := range ps {
		delete(m, p)
	}
	if len(m) == 0 {
		delete(s.reported, obj)
	}
}

// forget drops every problem of a deleted object.
func (s *Source) forget(obj string) {
	s.pmu.Lock()
	delete(s.reported, obj)
	s.pmu.Unlock()
}

func problemMessage(p Problem) string {
	switch p {
	case ProblemMalformedAnnotation:
		return "malformed mesh annotation on service"
	case ProblemNodeWithoutInternalIP:
		return "node has no InternalIP; not published"
	case ProblemUnparsable:
		return "parts of object could not be mapped"
	case ProblemPodWithoutHostIP:
		return "running pod has no host IP; endpoints not published"
	case ProblemTooManyLabels:
		return "pod has too many identity labels; not published"
	case ProblemIdentityRefused:
		return "identity allocation refused; pod not published"
	case ProblemSinkRefused:
		return "mesh API server refused object"
	}
	return "problem"
}
