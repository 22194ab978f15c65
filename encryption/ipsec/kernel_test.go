package ipsec

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestKernelConfigNarrows(t *testing.T) {
	cfg, err := parseKernelConfig(strings.NewReader(`# comment
CONFIG_XFRM_USER=y
# CONFIG_INET_ESP is not set
CONFIG_INET6_ESP=m
CONFIG_CRYPTO_AES=y
CONFIG_CRYPTO_CTR=y
# CONFIG_CRYPTO_GCM is not set
CONFIG_CRYPTO_SEQIV=y
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		in, want []string
	}{
		{gcmOptions(), []string{"CONFIG_CRYPTO_GCM", "CONFIG_CRYPTO_GHASH"}},
		{esp4Options(), []string{"CONFIG_INET_ESP"}},
		// A module the kernel could not load counts as missing.
		{esp6Options(), []string{"CONFIG_INET6_ESP"}},
		// All built in: the configuration cannot tell; keep them all.
		{[]string{"CONFIG_XFRM_USER"}, []string{"CONFIG_XFRM_USER"}},
	} {
		if got := narrowOptions(tc.in, cfg); !slices.Equal(got, tc.want) {
			t.Errorf("narrowOptions(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
	if got := narrowOptions(gcmOptions(), nil); !slices.Equal(got, gcmOptions()) {
		t.Errorf("without a configuration: %v", got)
	}
}

func TestUnsupportedError(t *testing.T) {
	u := classifySAError(unix.ENOSYS, netipAddr("10.0.0.1"))
	if u == nil || u.Missing[0].Feature != featureGCM {
		t.Fatalf("ENOSYS: %v", u)
	}
	u.add(classifySAError(unix.EPROTONOSUPPORT, netipAddr("10.0.0.1")).Missing[0])
	u.add(classifySAError(unix.EPROTONOSUPPORT, netipAddr("fd00::1")).Missing[0])
	u.add(MissingFeature{Feature: featureESP4, Options: []string{"X"}}) // a duplicate feature is dropped
	if len(u.Missing) != 3 {
		t.Fatalf("missing %v", u.Missing)
	}
	var err error = u
	if !errors.Is(err, ErrNotSupported) || !errors.Is(err, errors.ErrUnsupported) || !errors.Is(err, unix.ENOSYS) || !errors.Is(err, unix.EPROTONOSUPPORT) {
		t.Error("errors.Is")
	}
	opts := u.Options()
	for _, o := range []string{"CONFIG_INET_ESP", "CONFIG_INET6_ESP"} {
		if !slices.Contains(opts, o) || !strings.Contains(err.Error(), o) {
			t.Errorf("%s not named: %v / %s", o, opts, err)
		}
	}
	if !strings.Contains(err.Error(), "--type wireguard") {
		t.Errorf("no hint: %s", err)
	}
	if classifySAError(unix.EINVAL, netipAddr("10.0.0.1")) != nil {
		t.Error("EINVAL classified as missing")
	}
}

func netipAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
