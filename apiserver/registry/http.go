package registry

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// maxBody bounds a request body; no registry object comes near it.
const maxBody = 1 << 20

// Handler serves the registry API (docs/registry-api.md). Requests that
// change state need "Authorization: Bearer <token>".
func (r *Registry) Handler(token string) http.Handler {
	mux := http.NewServeMux()
	write := func(h http.HandlerFunc) http.HandlerFunc {
		return func(w http.ResponseWriter, req *http.Request) {
			got := strings.TrimPrefix(req.Header.Get("Authorization"), "Bearer ")
			if subtle.ConstantTimeCompare([]byte(got), []byte(token)) != 1 {
				writeError(w, http.StatusUnauthorized, "registry writes need the admin token: Authorization: Bearer <token from <state-dir>/admin.token>")
				return
			}
			h(w, req)
		}
	}

	mux.HandleFunc("GET /v1/nodes", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, r.Nodes()) })
	mux.HandleFunc("PUT /v1/nodes/{name}", write(func(w http.ResponseWriter, req *http.Request) {
		var n v1.NodeRequest
		if !decode(w, req, &n) {
			return
		}
		if !samePathValue(w, "name", req.PathValue("name"), &n.Name) {
			return
		}
		respond(w, r.PutNode(req.Context(), n))
	}))
	mux.HandleFunc("DELETE /v1/nodes/{name}", write(func(w http.ResponseWriter, req *http.Request) {
		respond(w, r.DeleteNode(req.Context(), req.PathValue("name")))
	}))

	mux.HandleFunc("GET /v1/endpoints", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, r.Endpoints()) })
	mux.HandleFunc("PUT /v1/endpoints/{ip}", write(func(w http.ResponseWriter, req *http.Request) {
		ip, err := netip.ParseAddr(req.PathValue("ip"))
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("endpoint path: %q is not an IP address", req.PathValue("ip")))
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
		respond(w, r.PutEndpoint(req.Context(), e))
	}))
	mux.HandleFunc("DELETE /v1/endpoints/{ip}", write(func(w http.ResponseWriter, req *http.Request) {
		ip, err := netip.ParseAddr(req.PathValue("ip"))
		if err != nil {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("endpoint path: %q is not an IP address", req.PathValue("ip")))
			return
		}
		respond(w, r.DeleteEndpoint(req.Context(), ip))
	}))

	mux.HandleFunc("GET /v1/services", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, r.Services()) })
	mux.HandleFunc("PUT /v1/services/{namespace}/{name}", write(func(w http.ResponseWriter, req *http.Request) {
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
	mux.HandleFunc("DELETE /v1/services/{namespace}/{name}", write(func(w http.ResponseWriter, req *http.Request) {
		respond(w, r.DeleteService(req.Context(), req.PathValue("namespace"), req.PathValue("name")))
	}))
	return mux
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
