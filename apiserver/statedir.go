package apiserver

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
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
