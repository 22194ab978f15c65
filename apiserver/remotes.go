package apiserver

import (
	"context"
	"fmt"
	"math/big"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/frontdoor"
	"github.com/trellis-mesh/trellis/apiserver/pki"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Remote clusters' credentials. Each remote cluster has at most one valid
// client certificate here: the one whose serial is in its record under
// RemotesPrefix. Issuing mints a new certificate and replaces the record,
// so every earlier certificate of that cluster stops working; revoking
// deletes the record. The etcd front door holds the same set in memory,
// loaded at start and changed together with the records, and closes a
// cluster's connections when its serial is replaced or revoked.
//
// Order: a new serial is stored before the door allows it, and a revoked
// one leaves the door before its record is deleted, so a failure in
// between errs on the side of refusing.

// RemotesPrefix is where the records of cluster's issued remote
// credentials live: private keys, outside what remote clusters may read.
func RemotesPrefix(cluster string) string { return "trellis/remotes/" + cluster + "/" }

// remoteRecord is the one valid certificate of a remote cluster.
type remoteRecord struct {
	// Serial is the certificate's serial number in hexadecimal.
	Serial   string    `json:"serial"`
	Issued   time.Time `json:"issued"`
	NotAfter time.Time `json:"notAfter"`
}

// loadRemotes reads the records and allows their serials at the door.
func (s *Server) loadRemotes(ctx context.Context) error {
	store, err := kvstore.NewRecordStore[remoteRecord](s.writer, RemotesPrefix(s.cfg.ClusterName))
	if err != nil {
		return fmt.Errorf("apiserver: %w", err)
	}
	s.remotes = store
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	recs, err := store.List(ctx)
	if err != nil {
		return fmt.Errorf("apiserver: load remote clusters' credentials: %w", err)
	}
	for _, r := range recs {
		serial, ok := new(big.Int).SetString(r.Value.Serial, 16)
		if r.Err != nil || !ok {
			// Refused until issued again; the rest still load.
			s.log.Error("unreadable record of a remote cluster's credentials; it is refused until `trellis connect` issues it again",
				"remote", r.ID, "key", store.Key(r.ID), "err", r.Err)
			continue
		}
		s.door.Allow(r.ID, serial)
	}
	s.log.Info("loaded remote clusters' credentials", "remotes", len(recs))
	return nil
}

// IssueRemote mints a client certificate for remote cluster name, makes
// it the only valid one for name (closing connections that used an
// earlier one) and returns the credentials.
func (s *Server) IssueRemote(ctx context.Context, name string) (v1.RemoteCredentials, error) {
	if s.door == nil {
		return v1.RemoteCredentials{}, fmt.Errorf("issue credentials for %s: only possible with the embedded etcd; with --etcd-endpoints create the user and certificate with your etcd's own tools", name)
	}
	if err := v1.ValidateClusterName(name); err != nil {
		return v1.RemoteCredentials{}, fmt.Errorf("issue credentials for %q: %w", name, err)
	}
	s.remotesMu.Lock()
	defer s.remotesMu.Unlock()
	cn := frontdoor.CommonName(name)
	certPEM, keyPEM, err := s.clientCA.IssueClient(cn, RemoteCertValidity)
	if err != nil {
		return v1.RemoteCredentials{}, fmt.Errorf("issue credentials for %s: %w", name, err)
	}
	cert, err := pki.ParseCertPEM(certPEM)
	if err != nil {
		return v1.RemoteCredentials{}, fmt.Errorf("issue credentials for %s: %w", name, err)
	}
	rec := remoteRecord{Serial: cert.SerialNumber.Text(16), Issued: time.Now().UTC(), NotAfter: cert.NotAfter}
	if err := s.remotes.Put(ctx, name, rec); err != nil {
		return v1.RemoteCredentials{}, fmt.Errorf("issue credentials for %s: store the certificate's serial: %w", name, err)
	}
	s.door.Allow(name, cert.SerialNumber)
	s.log.Info("issued remote cluster credentials; earlier ones of this cluster no longer work", "remote", name, "cn", cn, "serial", rec.Serial, "notAfter", rec.NotAfter)
	return v1.RemoteCredentials{
		Cluster: s.cfg.ClusterName, ClusterID: v1.ClusterID(s.cfg.ClusterID),
		Endpoints: []string{s.cfg.advertisedEtcdEndpoint()},
		For:       name, User: cn,
		CAPEM: string(s.ca.CertPEM), CertPEM: string(certPEM), KeyPEM: string(keyPEM),
	}, nil
}

// RevokeRemote makes every certificate of remote cluster name invalid and
// closes its connections, ending its watches. Revoking a cluster that has
// no credentials is fine.
func (s *Server) RevokeRemote(ctx context.Context, name string) error {
	if s.door == nil {
		return errExternalEtcd
	}
	if err := v1.ValidateClusterName(name); err != nil {
		return fmt.Errorf("revoke credentials of %q: %w", name, err)
	}
	s.remotesMu.Lock()
	defer s.remotesMu.Unlock()
	s.door.Revoke(name)
	if err := s.remotes.Delete(ctx, name); err != nil {
		return fmt.Errorf("revoke credentials of %s: it is cut off, but its record %s remains and would allow it again after a restart; retry: %w", name, s.remotes.Key(name), err)
	}
	return nil
}
