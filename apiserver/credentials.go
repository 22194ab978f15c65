package apiserver

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/registry"
	"github.com/trellis-mesh/trellis/kvstore"
)

// Credentials of the HTTP API.
//
// Two kinds, both bearer tokens of 32 random bytes:
//   - the admin token (<state-dir>/admin.token): everything, including
//     minting remote clusters' certificates and node credentials and
//     managing services. Only operators and their tools hold it.
//   - a node credential, minted by the admin for one node
//     (POST /admin/v1/nodes/{name}/credential): register that node and the
//     endpoints on it, and read. The node's agent holds it, never the
//     admin token.
//
// The server keeps the SHA-256 of each node credential in etcd under
// trellis/credentials/<cluster>/nodes/<node>, and in memory a map from
// that hash to the node, so a token is checked without a scan. Issuing
// again replaces the hash: the earlier token stops working.

// tokenBytes is the entropy of every token the server generates.
const tokenBytes = 32

// nodeCredentialRecord is what etcd holds of a node's credential.
type nodeCredentialRecord struct {
	Node   string    `json:"node"`
	SHA256 string    `json:"sha256"`
	Issued time.Time `json:"issued"`
}

// credentials checks the bearer tokens of HTTP requests.
type credentials struct {
	admin string
	store *kvstore.RecordStore[nodeCredentialRecord]

	mu     sync.Mutex // serializes issue and revoke, guards the maps
	byHash map[string]string
	byNode map[string]string
}

func newCredentials(admin string, client *kvstore.Client, cluster string) (*credentials, error) {
	store, err := kvstore.NewRecordStore[nodeCredentialRecord](client, "trellis/credentials/"+cluster+"/nodes/")
	if err != nil {
		return nil, err
	}
	return &credentials{admin: admin, store: store, byHash: map[string]string{}, byNode: map[string]string{}}, nil
}

// load reads the node credentials from etcd.
func (c *credentials) load(ctx context.Context) error {
	records, err := c.store.List(ctx)
	if err != nil {
		return fmt.Errorf("apiserver: load node credentials: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rec := range records {
		if rec.Err != nil || rec.Value.Node != rec.ID {
			continue // not usable; issuing the node's credential again replaces it
		}
		c.byHash[rec.Value.SHA256] = rec.ID
		c.byNode[rec.ID] = rec.Value.SHA256
	}
	return nil
}

// issue mints node's credential, replacing any earlier one.
func (c *credentials) issue(ctx context.Context, node string) (string, error) {
	token, err := newToken()
	if err != nil {
		return "", err
	}
	sum := hashToken(token)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.store.Put(ctx, node, nodeCredentialRecord{Node: node, SHA256: sum, Issued: time.Now().UTC()}); err != nil {
		return "", fmt.Errorf("apiserver: store node %s's credential: %w", node, err)
	}
	if old, ok := c.byNode[node]; ok {
		delete(c.byHash, old)
	}
	c.byHash[sum] = node
	c.byNode[node] = sum
	return token, nil
}

// revoke invalidates node's credential.
func (c *credentials) revoke(ctx context.Context, node string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.store.Delete(ctx, node); err != nil {
		return fmt.Errorf("apiserver: delete node %s's credential: %w", node, err)
	}
	if old, ok := c.byNode[node]; ok {
		delete(c.byHash, old)
		delete(c.byNode, node)
	}
	return nil
}

// Errors of authenticate, both a 401.
var (
	errNoCredential  = errors.New(`no credential: send "Authorization: Bearer <token>" (the admin token from <state-dir>/admin.token, or a node credential)`)
	errBadCredential = errors.New("credential not valid (a node credential is replaced when it is issued again)")
)

// authenticate says who r comes from. The scheme must be Bearer.
func (c *credentials) authenticate(r *http.Request) (registry.Principal, error) {
	h := r.Header.Get("Authorization")
	scheme, token, ok := strings.Cut(h, " ")
	if h == "" {
		return registry.Principal{}, errNoCredential
	}
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" || strings.ContainsAny(token, " \t") {
		return registry.Principal{}, fmt.Errorf(`authorization scheme: want "Bearer <token>"`)
	}
	if subtle.ConstantTimeCompare([]byte(token), []byte(c.admin)) == 1 {
		return registry.Principal{Admin: true}, nil
	}
	// A map lookup of a SHA-256 digest: what leaks through its timing is
	// about the digest, which says nothing usable about a token.
	sum := hashToken(token)
	c.mu.Lock()
	node, ok := c.byHash[sum]
	c.mu.Unlock()
	if !ok {
		return registry.Principal{}, errBadCredential
	}
	return registry.Principal{Node: node}, nil
}

func newToken() (string, error) {
	b := make([]byte, tokenBytes)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("apiserver: generate a token: %w", err)
	}
	return hex.EncodeToString(b), nil
}

func hashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// handleIssueNodeCredential mints a node's registry credential.
func (s *Server) handleIssueNodeCredential(w http.ResponseWriter, r *http.Request) {
	node := r.PathValue("name")
	if err := v1.ValidateNodeName(node); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	token, err := s.creds.issue(r.Context(), node)
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	s.log.Info("issued a node credential; the earlier one of this node no longer works", "node", node)
	writeJSON(w, v1.NodeCredential{Node: node, Token: token})
}

// handleRevokeNodeCredential invalidates a node's registry credential.
func (s *Server) handleRevokeNodeCredential(w http.ResponseWriter, r *http.Request) {
	node := r.PathValue("name")
	if err := v1.ValidateNodeName(node); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if err := s.creds.revoke(r.Context(), node); err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
