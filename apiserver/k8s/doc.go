// Package k8s is the Kubernetes source of the mesh API server: it watches a
// cluster's Services, EndpointSlices, Nodes and Pods with client-go
// informers and hands the mesh's view of them to a [source.Sink], allocating
// pod identities through a [source.IdentityAllocator].
//
// # What is published
//
//   - Nodes: every Node with at least one InternalIP address becomes a
//     v1.Node (IPs = InternalIP addresses, PodCIDRs = spec.podCIDRs, Region
//     and Zone from the topology.kubernetes.io labels, else the Config
//     defaults). A node without an InternalIP is skipped with a warning.
//   - Services: only global ones (see "Annotations"). A global Service
//     becomes a v1.Service whose backends come from the EndpointSlices
//     labelled kubernetes.io/service-name=<name> in its namespace. A Service
//     that stops being global, or is deleted, is deleted from the sink.
//   - Endpoints and identities: every Running pod that has a pod IP and is
//     not hostNetwork gets one identity (from its namespace and labels, see
//     "Identity labels") and one v1.Endpoint per pod IP. A pod that stops
//     running, loses its IP or is deleted has its endpoints deleted and its
//     identity reference released.
//
// # Annotations
//
// A Service takes part in the mesh through annotations. Each setting is read
// from the first of these keys that is present, so the Trellis annotation
// wins over Cilium's, and Cilium's current spelling over its old one:
//
//	global    trellis.io/global    service.cilium.io/global    io.cilium/global-service
//	shared    trellis.io/shared    service.cilium.io/shared    io.cilium/shared-service
//	affinity  trellis.io/affinity  service.cilium.io/affinity  io.cilium/service-affinity
//	failover  trellis.io/failover-regions  (no Cilium spelling)
//	check     trellis.io/health-check      (no Cilium spelling)
//
// global and shared take "true" or "false" (any case, surrounding space
// ignored). shared defaults to true for a global service and is always false
// for a service that is not global. affinity takes "none", "local" or
// "remote" (default none). A malformed value is logged with the Service's
// name and counted once ([ProblemMalformedAnnotation]); a malformed global
// means "not global" (the service is not published), a malformed shared
// means "not shared" (backends are not offered to other clusters while we
// are unsure), a malformed affinity means "none". failover-regions is a
// comma-separated list of regions ("ap, us"), the order in which the
// agents of other clusters turn to regions when they do not use their own
// cluster's backends (see [v1.Service.FailoverRegions]); a malformed list
// (an empty entry, a bad region name, a region twice, more than 16)
// means no list. health-check ("tcp", the default, or "http:/healthz")
// says how each node's agent probes the backends on its node (see
// [v1.HealthCheck]), and is read for every service; a malformed one means
// tcp.
//
// # Service mapping
//
// Ports keep name, protocol (TCP when empty) and port. A numeric targetPort
// (0 means "same as port", the Kubernetes default) is copied; a named
// targetPort is resolved through the EndpointSlices' ports, which carry the
// service port's name and the resolved number: when every slice agrees on
// one number it becomes TargetPort, otherwise TargetPort is 0 and each
// backend's Ports say where it listens. Backends always carry their ports.
// FrontendIPs are spec.clusterIPs ("None" skipped). Each address of each
// endpoint becomes a Backend with Node (nodeName) and Zone; its State is
//
//	terminating=true, serving (nil serving = ready)   → terminating
//	terminating=true, not serving                     → unready
//	not terminating, ready (nil ready = true)         → active
//	otherwise                                         → unready
//
// terminating wins over ready so that a Service with
// publishNotReadyAddresses (whose endpoints are always ready) still drains.
// An address listed by two slices (the controller moving an endpoint) is
// kept once, with the better state. FQDN slices are ignored.
//
// A pod whose status condition trellis.io/healthy is False (its node's
// agent in Kubernetes mode probes it down: [source.ConditionHealthy]) is
// published not ready, and every backend at its IPs unready, whatever the
// EndpointSlices say: the agent marks the pod, and this source, the one
// every other node and cluster reads, acts on the mark at once, with or
// without a readiness gate holding the pod's Ready condition.
//
// # Identity labels
//
// A pod's identity is defined by exactly this label set:
//
//	k8s:io.kubernetes.pod.namespace=<namespace>
//	k8s:<key>=<value>   for each pod label except the dropped ones below
//
// Dropped, because they change with every rollout or every pod (and would
// give each pod its own identity) or because they would let a pod spoof a
// label the source sets:
//
//   - pod-template-hash, pod-template-generation, controller-revision-hash,
//     controller-uid, job-name, etcd_node
//   - any key whose prefix (the part before "/") is kubernetes.io or k8s.io
//     or a subdomain of them (statefulset.kubernetes.io/pod-name,
//     batch.kubernetes.io/controller-uid, apps.kubernetes.io/pod-index, ...),
//     except app.kubernetes.io, the recommended application labels
//   - any key starting with io.kubernetes, io.cilium.k8s or annotation.
//
// This follows Cilium's default identity-relevant label filter. Namespace
// labels and the service account are not part of the identity (yet). A pod
// with more than [v1.MaxIdentityLabels] identity labels is not published
// ([ProblemTooManyLabels]).
//
// # Lifetimes and ordering
//
// New validates the Config and does nothing else. Run starts its own
// SharedInformerFactory, whose caches keep only what the mapping reads (no
// managedFields; pods and nodes cut down to names, labels, addresses, CIDRs,
// phase and conditions), waits for the caches, queues every object it found
// and starts the workers. It returns when ctx ends, after the informers and
// workers have stopped. A key is never processed by two workers at once
// (client-go's workqueue guarantees it), and all sink writes for endpoints
// happen under one lock so that a pod IP reused by a new pod is never
// deleted by the old pod's cleanup.
//
// Sink.Synced(kind) is called once per kind, after every object of that kind
// present when the caches synced has been processed (published, skipped,
// or refused by the sink). Pods feed two kinds: identities, then endpoints.
// A key that keeps failing with a transient error (identity allocation)
// stops holding up Synced after a few attempts but keeps being retried.
//
// # Errors
//
// Sink refusals (an IP outside the cluster's pod CIDRs, a value that fails
// validation) are permanent: they are logged once per object and reason,
// counted in [Stats] and the optional [Metrics], and not retried until the
// object changes (or the periodic resync tries again, silently). Identity
// allocation errors are transient and retried with per-key exponential
// backoff (5 ms to 5 min) under an overall 50 qps bucket, as in
// kubernetes/sample-controller. When a refused update replaces an object
// the sink had accepted before, the sink keeps the older version.
package k8s
