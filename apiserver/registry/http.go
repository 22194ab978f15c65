package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// maxBody bounds a request body; no registry object comes near it.
const maxBody = 1 << 20

// Principal is who a request comes from: the admin, or one node (with
// its node credential). The server authenticates every request before the
// registry sees it and puts the principal in the request's context.
type Principal struct {
	Admin bool
	Node  string
}

type principalKey struct{}

// WithPrincipal returns ctx carrying p.
func WithPrincipal(ctx context.Context, p Principal) context.Context {
	return context.WithValue(ctx, principalKey{}, p)
}

// PrincipalFrom returns the principal WithPrincipal put in ctx.
func PrincipalFrom(ctx context.Context) (Principal, bool) {
	p, ok := ctx.Value(principalKey{}).(Principal)
	return p, ok
}

// Handler serves the registry API (docs/registry-api.md). Every request
// must carry a Principal (WithPrincipal): reads are open to any; the admin
// may change everything; a node may change only itself and the endpoints
// on it.
func (r *Registry) Handler() http.Handler {
	mux := http.NewServeMux()
	// as wraps a handler with the authorization check may.
	as := func(may func(p Principal, req *http.Request) error, h http.HandlerFunc) http.HandlerFunc {
		return func(w http.ResponseWriter, req *http.Request) {
			p, ok := PrincipalFrom(req.Context())
			if !ok {
				writeError(w, http.StatusUnauthorized, "no credential")
				return
			}
			if may != nil {
				if err := may(p, req); err != nil {
					writeError(w, http.StatusForbidden, err.Error())
					return
				}
			}
			h(w, req)
		}
	}
	anyone := func(Principal, *http.Request) error { return nil }
	adminOnly := func(p Principal, _ *http.Request) error {
		if !p.Admin {
			return errors.New("only the admin credential may change services")
		}
		return nil
	}
	sameNode := func(p Principal, req *http.Request) error {
		if !p.Admin && p.Node != req.PathValue("name") {
			return fmt.Errorf("node %s's credential may change only node %s", p.Node, p.Node)
		}
		return nil
	}

	mux.HandleFunc("GET /v1/status", as(anyone, func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, v1.RegistryStatus{Unpublished: r.Problems()})
	}))
	mux.HandleFunc("GET /v1/nodes", as(anyone, func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, r.Nodes()) }))
	mux.HandleFunc("PUT /v1/nodes/{name}", as(sameNode, func(w http.ResponseWriter, req *http.Request) {
		var n v1.NodeRequest
		if !decode(w, req, &n) {
			return
		}
		if !samePathValue(w, "name", req.PathValue("name"), &n.Name) {
			return
		}
		respond(w, r.PutNode(req.Context(), n))
	}))
	mux.HandleFunc("DELETE /v1/nodes/{name}", as(sameNode, func(w http.ResponseWriter, req *http.Request) {
		respond(w, r.DeleteNode(req.Context(), req.PathValue("name")))
	}))

	mux.HandleFunc("GET /v1/endpoints", as(anyone, func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, r.Endpoints()) }))
	mux.HandleFunc("PUT /v1/endpoints/{ip}", as(anyone, func(w http.ResponseWriter, req *http.Request) {
		ip, ok := pathIP(w, req)
		if !ok {
			return
		}
		var e v1.EndpointRequest
		if !decode(w, req, &e) {
			return
		}
		if e.IP.IsValid() && e.IP != ip {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("body ip %s differs from the path's %s", e.IP, ip))
			return
		}
		e.IP = ip
		if err := r.mayChangeEndpoint(req.Context(), ip, e.Node); err != nil {
			writeError(w, http.StatusForbidden, err.Error())
			return
		}
		respond(w, r.PutEndpoint(req.Context(), e))
	}))
	mux.HandleFunc("DELETE /v1/endpoints/{ip}", as(anyone, func(w http.ResponseWriter, req *http.Request) {
		ip, ok := pathIP(w, req)
		if !ok {
			return
		}
		if err := r.mayChangeEndpoint(req.Context(), ip, ""); err != nil {
			writeError(w, http.StatusForbidden, err.Error())
			return
		}
		respond(w, r.DeleteEndpoint(req.Context(), ip))
	}))

	mux.HandleFunc("GET /v1/services", as(anyone, func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, r.Services()) }))
	mux.HandleFunc("PUT /v1/services/{namespace}/{name}", as(adminOnly, func(w http.ResponseWriter, req *http.Request) {
		var s v1.ServiceRequest
		if !decode(w, req, &s) {
			return
		}
		if !samePathValue(w, "namespace", req.PathValue("namespace"), &s.Namespace) ||
			!samePathValue(w, "name", req.PathValue("name"), &s.Name) {
			return
		}
		respond(w, r.PutService(req.Context(), s))
	}))
	mux.HandleFunc("DELETE /v1/services/{namespace}/{name}", as(adminOnly, func(w http.ResponseWriter, req *http.Request) {
		respond(w, r.DeleteService(req.Context(), req.PathValue("namespace"), req.PathValue("name")))
	}))
	return mux
}

// mayChangeEndpoint says why the principal of ctx may not write the
// endpoint at ip: a node may write only endpoints on itself (node, for a
// PUT) and may not take over another node's.
func (r *Registry) mayChangeEndpoint(ctx context.Context, ip netip.Addr, node string) error {
	p, _ := PrincipalFrom(ctx)
	if p.Admin {
		return nil
	}
	if node != "" && node != p.Node {
		return fmt.Errorf("node %s's credential may register endpoints only on node %s, not on %q", p.Node, p.Node, cut(node))
	}
	if cur, ok := r.Endpoint(ip); ok && cur.Node != p.Node {
		return fmt.Errorf("endpoint %s is on node %s: node %s's credential may not change it", ip, cur.Node, p.Node)
	}
	return nil
}

func pathIP(w http.ResponseWriter, req *http.Request) (netip.Addr, bool) {
	ip, err := netip.ParseAddr(req.PathValue("ip"))
	if err != nil {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("endpoint path: %q is not an IP address", cut(req.PathValue("ip"))))
		return ip, false
	}
	return ip, true
}

// decode reads a JSON body strictly: unknown fields and trailing data are
// errors, so a typo is reported instead of silently dropped.
func decode(w http.ResponseWriter, req *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, req.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, "request body: "+err.Error())
		return false
	}
	if _, err := dec.Token(); err != io.EOF {
		writeError(w, http.StatusBadRequest, "request body: trailing data after the JSON object")
		return false
	}
	return true
}

// samePathValue fills field from the path, refusing a body that names a
// different object than the URL.
func samePathValue(w http.ResponseWriter, what, fromPath string, field *string) bool {
	if *field != "" && *field != fromPath {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("body %s %q differs from the path's %q", what, *field, fromPath))
		return false
	}
	*field = fromPath
	return true
}

func respond(w http.ResponseWriter, err error) {
	switch {
	case err == nil:
		w.WriteHeader(http.StatusNoContent)
	case errors.Is(err, ErrInvalid):
		writeError(w, http.StatusBadRequest, err.Error())
	case errors.Is(err, ErrNotFound):
		writeError(w, http.StatusNotFound, err.Error())
	default:
		writeError(w, http.StatusServiceUnavailable, err.Error())
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}
