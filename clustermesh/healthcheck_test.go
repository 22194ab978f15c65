package clustermesh

import (
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// The merged service carries the local copy's health check (the agent
// probes only its own cluster's pods), else the first remote's by name.
func TestMergeServiceHealthCheck(t *testing.T) {
	name := ServiceName{"default", "echo"}
	clusters := map[string]clusterInfo{"eu": {id: 1}, "us": {id: 2}, "ap": {id: 3}}
	check := func(c string, path string) v1.Service {
		s := svc(c, true, true, "", backends(v1.BackendActive))
		if path != "" {
			s.HealthCheck = v1.HealthCheck{Type: v1.HealthCheckHTTP, Path: path}
		}
		return s
	}
	m := mergeService(name, "eu", publishedOf(map[string]map[ServiceName]v1.Service{
		"eu": {name: check("eu", "/local")}, "us": {name: check("us", "/us")},
	}), clusters)
	if want := (v1.HealthCheck{Type: v1.HealthCheckHTTP, Path: "/local"}); m.HealthCheck != want {
		t.Errorf("with a local copy: %+v; want %+v", m.HealthCheck, want)
	}
	m = mergeService(name, "eu", publishedOf(map[string]map[ServiceName]v1.Service{
		"eu": {name: check("eu", "")}, "us": {name: check("us", "/us")},
	}), clusters)
	if m.HealthCheck != (v1.HealthCheck{}) {
		t.Errorf("a local tcp check: %+v; want the zero check", m.HealthCheck)
	}
	m = mergeService(name, "eu", publishedOf(map[string]map[ServiceName]v1.Service{
		"us": {name: check("us", "/us")}, "ap": {name: check("ap", "/ap")},
	}), clusters)
	if want := (v1.HealthCheck{Type: v1.HealthCheckHTTP, Path: "/ap"}); m.HealthCheck != want {
		t.Errorf("remote only: %+v; want the first remote's by name %+v", m.HealthCheck, want)
	}
}
