package apiserver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/kvstore"
)

// The cluster's encryption setting.
//
// It is stored under SettingsPrefix (private: remote clusters read only
// what the cluster-config publishes) and changed through the admin API:
// stored first, then published in the cluster-config, which agents apply
// live (a change of it ends no session). When publishing fails the stored
// record is put back, so what is stored is what was published. The
// --encryption flag only seeds a cluster that never had a setting.

// SettingsPrefix is where a cluster's private settings are kept.
func SettingsPrefix(cluster string) string { return "trellis/settings/" + cluster + "/" }

const encryptionSettingID = "encryption"

// encryptionSetting is the stored setting and its revision.
type encryptionSetting struct {
	store *kvstore.RecordStore[v1.EncryptionConfig]

	mu  sync.Mutex // serializes changes
	cur v1.EncryptionConfig
	rev int64 // 0: never stored (cur came from the flag)
}

// loadEncryption reads the stored setting, or takes the flag's.
func (s *Server) loadEncryption(ctx context.Context) error {
	store, err := kvstore.NewRecordStore[v1.EncryptionConfig](s.writer, SettingsPrefix(s.cfg.ClusterName))
	if err != nil {
		return fmt.Errorf("apiserver: %w", err)
	}
	s.enc = &encryptionSetting{store: store, cur: v1.EncryptionConfig{Type: s.cfg.Encryption}}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	rec, ok, err := store.Get(ctx, encryptionSettingID)
	switch {
	case err != nil:
		return fmt.Errorf("apiserver: read the encryption setting %s: %w", store.Key(encryptionSettingID), err)
	case !ok:
		return nil
	case rec.Err != nil:
		// Refuse to guess: publishing "off" for a cluster set to strict
		// would silently send its traffic in clear.
		return fmt.Errorf("apiserver: the encryption setting %s is unreadable (%w); set it again with `trellis encryption enable|disable` after deleting the key", store.Key(encryptionSettingID), rec.Err)
	}
	if err := rec.Value.Validate(); err != nil {
		return fmt.Errorf("apiserver: the stored encryption setting %s: %w", store.Key(encryptionSettingID), err)
	}
	if s.cfg.Encryption != "" && s.cfg.Encryption != rec.Value.Type {
		s.log.Warn("--encryption differs from the setting stored by `trellis encryption`; the stored one wins", "flag", s.cfg.Encryption, "stored", rec.Value.Type)
	}
	s.enc.cur, s.enc.rev = rec.Value, rec.Revision
	return nil
}

// clusterConfig is what the server publishes about its cluster now.
func (s *Server) clusterConfig() v1.ClusterConfig {
	cc := s.cfg.ClusterConfig()
	if s.enc != nil {
		s.enc.mu.Lock()
		cc.Encryption = s.enc.cur
		s.enc.mu.Unlock()
	}
	return cc
}

// changeEncryption applies change to the setting: it stores the result,
// then publishes it, and puts the old record back when publishing fails.
func (s *Server) changeEncryption(ctx context.Context, change func(v1.EncryptionConfig) (v1.EncryptionConfig, error)) (v1.EncryptionConfig, error) {
	e := s.enc
	e.mu.Lock()
	defer e.mu.Unlock()
	prev, prevRev := e.cur, e.rev
	next, err := change(prev)
	if err != nil {
		return prev, err
	}
	if err := next.Validate(); err != nil {
		return prev, errInvalidSetting{err}
	}
	if next == prev && prevRev != 0 {
		return prev, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	rev, err := e.store.PutIf(ctx, encryptionSettingID, next, prevRev)
	if err != nil {
		return prev, fmt.Errorf("store the encryption setting: %w", err)
	}
	e.cur, e.rev = next, rev
	if err := s.publishClusterConfigLocked(ctx, s.clusterConfigWith(next)); err != nil {
		e.cur = prev
		if prevRev == 0 {
			err = errors.Join(err, e.store.DeleteIf(ctx, encryptionSettingID, rev))
			e.rev = 0
		} else if back, perr := e.store.PutIf(ctx, encryptionSettingID, prev, rev); perr != nil {
			err = errors.Join(err, fmt.Errorf("put the previous setting back: %w", perr))
		} else {
			e.rev = back
		}
		return prev, fmt.Errorf("publish the encryption setting: %w", err)
	}
	s.log.Info("encryption setting changed", "from", prev, "to", next)
	return next, nil
}

func (s *Server) clusterConfigWith(enc v1.EncryptionConfig) v1.ClusterConfig {
	cc := s.cfg.ClusterConfig()
	cc.Encryption = enc
	return cc
}

// errInvalidSetting is a request the setting's validation refused.
type errInvalidSetting struct{ err error }

func (e errInvalidSetting) Error() string { return e.err.Error() }
func (e errInvalidSetting) Unwrap() error { return e.err }

// handleEncryption is GET /admin/v1/encryption: the setting and what each
// node of the cluster publishes.
func (s *Server) handleEncryption(w http.ResponseWriter, r *http.Request) {
	st := v1.EncryptionStatus{Setting: s.clusterConfig().Encryption, Nodes: []v1.NodeEncryption{}}
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	_, err := s.writer.List(ctx, v1.KindPrefix(v1.KindNodes, s.cfg.ClusterName), kvstore.ListOptions{}, func(kv kvstore.KeyValue) {
		if n, err := v1.DecodeNodeEntry(kv.Key, kv.Value); err == nil {
			st.Nodes = append(st.Nodes, v1.NodeEncryption{Name: n.Name, WireGuardPublicKey: n.WireGuardPublicKey, IPsecKeyIndex: n.IPsecKeyIndex})
		}
	})
	if err != nil {
		http.Error(w, "list the cluster's published nodes: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	slices.SortFunc(st.Nodes, func(a, b v1.NodeEncryption) int { return strings.Compare(a.Name, b.Name) })
	writeJSON(w, st)
}

// handleSetEncryption is PUT /admin/v1/encryption.
func (s *Server) handleSetEncryption(w http.ResponseWriter, r *http.Request) {
	var req v1.EncryptionRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		http.Error(w, "encryption request: "+err.Error()+` (want {"type": "wireguard"|"ipsec"|"", "strict": bool})`, http.StatusBadRequest)
		return
	}
	got, err := s.changeEncryption(r.Context(), func(cur v1.EncryptionConfig) (v1.EncryptionConfig, error) {
		next := cur
		next.Type, next.Strict = req.Type, req.Strict
		if next.Type == v1.EncryptionNone {
			next.Strict = false
		}
		return next, nil
	})
	s.respondSetting(w, got, err)
}

// handleRotateEncryption is POST /admin/v1/encryption/rotate: every node
// of the cluster takes a new key.
func (s *Server) handleRotateEncryption(w http.ResponseWriter, r *http.Request) {
	got, err := s.changeEncryption(r.Context(), func(cur v1.EncryptionConfig) (v1.EncryptionConfig, error) {
		if cur.Type == v1.EncryptionNone {
			return cur, errInvalidSetting{errors.New("encryption is off: there are no keys to rotate (trellis encryption enable first)")}
		}
		cur.Rotation++
		return cur, nil
	})
	s.respondSetting(w, got, err)
}

func (s *Server) respondSetting(w http.ResponseWriter, got v1.EncryptionConfig, err error) {
	var bad errInvalidSetting
	switch {
	case errors.As(err, &bad):
		http.Error(w, bad.Error(), http.StatusBadRequest)
	case err != nil:
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
	default:
		writeJSON(w, got)
	}
}
