package kvstore

import (
	"net/http"
	"strings"
	"testing"
)

// The embedded etcd serves no gRPC gateway: its JSON API is not found,
// while etcd's own /health (not part of the gateway) still answers.
func TestEmbeddedHasNoGRPCGateway(t *testing.T) {
	e := startEtcd(t)
	base := e.Endpoints()[0]
	resp, err := http.Post(base+"/v3/kv/range", "application/json", strings.NewReader(`{"key":"Zm9v"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("POST /v3/kv/range: %s, want 404 (gateway off)", resp.Status)
	}
	resp, err = http.Get(base + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET /health: %s, want 200", resp.Status)
	}
}
