package wireguard

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Key files hold one private key as `wg genkey` writes it: base64 and a
// newline. They follow the project's state-dir hygiene: written 0600 to a
// temporary name and renamed into place, so a reader sees the old key or
// the new one, never half of one; a key file other users may read is made
// private again with a warning (someone may have read it: rotate it if
// that matters); a file that does not hold a key is an error, never
// replaced, since replacing it would silently change the node's identity.

// LoadOrCreateKey returns the private key in path, generating one and
// writing it (directory created 0700) when the file does not exist. log
// gets the warning about a file others could read; nil means
// slog.Default().
func LoadOrCreateKey(path string, log *slog.Logger) (wgtypes.Key, error) {
	if log == nil {
		log = slog.Default()
	}
	key, err := readKey(path, log)
	if !errors.Is(err, fs.ErrNotExist) {
		return key, err
	}
	key, err = wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard: generate private key for %s: %w", path, err)
	}
	if err := writeKeyFile(path, key, true); err != nil {
		if errors.Is(err, fs.ErrExist) {
			// Another process created it meanwhile: its key wins.
			return readKey(path, log)
		}
		return wgtypes.Key{}, err
	}
	log.Info("created WireGuard private key", "file", path, "publicKey", key.PublicKey().String())
	return key, nil
}

// WriteKey replaces the key in path with key, atomically (a new private
// key for rotation: wgtypes.GeneratePrivateKey).
func WriteKey(path string, key wgtypes.Key) error {
	if key == (wgtypes.Key{}) {
		return fmt.Errorf("wireguard: write key file %s: the zero key", path)
	}
	return writeKeyFile(path, key, false)
}

// readKey reads and checks the key file, making it private first.
func readKey(path string, log *slog.Logger) (wgtypes.Key, error) {
	f, err := os.Open(path)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard: key file %s: %w", path, err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("wireguard: key file %s: %w", path, err)
	}
	if !info.Mode().IsRegular() {
		return wgtypes.Key{}, fmt.Errorf("wireguard: key file %s: not a regular file (%s)", path, info.Mode().Type())
	}
	if mode := info.Mode().Perm(); mode&0o077 != 0 {
		if err := f.Chmod(mode & 0o700); err != nil {
			return wgtypes.Key{}, fmt.Errorf("wireguard: make key file %s private: %w", path, err)
		}
		log.Warn("a secret was readable by other users; made it private: if they may have read it, rotate it",
			"file", path, "mode", fmt.Sprintf("%04o", mode))
	}
	// A key is 44 characters and a newline; read a little more to tell a
	// longer file apart.
	buf := make([]byte, 128)
	n, err := f.Read(buf)
	if err != nil && n == 0 {
		return wgtypes.Key{}, fmt.Errorf("wireguard: key file %s: empty: want a base64 private key (wg genkey); move it away to generate a new key", path)
	}
	data := bytes.TrimSpace(buf[:n])
	key, err := wgtypes.ParseKey(string(data))
	if err != nil || n == len(buf) {
		what := "not a base64 WireGuard key"
		if n == len(buf) {
			what = "longer than a key"
		}
		return wgtypes.Key{}, fmt.Errorf("wireguard: key file %s: %s (%d bytes): want a base64 private key (wg genkey); move it away to generate a new key", path, what, n)
	}
	if key == (wgtypes.Key{}) {
		return wgtypes.Key{}, fmt.Errorf("wireguard: key file %s: the zero key; move it away to generate a new key", path)
	}
	return key, nil
}

// writeKeyFile writes key to path through a temporary file and a rename
// (exclusive: link instead of rename, failing with fs.ErrExist when path
// exists).
func writeKeyFile(path string, key wgtypes.Key, exclusive bool) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("wireguard: write key file %s: %w", path, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("wireguard: write key file %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if f != nil {
			f.Close()
		}
		os.Remove(tmp)
	}()
	if err := f.Chmod(0o600); err != nil {
		return fmt.Errorf("wireguard: write key file %s: %w", path, err)
	}
	if _, err := f.WriteString(key.String() + "\n"); err != nil {
		return fmt.Errorf("wireguard: write key file %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("wireguard: write key file %s: %w", path, err)
	}
	err = f.Close()
	f = nil
	if err != nil {
		return fmt.Errorf("wireguard: write key file %s: %w", path, err)
	}
	if exclusive {
		err = os.Link(tmp, path)
	} else {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		return fmt.Errorf("wireguard: write key file %s: %w", path, err)
	}
	// Persist the rename. Best effort: some filesystems refuse to sync a
	// directory, and the file is in place.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
