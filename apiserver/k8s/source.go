package k8s

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/source"
)

// The source's files, by concern: this one holds the Source, its Config and
// its lifetime (New, Run) with the informers' index and transform;
// queue.go the work queue (keys, event handlers, the initial publication
// and the worker loop); nodes.go, services.go and pods.go what each kind
// publishes; problems.go how problems are logged and counted.

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
	// unhealthy are the IPs of pods whose node's agent probes them down
	// (source.ConditionHealthy False), and the pod each belongs to: their
	// backends are published unready whatever the EndpointSlices say.
	unhealthy map[netip.Addr]objectKey
	// pending holds, per kind, the keys the initial publication still
	// waits for. A kind is absent once its Synced has been called.
	pending map[kind]map[objectKey]struct{}

	// pmu guards problem bookkeeping; it may be taken with mu held.
	pmu      sync.Mutex
	reported map[string]map[Problem]string
	stats    Stats
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
		unhealthy: map[netip.Addr]objectKey{},
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

// sliceServiceIndex indexes an EndpointSlice under serviceIndex by
// "<namespace>/<service>", from its kubernetes.io/service-name label; a
// slice without that label is not indexed.
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
		// Of the annotations, only the agent's key annotations are read
		// (nodeFromK8s); dropping them would publish every node without
		// its key.
		out.ManagedFields, out.Annotations = nil, nil
		for _, k := range []string{source.AnnotationWireGuardKey, source.AnnotationIPsecKeyIndex} {
			if v, ok := o.Annotations[k]; ok {
				if out.Annotations == nil {
					out.Annotations = make(map[string]string, 2)
				}
				out.Annotations[k] = v
			}
		}
		return out, nil
	case metav1.Object:
		o.SetManagedFields(nil)
	}
	return obj, nil
}
