package apiserver

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	v1 "github.com/trellis-mesh/trellis/api/v1"
	"github.com/trellis-mesh/trellis/apiserver/pki"
)

// State-dir hygiene: the admin token and every private key are the
// cluster's secrets. A file another user may read is made private again
// (with a warning: someone may have read it, rotate it if that matters);
// an admin token too weak to stand a guess is refused.

// minTokenLen is the shortest admin token accepted: 32 random bytes as
// base64 (43 characters; hex takes 64), what the server generates.
const minTokenLen = 43

// loadOrCreateToken returns the admin token in path, generating one (32
// random bytes, hex) when the file does not exist.
func loadOrCreateToken(path string, log *slog.Logger) (string, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		token, err := newToken()
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(path, []byte(token+"\n"), 0o600); err != nil {
			return "", fmt.Errorf("apiserver: write admin token %s: %w", path, err)
		}
		return token, nil
	}
	if err != nil {
		return "", fmt.Errorf("apiserver: admin token %s: %w", path, err)
	}
	if err := makePrivate(path, log); err != nil {
		return "", err
	}
	token := strings.TrimSpace(string(data))
	if err := checkToken(token); err != nil {
		return "", fmt.Errorf("apiserver: admin token %s: %w; remove the file and restart to generate one (then give the new token to the tools that use it)", path, err)
	}
	return token, nil
}

// checkToken refuses a token short or uniform enough to guess.
func checkToken(token string) error {
	if len(token) < minTokenLen {
		return fmt.Errorf("%d characters; want at least %d (32 random bytes)", len(token), minTokenLen)
	}
	if strings.ContainsAny(token, " \t\r\n") {
		return errors.New("contains white space")
	}
	distinct := map[rune]bool{}
	for _, c := range token {
		distinct[c] = true
	}
	if len(distinct) < 8 {
		return fmt.Errorf("only %d distinct characters; want random bytes", len(distinct))
	}
	return nil
}

// checkKeyFiles makes every private key under the state dir's pki/ private
// to the server's user.
func (s *Server) checkKeyFiles() error {
	return filepath.WalkDir(s.pkiDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("apiserver: check %s: %w", path, err)
		}
		if d.IsDir() || !strings.HasSuffix(d.Name(), ".key") {
			return nil
		}
		return makePrivate(path, s.log)
	})
}

// makePrivate removes group and other permissions from path.
func makePrivate(path string, log *slog.Logger) error {
	info, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("apiserver: %w", err)
	}
	mode := info.Mode().Perm()
	if mode&0o077 == 0 {
		return nil
	}
	if err := os.Chmod(path, mode&0o700); err != nil {
		return fmt.Errorf("apiserver: make %s private: %w", path, err)
	}
	log.Warn("a secret was readable by other users; made it private: if they may have read it, rotate it", "file", path, "mode", fmt.Sprintf("%04o", mode))
	return nil
}

// Adopting secrets from --secrets-dir. A server in a Kubernetes pod gets
// its CAs and admin token from a Secret, so that a restart on an empty
// volume keeps the identity remote clusters trust. A Secret volume is
// read-only and the server writes derived files (server.crt, clients/)
// next to the CAs, so the Secret is not the state dir: its files are
// copied into the state dir, which then works as any other. Only these
// files: everything else under pki/ is derived from them and reissued by
// the server as needed.

// maxSecretFile bounds a file read from --secrets-dir: PEM certificates
// and keys and a token are a few KiB at most.
const maxSecretFile = 64 << 10

// adoptedSecret is one file adoptSecrets copies: its name in the secrets
// dir, its path in the state dir, its mode there and the file it pairs
// with (a CA's certificate and key go together).
type adoptedSecret struct {
	name, dest string
	mode       fs.FileMode
	pair       string
}

var adoptedSecrets = []adoptedSecret{
	{pki.CACertFile, filepath.Join("pki", pki.CACertFile), 0o644, pki.CAKeyFile},
	{pki.CAKeyFile, filepath.Join("pki", pki.CAKeyFile), 0o600, pki.CACertFile},
	{pki.ClientCACertFile, filepath.Join("pki", pki.ClientCACertFile), 0o644, pki.ClientCAKeyFile},
	{pki.ClientCAKeyFile, filepath.Join("pki", pki.ClientCAKeyFile), 0o600, pki.ClientCACertFile},
	{v1.StateAdminTokenFile, v1.StateAdminTokenFile, 0o600, ""},
}

// adoptSecrets copies the CAs and the admin token found in secretsDir into
// stateDir where the state dir has none, and refuses to start when the
// state dir holds different ones: the state dir was made with another CA,
// and replacing it silently would cut off every remote cluster that trusts
// it. A CA's certificate without its key (or the reverse) is refused. The
// files are checked (parsed, matched) by the usual loading afterwards.
func adoptSecrets(secretsDir, stateDir string, log *slog.Logger) error {
	if secretsDir == "" {
		return nil
	}
	info, err := os.Stat(secretsDir)
	if err != nil {
		return fmt.Errorf("apiserver: --secrets-dir: %w", err)
	}
	if !info.IsDir() {
		return fmt.Errorf("apiserver: --secrets-dir %s is not a directory", secretsDir)
	}
	found := map[string][]byte{}
	for _, s := range adoptedSecrets {
		data, err := readSecretFile(filepath.Join(secretsDir, s.name))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("apiserver: --secrets-dir: %w", err)
		}
		found[s.name] = data
	}
	for _, s := range adoptedSecrets {
		if _, ok := found[s.name]; ok && s.pair != "" {
			if _, ok := found[s.pair]; !ok {
				return fmt.Errorf("apiserver: --secrets-dir %s has %s but not %s: a CA needs both (or neither, to keep the state dir's)", secretsDir, s.name, s.pair)
			}
		}
	}
	for _, s := range adoptedSecrets {
		data, ok := found[s.name]
		if !ok {
			continue
		}
		dest := filepath.Join(stateDir, s.dest)
		have, err := readSecretFile(dest)
		switch {
		case errors.Is(err, os.ErrNotExist):
			if err := writePrivateFile(dest, data, s.mode); err != nil {
				return fmt.Errorf("apiserver: adopt %s from --secrets-dir: %w", s.name, err)
			}
			log.Info("adopted a secret from --secrets-dir", "file", dest, "from", filepath.Join(secretsDir, s.name))
		case err != nil:
			return fmt.Errorf("apiserver: %w", err)
		case !sameSecret(s.name, have, data):
			return fmt.Errorf("apiserver: %s differs from %s in --secrets-dir: the state dir was made with other secrets. Remove %s (and its pair) to adopt the ones in --secrets-dir (remote clusters must then connect again), or put the state dir's into the Secret",
				dest, filepath.Join(secretsDir, s.name), dest)
		}
	}
	return nil
}

// sameSecret compares a state-dir file with its secrets-dir version; the
// admin token ignores surrounding white space (the server trims it too).
func sameSecret(name string, a, b []byte) bool {
	if name == v1.StateAdminTokenFile {
		return bytes.Equal(bytes.TrimSpace(a), bytes.TrimSpace(b))
	}
	return bytes.Equal(a, b)
}

// readSecretFile reads a regular file (through symlinks: a Secret volume's
// files are links into its current version) of at most maxSecretFile bytes.
func readSecretFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxSecretFile+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(data) > maxSecretFile {
		return nil, fmt.Errorf("%s is larger than %d bytes: not a certificate, key or token", path, maxSecretFile)
	}
	return data, nil
}

// writePrivateFile writes data to path with mode through a temporary file
// and a rename, creating the directory 0700: a crash never leaves half a
// key.
func writePrivateFile(path string, data []byte, mode fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create a temporary file in %s: %w", dir, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("chmod %s: %w", tmp, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s into place: %w", path, err)
	}
	return nil
}
