package source

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Node annotations the agent writes on its own Kubernetes node (as
// Cilium's does with network.cilium.io/wg-pub-key) and the source
// publishes in the node's entry.
const (
	// AnnotationWireGuardKey is the node's WireGuard public key (standard
	// base64); absent when the node runs no WireGuard.
	AnnotationWireGuardKey = "trellis.io/wg-pub-key"
	// AnnotationIPsecKeyIndex is the IPsec key index the node uses, 1-15.
	AnnotationIPsecKeyIndex = "trellis.io/ipsec-key-index"
)

// ConditionHealthy is the pod status condition a node's agent in
// Kubernetes mode sets on the pods of its node (as a readiness gate's
// controller would): "False" while the pod fails the agent's probes,
// "True" while it passes them. The Kubernetes source publishes a pod
// whose condition is False, and its backends, as not ready, whatever its
// EndpointSlices say; list it in a pod's spec.readinessGates to hold the
// pod's own Ready condition too.
const ConditionHealthy = "trellis.io/healthy"

// Service annotations read by the source. See the package documentation for
// their precedence and defaults.
const (
	AnnotationGlobal   = "trellis.io/global"
	AnnotationShared   = "trellis.io/shared"
	AnnotationAffinity = "trellis.io/affinity"
	// AnnotationFailoverRegions orders the regions to fail over to:
	// "ap,us" (see [v1.Service.FailoverRegions]). Cilium has no such
	// annotation, so there is no alias.
	AnnotationFailoverRegions = "trellis.io/failover-regions"
	// AnnotationHealthCheck says how each node's agent probes the
	// service's backends on that node: "tcp" (the default: a connect to
	// each TCP target port) or "http:<path>" (GET <path> on each TCP
	// target port; 2xx and 3xx pass). See [v1.HealthCheck]. Read for
	// every service, global or not.
	AnnotationHealthCheck = "trellis.io/health-check"

	// Cilium's spellings, accepted so users can migrate.
	CiliumAnnotationGlobal   = "service.cilium.io/global"
	CiliumAnnotationShared   = "service.cilium.io/shared"
	CiliumAnnotationAffinity = "service.cilium.io/affinity"

	// Cilium's older spellings (before 1.14).
	LegacyCiliumAnnotationGlobal   = "io.cilium/global-service"
	LegacyCiliumAnnotationShared   = "io.cilium/shared-service"
	LegacyCiliumAnnotationAffinity = "io.cilium/service-affinity"
)

// ServiceOptions are a Service's mesh settings, parsed from its annotations.
type ServiceOptions struct {
	// Global: merge with same-named services of other clusters.
	Global bool
	// Shared: offer this cluster's backends to other clusters. Always false
	// when Global is false.
	Shared bool
	// Affinity: which clusters' backends to prefer. AffinityNone unless
	// Global.
	Affinity v1.Affinity
	// FailoverRegions: the regions to turn to, in order, when the local
	// cluster's backends are not used. Nil unless Global.
	FailoverRegions []string
	// HealthCheck: how agents probe the backends on their node; the zero
	// value is a TCP connect.
	HealthCheck v1.HealthCheck
}

// AnnotationError is one malformed mesh annotation.
type AnnotationError struct {
	// Key is the annotation that was read.
	Key string
	// Value is what it held.
	Value string
	// Allowed says what it may hold.
	Allowed string
	// Using is the value the source used instead.
	Using string
}

func (e *AnnotationError) Error() string {
	return fmt.Sprintf("annotation %s=%q: want %s; using %s", e.Key, e.Value, e.Allowed, e.Using)
}

// ParseAnnotations reads a Service's mesh settings from its annotations. It
// always returns usable options; malformed values are reported as
// *AnnotationError values and replaced by the safe choice (not global, not
// shared, affinity none, no failover regions, a TCP health check).
func ParseAnnotations(annotations map[string]string) (ServiceOptions, []error) {
	var errs []error
	opts := ServiceOptions{Affinity: v1.AffinityNone}

	if val, ok := annotations[AnnotationHealthCheck]; ok {
		hc, err := ParseHealthCheck(val)
		if err != nil {
			errs = append(errs, &AnnotationError{Key: AnnotationHealthCheck, Value: val,
				Allowed: `"tcp" or "http:<path>" such as "http:/healthz" (` + err.Error() + ")", Using: "tcp"})
		}
		opts.HealthCheck = hc
	}

	if key, val, ok := first(annotations, AnnotationGlobal, CiliumAnnotationGlobal, LegacyCiliumAnnotationGlobal); ok {
		b, good := parseBool(val)
		if !good {
			errs = append(errs, &AnnotationError{Key: key, Value: val, Allowed: `"true" or "false"`, Using: "not global"})
		}
		opts.Global = b
	}
	if !opts.Global {
		return opts, errs
	}

	opts.Shared = true
	if key, val, ok := first(annotations, AnnotationShared, CiliumAnnotationShared, LegacyCiliumAnnotationShared); ok {
		b, good := parseBool(val)
		if !good {
			errs = append(errs, &AnnotationError{Key: key, Value: val, Allowed: `"true" or "false"`, Using: "not shared"})
		}
		opts.Shared = b
	}

	if key, val, ok := first(annotations, AnnotationAffinity, CiliumAnnotationAffinity, LegacyCiliumAnnotationAffinity); ok {
		switch a := v1.Affinity(strings.ToLower(strings.TrimSpace(val))); a {
		case v1.AffinityNone, v1.AffinityLocal, v1.AffinityRemote:
			opts.Affinity = a
		default:
			errs = append(errs, &AnnotationError{Key: key, Value: val, Allowed: `"none", "local" or "remote"`, Using: "none"})
		}
	}

	if val, ok := annotations[AnnotationFailoverRegions]; ok {
		regions, err := ParseFailoverRegions(val)
		if err != nil {
			why := err.Error()
			if ve, ok := errors.AsType[*v1.ValidationError](err); ok {
				why = fmt.Sprintf("%s %q: %s", ve.Field, ve.Value, ve.Allowed)
			}
			errs = append(errs, &AnnotationError{Key: AnnotationFailoverRegions, Value: val,
				Allowed: "comma-separated region names, each once, at most " + strconv.Itoa(v1.MaxFailoverRegions) + " (" + why + ")",
				Using:   "no failover regions"})
		}
		opts.FailoverRegions = regions
	}
	return opts, errs
}

// ParseFailoverRegions reads the value of [AnnotationFailoverRegions]: region
// names separated by commas, spaces around each ignored ("ap, us"). An
// empty value is an empty list. A malformed list (an empty entry, a bad
// name, a region twice, too many) is an error and nil: half a list would
// send traffic in an order nobody asked for.
func ParseFailoverRegions(val string) ([]string, error) {
	if strings.TrimSpace(val) == "" {
		return nil, nil
	}
	regions := strings.Split(val, ",")
	for i := range regions {
		regions[i] = strings.TrimSpace(regions[i])
	}
	if err := v1.ValidateFailoverRegions(regions); err != nil {
		return nil, err
	}
	return regions, nil
}

// ParseHealthCheck reads the value of [AnnotationHealthCheck]: "tcp" (or
// empty), or "http:" followed by the path to GET, which starts with "/"
// ("http:/healthz"); "http" alone GETs "/". A malformed value is an error
// and the zero (TCP) check: it says what is wrong and how to write it.
func ParseHealthCheck(val string) (v1.HealthCheck, error) {
	v := strings.TrimSpace(val)
	scheme, path, hasPath := strings.Cut(v, ":")
	switch strings.ToLower(scheme) {
	case "", "tcp":
		if hasPath {
			return v1.HealthCheck{}, errors.New("a tcp check takes no path")
		}
		return v1.HealthCheck{}, nil
	case "http":
		if !hasPath {
			path = "/"
		}
		hc := v1.HealthCheck{Type: v1.HealthCheckHTTP, Path: path}
		if err := v1.ValidateHealthCheck(hc); err != nil {
			if ve, ok := errors.AsType[*v1.ValidationError](err); ok {
				return v1.HealthCheck{}, fmt.Errorf("path %q: %s", ve.Value, ve.Allowed)
			}
			return v1.HealthCheck{}, err
		}
		return hc, nil
	}
	return v1.HealthCheck{}, fmt.Errorf("unknown check %q", scheme)
}

// first returns the first of keys present in m.
func first(m map[string]string, keys ...string) (key, val string, ok bool) {
	for _, k := range keys {
		if v, ok := m[k]; ok {
			return k, v, true
		}
	}
	return "", "", false
}

// parseBool accepts "true" and "false" in any case; anything else is
// (false, false).
func parseBool(s string) (value, ok bool) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "true":
		return true, true
	case "false":
		return false, true
	}
	return false, false
}
