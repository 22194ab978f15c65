// Package pki owns the mesh API server's certificates.
//
// One cluster has one certificate authority, kept in the API server's
// state dir as ca.crt and ca.key. The API server creates it on first start
// (LoadOrCreateCA) unless an operator put their own pair there, and never
// replaces it on its own: every remote cluster's client certificate chains
// to it, so a new CA disconnects the whole mesh. A missing half of the pair
// or a pair that does not match is an error for a human to resolve, not
// something to repair.
//
// The server certificate (server.crt, server.key) is cheap: EnsureServerCert
// reissues it whenever it is missing, was signed by another CA, expires
// within 30 days, or lacks a name the caller asked for. etcd presents the
// same certificate as a client when its gRPC gateway dials itself, so it
// carries both the server and the client extended key usage.
//
// Client certificates (IssueClient) are minted per remote cluster and per
// local role. Their common name is the etcd user name: with
// --client-cert-auth and auth enabled, etcd takes the user from the CN of
// the verified chain's leaf, so the CN is the authorization decision.
//
// Files: keys are written 0600, directories created 0700, and every file is
// written to a temporary name and renamed into place, so a crash leaves
// either the old or the new file, never half of one. Keys are PKCS#8 ECDSA
// P-256; loading also accepts PKCS#1 RSA and SEC 1 EC keys an operator may
// provide.
//
// Nothing here is safe for two processes sharing one state dir at once;
// the API server owns its dir.
package pki
