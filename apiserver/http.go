package apiserver

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// RemoteCertValidity is how long a remote cluster's client certificate lasts.
const RemoteCertValidity = 365 * 24 * time.Hour

// routes adds the server's own routes to mux. Every route but /healthz
// and /readyz is behind s.authenticated: /metrics needs any credential,
// /admin/ the admin's.
func (s *Server) routes(mux *http.ServeMux) {
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ok, why := s.readiness(r.Context())
		if !ok {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, why)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /admin/v1/info", s.handleInfo)
	mux.HandleFunc("POST /admin/v1/remotes/{name}", s.handleIssueRemote)
	mux.HandleFunc("DELETE /admin/v1/remotes/{name}", s.handleRevokeRemote)
	mux.HandleFunc("POST /admin/v1/nodes/{name}/credential", s.handleIssueNodeCredential)
	mux.HandleFunc("DELETE /admin/v1/nodes/{name}/credential", s.handleRevokeNodeCredential)
	mux.HandleFunc("GET /admin/v1/encryption", s.handleEncryption)
	mux.HandleFunc("PUT /admin/v1/encryption", s.handleSetEncryption)
	mux.HandleFunc("POST /admin/v1/encryption/rotate", s.handleRotateEncryption)
}

func (s *Server) handleInfo(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(s.Info())
}

// Info is what the server says of its cluster to `trellis connect`.
func (s *Server) Info() v1.ClusterInfo {
	cc := s.cfg.ClusterConfig()
	info := v1.ClusterInfo{
		Name: cc.Name, ID: cc.ID, PodCIDRs: cc.PodCIDRs, Region: cc.Region,
		Endpoints: []string{s.cfg.advertisedEtcdEndpoint()}, MaxConnectedClusters: s.cfg.MaxConnectedClusters,
	}
	if s.ca != nil {
		info.CAPEM = string(s.ca.CertPEM)
	}
	return info
}

// errExternalEtcd: remote clusters' credentials are the operator's to
// manage when etcd is external (there is no front door to enforce them).
var errExternalEtcd = errors.New("remote clusters' credentials are managed only with the embedded etcd; with --etcd-endpoints use your etcd's own tools")

// handleIssueRemote mints a client certificate for a remote cluster.
func (s *Server) handleIssueRemote(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := v1.ValidateClusterName(name); err != nil {
		http.Error(w, "remote cluster name: "+err.Error(), http.StatusBadRequest)
		return
	}
	// The cluster's own name is allowed: its agents read their own cluster
	// through the same read-only path as everyone else's.
	creds, err := s.IssueRemote(r.Context(), name)
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(creds)
}

// handleRevokeRemote invalidates a remote cluster's certificate and cuts
// its connections.
func (s *Server) handleRevokeRemote(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	if err := v1.ValidateClusterName(name); err != nil {
		http.Error(w, "remote cluster name: "+err.Error(), http.StatusBadRequest)
		return
	}
	err := s.RevokeRemote(r.Context(), name)
	switch {
	case errors.Is(err, errExternalEtcd):
		http.Error(w, err.Error(), http.StatusConflict)
	case err != nil:
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
	default:
		w.WriteHeader(http.StatusNoContent)
	}
}
