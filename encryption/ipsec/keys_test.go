package ipsec

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func randomish(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*37) ^ seed*11 + byte(i>>3)
	}
	return b
}

func TestParseKeys(t *testing.T) {
	k1, k2 := randomish(32, 1), randomish(48, 2)
	data := "# Trellis IPsec keys\n\n" +
		"1 " + hex.EncodeToString(k1) + "\n" +
		"   # indented comment\n" +
		"2\t" + base64.StdEncoding.EncodeToString(k2) + "  \r\n"
	keys, err := ParseKeys("ipsec.keys", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	if keys.Current() != 2 || !slices.Equal(keys.Indexes(), []uint8{1, 2}) || !keys.Has(1) || keys.Has(3) || keys.Has(0) || keys.Has(16) {
		t.Errorf("keys %s", keys)
	}
	if !bytes.Equal(keys.psk[1], k1) || !bytes.Equal(keys.psk[2], k2) {
		t.Error("keys decoded wrong")
	}
	if s := keys.String(); strings.Contains(s, hex.EncodeToString(k1)[:16]) || !strings.Contains(s, "current 2") {
		t.Errorf("String: %s", s)
	}
	var buf bytes.Buffer
	slog.New(slog.NewTextHandler(&buf, nil)).Info("keys", "keys", keys)
	if strings.Contains(buf.String(), hex.EncodeToString(k1)[:16]) || !strings.Contains(buf.String(), "keys.current=2") {
		t.Errorf("log: %s", buf.String())
	}
	// Wrapping around after 15: the file names the current index.
	wrapped, err := ParseKeys("f", []byte("15 "+hex.EncodeToString(k1)+"\ncurrent 1\n1 "+hex.EncodeToString(k2)+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if wrapped.Current() != 1 || !slices.Equal(wrapped.Indexes(), []uint8{1, 15}) {
		t.Errorf("wrapped: %s", wrapped)
	}
	// Uppercase hex is hex.
	if _, err := ParseKeys("f", []byte("3 "+strings.ToUpper(hex.EncodeToString(k1)))); err != nil {
		t.Error(err)
	}
}

func TestParseKeysBad(t *testing.T) {
	good := hex.EncodeToString(randomish(32, 3))
	for _, tc := range []struct {
		name, data, want string
	}{
		{"empty", "", "no key"},
		{"comments only", "# nothing\n", "no key"},
		{"one field", "1\n", "line 1: 1 fields"},
		{"three fields", "1 " + good + " extra\n", "line 1: 3 fields"},
		{"index 0", "0 " + good, `line 1: index "0" is not a number from 1 to 15`},
		{"index 16", "# c\n16 " + good, `line 2: index "16"`},
		{"index word", "one " + good, `index "one"`},
		{"negative", "-1 " + good, `index "-1"`},
		{"twice", "1 " + good + "\n1 " + good, "line 2: index 1 appears twice"},
		{"short hex", "1 " + good[:62], "line 1: key 1: 31 bytes, want at least 32"},
		{"short base64", "1 " + base64.StdEncoding.EncodeToString(randomish(31, 4)), "31 bytes"},
		{"not base64", "1 zz!zz", "neither hex nor standard base64"},
		{"unpadded base64", "1 " + strings.TrimRight(base64.StdEncoding.EncodeToString(randomish(32, 5)), "="), "neither hex nor standard base64"},
		{"passphrase", "1 " + base64.StdEncoding.EncodeToString([]byte("correct horse correct horse correct horse")), "distinct byte values"},
		{"zeros", "1 " + strings.Repeat("00", 32), "1 distinct byte values"},
		{"current 0", "1 " + good + "\ncurrent 0", `line 2: current index "0"`},
		{"current twice", "1 " + good + "\ncurrent 1\ncurrent 1", `line 3: a second "current" line`},
		{"current without key", "1 " + good + "\n\ncurrent 2", "line 3: current index 2 has no key"},
		{"huge", "1 " + hex.EncodeToString(randomish(MaxKeyBytes+1, 6)), "want at most"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseKeys("/etc/trellis/ipsec.keys", []byte(tc.data))
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrBadKeyFile) || !strings.Contains(err.Error(), "/etc/trellis/ipsec.keys") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q: want ErrBadKeyFile naming the file and %q", err, tc.want)
			}
			if strings.Contains(tc.want, "line") && !strings.Contains(tc.want, "has no key") && !strings.Contains(err.Error(), "want \"<index 1-15> <key: hex or base64") {
				t.Errorf("error %q does not say what is allowed", err)
			}
		})
	}
}

func TestLoadKeysPermissions(t *testing.T) {
	dir := t.TempDir()
	content := []byte("1 " + hex.EncodeToString(randomish(32, 7)) + "\n")
	for _, tc := range []struct {
		mode, want os.FileMode
		warn       bool
	}{
		{0o600, 0o600, false},
		{0o400, 0o400, false},
		{0o644, 0o600, true},
		{0o660, 0o600, true},
		{0o606, 0o600, true},
		{0o640, 0o600, true},
	} {
		path := filepath.Join(dir, "keys-"+tc.mode.String())
		if err := os.WriteFile(path, content, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, tc.mode); err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		keys, err := LoadKeys(path, slog.New(slog.NewTextHandler(&buf, nil)))
		if err != nil {
			t.Fatalf("%v: %v", tc.mode, err)
		}
		if keys.Current() != 1 || keys.Source() != path {
			t.Errorf("%v: keys %s", tc.mode, keys)
		}
		info, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode().Perm() != tc.want {
			t.Errorf("mode %v became %v, want %v", tc.mode, info.Mode().Perm(), tc.want)
		}
		warned := strings.Contains(buf.String(), "level=WARN") && strings.Contains(buf.String(), path)
		if warned != tc.warn {
			t.Errorf("mode %v: warning %v, want %v: %s", tc.mode, warned, tc.warn, buf.String())
		}
	}

	if _, err := LoadKeys(dir, nil); !errors.Is(err, ErrBadKeyFile) || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("directory: %v", err)
	}
	if _, err := LoadKeys(filepath.Join(dir, "missing"), nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(bad, []byte("1 abc\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeys(bad, nil); !errors.Is(err, ErrBadKeyFile) || !strings.Contains(err.Error(), bad+" line 1") {
		t.Errorf("bad content: %v", err)
	}
}

func TestNewKeys(t *testing.T) {
	k := randomish(32, 8)
	keys, err := NewKeys(map[uint8][]byte{3: k})
	if err != nil {
		t.Fatal(err)
	}
	k[0] ^= 0xff
	if keys.psk[3][0] == k[0] {
		t.Error("NewKeys keeps the caller's slice")
	}
	for _, bad := range []map[uint8][]byte{{0: k}, {16: k}, {1: k[:31]}} {
		if _, err := NewKeys(bad); !errors.Is(err, ErrBadKeyFile) {
			t.Errorf("NewKeys(%v): %v", bad, err)
		}
	}
	var zero Keys
	if zero.Current() != 0 || zero.Has(1) || len(zero.Indexes()) != 0 {
		t.Error("zero Keys holds keys")
	}
}
