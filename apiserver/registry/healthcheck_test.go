package registry

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// The health-check annotation is published in the service, global or
// not; a malformed one is refused at the door, naming the annotation and
// the value, and the published service keeps its check.
func TestServiceHealthCheck(t *testing.T) {
	e := startEtcd(t)
	r, sink, _ := newRegistry(t, e)
	ctx := context.Background()
	svc := func(check string) v1.ServiceRequest {
		return v1.ServiceRequest{Namespace: "default", Name: "web", Ports: []v1.ServicePort{{Name: "http", Protocol: v1.ProtocolTCP, Port: 80, TargetPort: 8080}},
			Selector: map[string]string{"app": "web"}, Annotations: map[string]string{"trellis.io/health-check": check}}
	}
	published := func() v1.HealthCheck {
		t.Helper()
		sink.mu.Lock()
		defer sink.mu.Unlock()
		s, ok := sink.services["default/web"]
		if !ok {
			t.Fatal("service default/web not published")
		}
		return s.HealthCheck
	}
	want := v1.HealthCheck{Type: v1.HealthCheckHTTP, Path: "/healthz"}
	if err := r.PutService(ctx, svc("http:/healthz")); err != nil {
		t.Fatal(err)
	}
	if got := published(); got != want {
		t.Errorf("health check %+v; want %+v", got, want)
	}
	for _, bad := range []string{"http:healthz", "http:/a b", "http:/\x00", "ping", "http:/" + strings.Repeat("x", 300)} {
		err := r.PutService(ctx, svc(bad))
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "trellis.io/health-check") || !strings.Contains(err.Error(), fmt.Sprintf("%q", bad)) {
			t.Errorf("health check %q: err %v; want ErrInvalid naming the annotation and the value", bad, err)
		}
	}
	if got := published(); got != want {
		t.Errorf("health check after refused changes %+v; want %+v", got, want)
	}
	if err := r.PutService(ctx, svc("tcp")); err != nil {
		t.Fatal(err)
	}
	if got := published(); got != (v1.HealthCheck{}) {
		t.Errorf("health check after tcp %+v; want the zero (tcp) check", got)
	}
}
