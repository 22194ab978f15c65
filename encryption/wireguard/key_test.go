package wireguard

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestLoadOrCreateKey(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state", "wireguard.key")
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))

	key, err := LoadOrCreateKey(path, log)
	if err != nil {
		t.Fatal(err)
	}
	if key == (wgtypes.Key{}) {
		t.Fatal("the zero key")
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", st.Mode().Perm())
	}
	if st, _ := os.Stat(filepath.Dir(path)); st.Mode().Perm() != 0o700 {
		t.Errorf("created directory mode %v, want 0700", st.Mode().Perm())
	}
	data, _ := os.ReadFile(path)
	if string(data) != key.String()+"\n" {
		t.Errorf("key file holds %q, want the base64 key and a newline", data)
	}
	if ents, _ := os.ReadDir(filepath.Dir(path)); len(ents) != 1 {
		t.Errorf("directory holds %d files, want the key alone (no temporary file left)", len(ents))
	}

	again, err := LoadOrCreateKey(path, log)
	if err != nil || again != key {
		t.Fatalf("reload: %v, same key %v", err, again == key)
	}
	if strings.Contains(logs.String(), "WARN") {
		t.Errorf("warning for a private key file: %s", logs.String())
	}

	// Readable by others: made private again, with a warning.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	logs.Reset()
	again, err = LoadOrCreateKey(path, log)
	if err != nil || again != key {
		t.Fatalf("reload of a 0644 file: %v, same key %v", err, again == key)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("mode after reload %v, want 0600", st.Mode().Perm())
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), path) || !strings.Contains(logs.String(), "mode=0644") {
		t.Errorf("no warning naming the file and its mode: %q", logs.String())
	}
}

func TestLoadKeyRefusesGarbage(t *testing.T) {
	dir := t.TempDir()
	valid, _ := wgtypes.GeneratePrivateKey()
	for _, tc := range []struct {
		name, content, want string
	}{
		{"empty", "", "empty"},
		{"text", "hello world\n", "not a base64 WireGuard key"},
		{"short", "AAAA\n", "not a base64 WireGuard key"},
		{"hex", strings.Repeat("ab", 32) + "\n", "not a base64 WireGuard key"},
		{"long", valid.String() + strings.Repeat("x", 200), "longer than a key"},
		{"zero", wgtypes.Key{}.String() + "\n", "the zero key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.name+".key")
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := LoadOrCreateKey(path, nil)
			if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("LoadOrCreateKey(%q): %v; want an error naming the file and %q", tc.content, err, tc.want)
			}
			// Never replaced.
			if data, _ := os.ReadFile(path); string(data) != tc.content {
				t.Errorf("the file was changed to %q", data)
			}
		})
	}
	if err := os.Mkdir(filepath.Join(dir, "adir.key"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateKey(filepath.Join(dir, "adir.key"), nil); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("a directory as key file: %v", err)
	}
}

func TestWriteKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "wireguard.key")
	first, err := LoadOrCreateKey(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	next, _ := wgtypes.GeneratePrivateKey()
	if err := WriteKey(path, next); err != nil {
		t.Fatal(err)
	}
	got, err := LoadOrCreateKey(path, nil)
	if err != nil || got != next || got == first {
		t.Fatalf("after WriteKey: %v, got the new key %v", err, got == next)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", st.Mode().Perm())
	}
	if ents, _ := os.ReadDir(filepath.Dir(path)); len(ents) != 1 {
		t.Errorf("directory holds %d files, want 1", len(ents))
	}
	if err := WriteKey(path, wgtypes.Key{}); err == nil {
		t.Error("WriteKey accepted the zero key")
	}
}
