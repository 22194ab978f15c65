package ipsec

import (
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// What the kernel needs, by feature: the build options that provide it.
// The kernel's answer to a state it cannot build tells which feature is
// missing (see classifySAError); /proc/config.gz, when there, narrows the
// options to those not built in.
// (Functions, not variables: no package state anyone could change.)
func gcmOptions() []string {
	return []string{"CONFIG_CRYPTO_GCM", "CONFIG_CRYPTO_GHASH", "CONFIG_CRYPTO_CTR", "CONFIG_CRYPTO_AES", "CONFIG_CRYPTO_SEQIV"}
}
func esp4Options() []string { return []string{"CONFIG_INET_ESP"} }
func esp6Options() []string { return []string{"CONFIG_INET6_ESP"} }

const (
	featureGCM  = "AEAD " + AEADAlgorithm
	featureESP4 = "ESP over IPv4"
	featureESP6 = "ESP over IPv6"
)

// Throwaway states of the kernel check: documentation addresses
// (RFC 5737, RFC 3849), an SPI whose top 4 bits (0) no key index has, and
// probeReqid, so that one a crash left behind is Trellis's to clean up. No
// policy refers to them, so no packet ever uses them; each is deleted as
// soon as the kernel accepted it.
type probeTarget struct {
	src, dst netip.Addr
	feature  string
	options  []string
}

func probeTargets() []probeTarget {
	return []probeTarget{
		{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2"), featureESP4, esp4Options()},
		{netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2"), featureESP6, esp6Options()},
	}
}

const probeSPI = 0x00007e00

// CheckKernel checks that the kernel of network namespace ns (ns <= 0:
// the caller's) can hold Trellis's ESP states, by adding a throwaway state
// per address family (and deleting it). It returns nil, an error matching
// ErrNotSupported (an *UnsupportedError naming the missing features and
// kernel options), or another error when the probe itself failed (no
// CAP_NET_ADMIN, say).
//
// The kernel's answers it classifies (Linux 6.18): ENOSYS, "Requested AEAD
// algorithm not found": no rfc4106(gcm(aes)) (CONFIG_CRYPTO_GCM and what it
// needs); EPROTONOSUPPORT, "Requested type not found": no ESP for the
// family (CONFIG_INET_ESP, CONFIG_INET6_ESP); ENOENT from ESP's set-up:
// the AEAD exists but ESP could not instantiate it (CONFIG_CRYPTO_SEQIV).
// The kernel looks up the algorithm before the ESP type, so when GCM is
// missing the check probes again with cbc(aes) and hmac(sha256), then
// with cipher_null, to learn whether ESP is missing too. A kernel without
// IPv6 (EAFNOSUPPORT) is not an IPsec gap: only IPv4 is checked there.
// Without xfrm's netlink interface (CONFIG_XFRM_USER) the socket itself is
// refused.
func CheckKernel(ns netns.NsHandle) error {
	x, err := openXfrm(ns)
	if err != nil {
		return err
	}
	defer x.close()
	return checkKernel(x)
}

func checkKernel(x xfrmKernel) error {
	u := &UnsupportedError{}
	for _, p := range probeTargets() {
		base := sa{src: p.src, dst: p.dst, spi: probeSPI, reqid: probeReqid, proto: protoESP, mode: modeTunnel, replay: ReplayWindow}
		gcm := base
		gcm.aead = &algo{name: AEADAlgorithm, key: make([]byte, AEADKeyBytes), bits: AEADICVBits}
		err := probe(x, gcm)
		switch {
		case err == nil:
			continue
		case p.dst.Is6() && errors.Is(err, unix.EAFNOSUPPORT):
			continue // no IPv6 in this kernel
		case errors.Is(err, unix.ENOSYS), errors.Is(err, unix.ENOENT):
			u.add(MissingFeature{Feature: featureGCM, Options: gcmOptions(), Err: err})
			// The algorithm hid whether ESP exists: ask with others.
			for _, alt := range []sa{withAlgos(base, &algo{name: "cbc(aes)", key: make([]byte, 32)}, &algo{name: "hmac(sha256)", key: make([]byte, 32), bits: 128}),
				withAlgos(base, &algo{name: "ecb(cipher_null)"}, nil)} {
				err := probe(x, alt)
				if errors.Is(err, unix.ENOSYS) {
					continue // this algorithm is missing too
				}
				if errors.Is(err, unix.EPROTONOSUPPORT) {
					u.add(MissingFeature{Feature: p.feature, Options: p.options, Err: err})
				}
				break
			}
		case errors.Is(err, unix.EPROTONOSUPPORT):
			u.add(MissingFeature{Feature: p.feature, Options: p.options, Err: err})
		default:
			return fmt.Errorf("ipsec: kernel check: add a throwaway ESP state %s → %s: %w", p.src, p.dst, err)
		}
	}
	if len(u.Missing) == 0 {
		return nil
	}
	u.narrow(readKernelConfig())
	return u
}

func withAlgos(s sa, crypt, auth *algo) sa {
	s.crypt, s.auth = crypt, auth
	return s
}

// probe adds s and deletes it again. A probe state left by an earlier
// process (EEXIST) proves the kernel took one before.
func probe(x xfrmKernel, s sa) error {
	err := x.addSA(s)
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	if err := x.delSA(s); err != nil {
		return fmt.Errorf("ipsec: kernel check: delete the throwaway state %s → %s: %w", s.src, s.dst, err)
	}
	return nil
}

// classifySAError wraps the kernel's refusal of a state in an
// *UnsupportedError when it says a feature is missing, and returns nil
// otherwise.
func classifySAError(err error, dst netip.Addr) *UnsupportedError {
	u := &UnsupportedError{}
	switch {
	case errors.Is(err, unix.ENOSYS), errors.Is(err, unix.ENOENT):
		u.add(MissingFeature{Feature: featureGCM, Options: gcmOptions(), Err: err})
	case errors.Is(err, unix.EPROTONOSUPPORT) && dst.Is4():
		u.add(MissingFeature{Feature: featureESP4, Options: esp4Options(), Err: err})
	case errors.Is(err, unix.EPROTONOSUPPORT):
		u.add(MissingFeature{Feature: featureESP6, Options: esp6Options(), Err: err})
	default:
		return nil
	}
	u.narrow(readKernelConfig())
	return u
}

// narrow keeps, of each feature's options, those cfg does not have built
// in.
func (e *UnsupportedError) narrow(cfg map[string]string) {
	for i := range e.Missing {
		e.Missing[i].Options = narrowOptions(e.Missing[i].Options, cfg)
	}
}

// narrowOptions returns the options cfg does not have as "y": not set, or
// a module (which the kernel then could not load). All of them when cfg is
// nil (configuration unknown) or has them all (it then cannot tell).
func narrowOptions(options []string, cfg map[string]string) []string {
	if cfg == nil {
		return options
	}
	var out []string
	for _, o := range options {
		if cfg[o] != "y" {
			out = append(out, o)
		}
	}
	if len(out) == 0 {
		return options
	}
	return out
}

// readKernelConfig reads the running kernel's build configuration from
// /proc/config.gz (CONFIG_IKCONFIG_PROC), nil when it is not there.
func readKernelConfig() map[string]string {
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		return nil
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return nil
	}
	cfg, err := parseKernelConfig(zr)
	if err != nil {
		return nil
	}
	return cfg
}

// parseKernelConfig reads "CONFIG_X=y" lines; "# CONFIG_X is not set"
// lines and others are left out.
func parseKernelConfig(r io.Reader) (map[string]string, error) {
	cfg := map[string]string{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if ok && strings.HasPrefix(k, "CONFIG_") {
			cfg[k] = v
		}
	}
	return cfg, sc.Err()
}
