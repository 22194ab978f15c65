package apiserver

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/trellis-mesh/trellis/apiserver/pki"
)

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, data := range files {
		path := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(data), 0o400); err != nil {
			t.Fatal(err)
		}
	}
}

func TestAdoptSecrets(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	full := map[string]string{
		pki.CACertFile: "server CA cert", pki.CAKeyFile: "server CA key",
		pki.ClientCACertFile: "client CA cert", pki.ClientCAKeyFile: "client CA key",
		"admin.token": "token\n",
	}

	t.Run("copies into an empty state dir, then accepts the same files", func(t *testing.T) {
		secrets, state := t.TempDir(), filepath.Join(t.TempDir(), "state")
		writeFiles(t, secrets, full)
		if err := os.MkdirAll(state, 0o700); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if err := adoptSecrets(secrets, state, log); err != nil {
				t.Fatal(err)
			}
		}
		got, err := os.ReadFile(filepath.Join(state, "pki", pki.CAKeyFile))
		if err != nil || string(got) != "server CA key" {
			t.Fatalf("pki/ca.key = %q, %v", got, err)
		}
		info, err := os.Stat(filepath.Join(state, "pki"))
		if err != nil || info.Mode().Perm() != 0o700 {
			t.Fatalf("pki dir: %v, %v", info, err)
		}
	})

	t.Run("the admin token ignores surrounding white space", func(t *testing.T) {
		secrets, state := t.TempDir(), t.TempDir()
		writeFiles(t, secrets, map[string]string{"admin.token": "token"})
		writeFiles(t, state, map[string]string{"admin.token": "token\n"})
		if err := adoptSecrets(secrets, state, log); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("only some files: the rest stays the server's to make", func(t *testing.T) {
		secrets, state := t.TempDir(), t.TempDir()
		writeFiles(t, secrets, map[string]string{pki.CACertFile: "c", pki.CAKeyFile: "k"})
		if err := adoptSecrets(secrets, state, log); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(state, "pki", pki.ClientCACertFile)); !os.IsNotExist(err) {
			t.Fatalf("client CA appeared: %v", err)
		}
	})

	for _, tc := range []struct {
		name           string
		secrets, state map[string]string
		want           string
	}{
		{"another CA in the state dir", full, map[string]string{"pki/ca.crt": "other CA cert"}, "differs from"},
		{"another admin token", full, map[string]string{"admin.token": "other"}, "admin.token differs"},
		{"a certificate without its key", map[string]string{pki.ClientCACertFile: "c"}, nil, "has client-ca.crt but not client-ca.key"},
		{"a key without its certificate", map[string]string{pki.CAKeyFile: "k"}, nil, "has ca.key but not ca.crt"},
		{"too large", map[string]string{"admin.token": strings.Repeat("x", 65<<10)}, nil, "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			secrets, state := t.TempDir(), t.TempDir()
			writeFiles(t, secrets, tc.secrets)
			writeFiles(t, state, tc.state)
			err := adoptSecrets(secrets, state, log)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("adoptSecrets = %v, want an error containing %q", err, tc.want)
			}
			// Nothing was copied before the refusal... of the files checked
			// first; the state dir's own files are untouched.
			for name, data := range tc.state {
				got, _ := os.ReadFile(filepath.Join(state, name))
				if string(got) != data {
					t.Fatalf("%s changed to %q", name, got)
				}
			}
		})
	}

	t.Run("not a directory", func(t *testing.T) {
		f := filepath.Join(t.TempDir(), "file")
		writeFiles(t, filepath.Dir(f), map[string]string{"file": "x"})
		if err := adoptSecrets(f, t.TempDir(), log); err == nil || !strings.Contains(err.Error(), "not a directory") {
			t.Fatalf("adoptSecrets = %v", err)
		}
	})
}
