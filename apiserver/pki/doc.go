// Package pki owns the mesh API server's certificates.
//
// A cluster has two certificate authorities, both kept in the API server's
// state dir, created on first start unless an operator put their own pair
// there, and never replaced by the server on its own:
//
//   - The server CA (ca.crt, ca.key, LoadOrCreateCA) signs etcd's serving
//     certificate. Its certificate is what remote clusters trust; it is
//     handed out with every remote credential. A new server CA means every
//     remote cluster's cluster file must be written again.
//   - The client CA (client-ca.crt, client-ca.key, LoadOrCreateClientCA)
//     signs every client certificate this cluster's etcd accepts: the
//     local root and writer, the etcd front door's own identity, and the
//     remote readers. It never leaves the state dir and no other cluster
//     trusts it, so nothing a state dir holds is a credential on another
//     cluster's etcd, except the read-only remote certificates issued to
//     it. A new client CA invalidates every remote credential issued
//     before.
//
// The two are separate so that trusting a cluster's server (which every
// remote reader must) never means accepting clients another party can
// mint: a CA shared across clusters, as the lab once did, made one
// cluster's root certificate root on every other cluster's etcd.
//
// A missing half of a pair or a pair that does not match is an error for
// a human to resolve, not something to repair.
//
// The server certificate (server.crt, server.key) is cheap: EnsureServerCert
// reissues it whenever it is missing, was signed by another CA, expires
// within 30 days, lacks a name the caller asked for, or is also a client
// certificate (as it was when etcd's gRPC gateway dialled itself with it;
// the API server runs etcd without the gateway).
//
// Client certificates are minted per remote cluster (IssueClient) and per
// local identity (EnsureClientCert, which also replaces a certificate
// signed by another CA, as after the upgrade to a client CA). Their common
// name is the etcd user name: with --client-cert-auth and auth enabled,
// etcd takes the user from the CN of the verified chain's leaf, so the CN
// is the authorization decision. A remote reader's certificate (CN
// remote-<cluster>) names no etcd user: the etcd front door checks it and
// forwards the connection as one read-only user.
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
