package k8s

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/trellis-mesh/trellis/apiserver/source"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Well-known Kubernetes labels the source reads.
const (
	// LabelServiceName ties an EndpointSlice to its Service.
	LabelServiceName = discoveryv1.LabelServiceName
	// LabelTopologyRegion and LabelTopologyZone place a Node.
	LabelTopologyRegion = corev1.LabelTopologyRegion
	LabelTopologyZone   = corev1.LabelTopologyZone
)

// Identity label keys the source sets itself.
const (
	// IdentityLabelNamespace carries the pod's namespace.
	IdentityLabelNamespace = "k8s:io.kubernetes.pod.namespace"
	// identityLabelSource prefixes every pod label.
	identityLabelSource = "k8s:"
)

// IdentityLabels returns the identity label set of a pod in namespace with
// labels; see the package documentation for the exact rules.
func IdentityLabels(namespace string, labels map[string]string) map[string]string {
	out := make(map[string]string, len(labels)+1)
	for k, v := range labels {
		if dropLabel(k) {
			continue
		}
		out[identityLabelSource+k] = v
	}
	out[IdentityLabelNamespace] = namespace
	return out
}

// dropLabel reports whether a pod label key stays out of identities.
func dropLabel(key string) bool {
	switch key {
	case "pod-template-hash", "pod-template-generation", "controller-revision-hash",
		"controller-uid", "job-name", "etcd_node":
		// They change with every rollout, job or pod.
		return true
	}
	for _, p := range []string{"io.kubernetes", "io.cilium.k8s", "annotation."} {
		if strings.HasPrefix(key, p) {
			return true
		}
	}
	prefix, _, ok := strings.Cut(key, "/")
	if !ok || prefix == "app.kubernetes.io" {
		return false
	}
	for _, d := range []string{"kubernetes.io", "k8s.io"} {
		if prefix == d || strings.HasSuffix(prefix, "."+d) {
			return true
		}
	}
	return false
}

// parseAddr parses an IP and writes IPv4-mapped IPv6 as IPv4, the one
// spelling v1 accepts.
func parseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, err
	}
	return a.Unmap(), nil
}

// nodeFromK8s maps a Node. It returns an error when the node has no usable
// InternalIP; skipped lists addresses and CIDRs that did not parse.
func nodeFromK8s(cluster string, defRegion, defZone string, n *corev1.Node) (node v1.Node, skipped []string, err error) {
	node = v1.Node{Cluster: cluster, Name: n.Name, Region: defRegion, Zone: defZone}
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		ip, err := parseAddr(a.Address)
		if err != nil {
			skipped = append(skipped, "InternalIP "+a.Address)
			continue
		}
		if !slices.Contains(node.IPs, ip) {
			node.IPs = append(node.IPs, ip)
		}
	}
	if len(node.IPs) == 0 {
		return v1.Node{}, skipped, fmt.Errorf("node %s has no InternalIP address", n.Name)
	}
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			skipped = append(skipped, "podCIDR "+c)
			continue
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()).Masked()
		if !slices.Contains(node.PodCIDRs, p) {
			node.PodCIDRs = append(node.PodCIDRs, p)
		}
	}
	if r, ok := n.Labels[LabelTopologyRegion]; ok {
		node.Region = r
	} else if r, ok := n.Labels[corev1.LabelFailureDomainBetaRegion]; ok {
		node.Region = r
	}
	if z, ok := n.Labels[LabelTopologyZone]; ok {
		node.Zone = z
	} else if z, ok := n.Labels[corev1.LabelFailureDomainBetaZone]; ok {
		node.Zone = z
	}
	// A malformed key is published as no key (the node stays reachable in
	// clear) and reported, rather than failing the node.
	if k, ok := n.Annotations[source.AnnotationWireGuardKey]; ok {
		node.WireGuardPublicKey = k
		if err := node.Validate(); err != nil {
			node.WireGuardPublicKey = ""
			skipped = append(skipped, "annotation "+source.AnnotationWireGuardKey+"="+k)
		}
	}
	if v, ok := n.Annotations[source.AnnotationIPsecKeyIndex]; ok {
		i, err := strconv.ParseUint(v, 10, 8)
		if err != nil || i == 0 || i > v1.MaxIPsecKeyIndex {
			skipped = append(skipped, "annotation "+source.AnnotationIPsecKeyIndex+"="+v)
		} else {
			node.IPsecKeyIndex = uint8(i)
		}
	}
	return node, skipped, nil
}

// serviceFromK8s maps a global Service and its EndpointSlices. skipped
// lists what could not be mapped (odd protocols, unparsable addresses).
func serviceFromK8s(cluster string, opts source.ServiceOptions, svc *corev1.Service, eps []*discoveryv1.EndpointSlice) (out v1.Service, skipped []string) {
	out = v1.Service{
		Cluster:   cluster,
		Namespace: svc.Namespace,
		Name:      svc.Name,
		Global:    opts.Global,
		Shared:    opts.Shared && opts.Global,
		Affinity:  opts.Affinity,

		FailoverRegions: opts.FailoverRegions,
		HealthCheck:     opts.HealthCheck,
	}
	if !opts.Global {
		out.Affinity, out.FailoverRegions = v1.AffinityNone, nil
	}

	// Slices in name order, so two runs build byte-identical values.
	eps = slices.Clone(eps)
	slices.SortFunc(eps, func(a, b *discoveryv1.EndpointSlice) int { return cmp.Compare(a.Name, b.Name) })

	portNames := map[string]bool{}
	for _, sp := range svc.Spec.Ports {
		proto := v1.Protocol(sp.Protocol)
		switch proto {
		case "":
			proto = v1.ProtocolTCP
		case v1.ProtocolTCP, v1.ProtocolUDP, v1.ProtocolSCTP:
		default:
			skipped = append(skipped, fmt.Sprintf("port %q: protocol %q", sp.Name, sp.Protocol))
			continue
		}
		if sp.Port < 1 || sp.Port > 65535 {
			skipped = append(skipped, fmt.Sprintf("port %q: port %d", sp.Name, sp.Port))
			continue
		}
		p := v1.ServicePort{Name: sp.Name, Protocol: proto, Port: uint16(sp.Port)}
		switch sp.TargetPort.Type {
		case intstr.Int:
			tp := sp.TargetPort.IntVal
			if tp == 0 {
				tp = sp.Port
			}
			if tp >= 1 && tp <= 65535 {
				p.TargetPort = uint16(tp)
			}
		case intstr.String:
			p.TargetPort = resolveNamedTarget(sp.Name, eps)
		}
		out.Ports = append(out.Ports, p)
		portNames[sp.Name] = true
	}

	for _, addr := range svc.Spec.ClusterIPs {
		out.FrontendIPs = appendFrontend(out.FrontendIPs, addr, &skipped)
	}
	if len(svc.Spec.ClusterIPs) == 0 {
		out.FrontendIPs = appendFrontend(out.FrontendIPs, svc.Spec.ClusterIP, &skipped)
	}

	byIP := map[netip.Addr]int{}
	for _, es := range eps {
		if es.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		var ports []v1.BackendPort
		for _, ep := range es.Ports {
			name := ""
			if ep.Name != nil {
				name = *ep.Name
			}
			if !portNames[name] || ep.Port == nil || *ep.Port < 1 || *ep.Port > 65535 {
				continue
			}
			if slices.ContainsFunc(ports, func(b v1.BackendPort) bool { return b.Name == name }) {
				continue
			}
			ports = append(ports, v1.BackendPort{Name: name, Port: uint16(*ep.Port)})
		}
		for _, e := range es.Endpoints {
			state := backendState(e.Conditions)
			var node, zone string
			if e.NodeName != nil {
				node = *e.NodeName
			}
			if e.Zone != nil {
				zone = *e.Zone
			}
			for _, a := range e.Addresses {
				ip, err := parseAddr(a)
				if err != nil {
					skipped = append(skipped, fmt.Sprintf("endpointslice %s: address %q", es.Name, a))
					continue
				}
				if i, ok := byIP[ip]; ok {
					mergeBackend(&out.Backends[i], state, ports)
					continue
				}
				byIP[ip] = len(out.Backends)
				out.Backends = append(out.Backends, v1.Backend{
					IP: ip, Ports: slices.Clone(ports), State: state, Node: node, Zone: zone,
				})
			}
		}
	}
	slices.SortFunc(out.Backends, func(a, b v1.Backend) int { return a.IP.Compare(b.IP) })
	return out, skipped
}

func appendFrontend(ips []netip.Addr, s string, skipped *[]string) []netip.Addr {
	if s == "" || s == corev1.ClusterIPNone {
		return ips
	}
	ip, err := parseAddr(s)
	if err != nil {
		*skipped = append(*skipped, fmt.Sprintf("cluster IP %q", s))
		return ips
	}
	if slices.Contains(ips, ip) {
		return ips
	}
	return append(ips, ip)
}

// resolveNamedTarget returns the port number every slice gives the service
// port called name, or 0 when they disagree or none says.
func resolveNamedTarget(name string, eps []*discoveryv1.EndpointSlice) uint16 {
	var found int32
	for _, es := range eps {
		if es.AddressType == discoveryv1.AddressTypeFQDN || len(es.Endpoints) == 0 {
			continue
		}
		for _, p := range es.Ports {
			if p.Port == nil || (p.Name == nil && name != "") || (p.Name != nil && *p.Name != name) {
				continue
			}
			if found != 0 && found != *p.Port {
				return 0
			}
			found = *p.Port
		}
	}
	if found < 1 || found > 65535 {
		return 0
	}
	return uint16(found)
}

// backendState maps EndpointSlice conditions; see the package
// documentation.
func backendState(c discoveryv1.EndpointConditions) v1.BackendState {
	ready := c.Ready == nil || *c.Ready
	serving := ready
	if c.Serving != nil {
		serving = *c.Serving
	}
	switch {
	case c.Terminating != nil && *c.Terminating:
		if serving {
			return v1.BackendTerminating
		}
		return v1.BackendUnready
	case ready:
		return v1.BackendActive
	}
	return v1.BackendUnready
}

func stateRank(s v1.BackendState) int {
	switch s {
	case v1.BackendActive:
		return 2
	case v1.BackendTerminating:
		return 1
	}
	return 0
}

// mergeBackend folds a second listing of the same address into b: the
// better state wins, and ports b lacks are added.
func mergeBackend(b *v1.Backend, state v1.BackendState, ports []v1.BackendPort) {
	if stateRank(state) > stateRank(b.State) {
		b.State = state
	}
	for _, p := range ports {
		if !slices.ContainsFunc(b.Ports, func(q v1.BackendPort) bool { return q.Name == p.Name }) {
			b.Ports = append(b.Ports, p)
		}
	}
}

// podInfo is what the source needs from a pod.
type podInfo struct {
	eligible bool
	// why says why a pod is not eligible, for the debug log.
	why string
	// noHostIP: a running pod without a usable status.hostIP, worth a
	// warning (the others are normal pod life).
	noHostIP bool
	ips      []netip.Addr
	hostIP   netip.Addr
	ready    bool
	// unhealthy: its node's agent probes it down (condition
	// trellis.io/healthy False); ready is false then.
	unhealthy bool
}

// podFromK8s decides whether pod gets endpoints, and with which IPs.
func podFromK8s(pod *corev1.Pod) podInfo {
	switch {
	case pod.Spec.HostNetwork:
		return podInfo{why: "host network"}
	case pod.Status.Phase != corev1.PodRunning:
		return podInfo{why: "phase " + string(pod.Status.Phase)}
	}
	var info podInfo
	addrs := make([]string, 0, len(pod.Status.PodIPs))
	for _, a := range pod.Status.PodIPs {
		addrs = append(addrs, a.IP)
	}
	if len(addrs) == 0 && pod.Status.PodIP != "" {
		addrs = append(addrs, pod.Status.PodIP)
	}
	for _, a := range addrs {
		ip, err := parseAddr(a)
		if err == nil && !slices.Contains(info.ips, ip) {
			info.ips = append(info.ips, ip)
		}
	}
	if len(info.ips) == 0 {
		return podInfo{why: "no pod IP"}
	}
	host := pod.Status.HostIP
	if host == "" && len(pod.Status.HostIPs) > 0 {
		host = pod.Status.HostIPs[0].IP
	}
	hostIP, err := parseAddr(host)
	if err != nil {
		return podInfo{why: fmt.Sprintf("no usable host IP (%q)", host), noHostIP: true}
	}
	info.hostIP = hostIP
	for _, c := range pod.Status.Conditions {
		switch c.Type {
		case corev1.PodReady:
			info.ready = c.Status == corev1.ConditionTrue
		case source.ConditionHealthy:
			info.unhealthy = c.Status == corev1.ConditionFalse
		}
	}
	if info.unhealthy {
		info.ready = false
	}
	info.eligible = true
	return info
}
