package pki

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// ServerCommonName is the CN of server certificates. It names no etcd
// user, and the certificate is not a client certificate (no clientAuth
// usage; the client CA, not the server CA, signs those).
const ServerCommonName = "trellis-apiserver"

// DefaultHosts are always in a server certificate: local clients and
// the etcd front door dial the internal etcd on loopback. It returns a new slice.
func DefaultHosts() []string { return []string{"127.0.0.1", "::1", "localhost"} }

// EnsureServerCert makes sure dir holds server.crt and server.key signed by
// ca, valid for more than RenewBefore, and naming every host (IP addresses
// and DNS names, plus 127.0.0.1, ::1 and localhost). Otherwise it issues a
// new pair (ECDSA P-256, ServerValidity, extended key usage serverAuth
// only; a pair from before that is also a client certificate is
// replaced). It returns the two paths.
func (ca *CA) EnsureServerCert(dir string, hosts []string) (certFile, keyFile string, err error) {
	certFile = filepath.Join(dir, ServerCertFile)
	keyFile = filepath.Join(dir, ServerKeyFile)
	ips, names, err := splitHosts(hosts)
	if err != nil {
		return "", "", fmt.Errorf("pki: server certificate %s: %w", certFile, err)
	}
	reason, err := ca.serverCertProblem(certFile, keyFile, ips, names, time.Now())
	if err != nil {
		return "", "", fmt.Errorf("pki: check server certificate %s: %w", certFile, err)
	}
	if reason == "" {
		return certFile, keyFile, nil
	}

	key, keyPEM, err := newKey()
	if err != nil {
		return "", "", fmt.Errorf("pki: issue server certificate %s: %w", certFile, err)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: ServerCommonName, Organization: []string{"trellis"}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    names,
	}
	for _, ip := range ips {
		tmpl.IPAddresses = append(tmpl.IPAddresses, net.IP(ip.AsSlice()))
	}
	der, err := ca.sign(tmpl, key.Public(), ServerValidity)
	if err != nil {
		return "", "", fmt.Errorf("pki: issue server certificate %s: %w", certFile, err)
	}
	// Key first; a crash in between leaves a mismatched pair, which the
	// next call detects and reissues.
	if err := writeFileAtomic(keyFile, keyPEM, keyMode); err != nil {
		return "", "", fmt.Errorf("pki: write server key %s: %w", keyFile, err)
	}
	if err := writeFileAtomic(certFile, encodeCert(der), certMode); err != nil {
		return "", "", fmt.Errorf("pki: write server certificate %s: %w", certFile, err)
	}
	ca.log().Info("issued server certificate", "file", certFile, "reason", reason,
		"ips", tmpl.IPAddresses, "dns", names, "notAfter", tmpl.NotAfter.Format(time.RFC3339))
	return certFile, keyFile, nil
}

// serverCertProblem says why the pair on disk must be reissued, or "" when
// it is fine. err is for failures to read what exists, not for bad
// content.
func (ca *CA) serverCertProblem(certFile, keyFile string, ips []netip.Addr, names []string, now time.Time) (string, error) {
	cert, reason, err := ca.pairProblem(certFile, keyFile, now)
	if reason != "" || err != nil {
		return reason, err
	}
	if !slices.Equal(cert.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) {
		// Before the client CA, the server certificate was also a client
		// certificate (etcd's gRPC gateway dialled itself with it).
		return "extended key usage is not serverAuth alone", nil
	}
	for _, ip := range ips {
		if !slices.ContainsFunc(cert.IPAddresses, func(have net.IP) bool {
			a, ok := netip.AddrFromSlice(have)
			return ok && a.Unmap() == ip
		}) {
			return "missing IP SAN " + ip.String(), nil
		}
	}
	for _, name := range names {
		if !slices.ContainsFunc(cert.DNSNames, func(have string) bool { return strings.EqualFold(have, name) }) {
			return "missing DNS SAN " + name, nil
		}
	}
	return "", nil
}

// splitHosts sorts hosts (plus the defaults) into IP addresses and DNS
// names, dropping duplicates and empties, keeping order.
func splitHosts(hosts []string) ([]netip.Addr, []string, error) {
	var (
		ips   []netip.Addr
		names []string
	)
	for _, h := range append(DefaultHosts(), hosts...) {
		h = strings.TrimSpace(h)
		h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
		if h == "" {
			continue
		}
		if ip, err := netip.ParseAddr(h); err == nil {
			if ip.Zone() != "" {
				return nil, nil, fmt.Errorf("host %q: an IP address with a zone cannot be a SAN", h)
			}
			ip = ip.Unmap()
			if !slices.Contains(ips, ip) {
				ips = append(ips, ip)
			}
			continue
		}
		if strings.ContainsAny(h, " /:@") {
			return nil, nil, fmt.Errorf("host %q is neither an IP address nor a DNS name", h)
		}
		h = strings.ToLower(strings.TrimSuffix(h, "."))
		if !slices.Contains(names, h) {
			names = append(names, h)
		}
	}
	return ips, names, nil
}
