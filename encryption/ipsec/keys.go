package ipsec

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
)

// Bounds of the key file.
const (
	// MinKeyIndex and MaxKeyIndex bound a key index: 4 bits of the SPI
	// carry it, and 0 means "no IPsec" in a Node.
	MinKeyIndex = 1
	MaxKeyIndex = 15
	// MinKeyBytes is the shortest pre-shared key accepted: as many random
	// bytes as the AES-256 key derived from it.
	MinKeyBytes = 32
	// MaxKeyBytes bounds a key, to catch a wrong file pasted in.
	MaxKeyBytes = 1024
	// minDistinctBytes: 32 random bytes have about 30 distinct values;
	// fewer than 16 means a passphrase or a pattern, not random bytes.
	minDistinctBytes = 16
	// maxKeyFileBytes bounds what LoadKeys reads.
	maxKeyFileBytes = 64 << 10
)

// Keys are the mesh's pre-shared keys by index, as read from the key file.
// The highest index is the current one unless the file names another. A
// Keys is immutable; its String and LogValue never show key bytes. The
// zero value holds no key.
type Keys struct {
	psk [MaxKeyIndex + 1][]byte
	// current is the index a "current" line named, 0 for the highest.
	current uint8
	// source names where the keys came from, for errors.
	source string
}

// NewKeys returns Keys holding a copy of byIndex, checked as the key file
// is (index 1–15, at least 32 bytes that look random).
func NewKeys(byIndex map[uint8][]byte) (Keys, error) {
	k := Keys{source: "keys"}
	for i, key := range byIndex {
		if i < MinKeyIndex || i > MaxKeyIndex {
			return Keys{}, fmt.Errorf("ipsec: %w: key index %d out of range (want %d-%d)", ErrBadKeyFile, i, MinKeyIndex, MaxKeyIndex)
		}
		if err := checkKey(key); err != nil {
			return Keys{}, fmt.Errorf("ipsec: %w: key %d: %v", ErrBadKeyFile, i, err)
		}
		k.psk[i] = bytes.Clone(key)
	}
	return k, nil
}

// LoadKeys reads the pre-shared key file at path.
//
// The format: one key per line, "<index> <key>", index 1–15 (each at most
// once), key in hex (as `openssl rand -hex 32` prints) or standard base64
// with padding (as `openssl rand -base64 32` prints), at least 32 bytes
// that look random (a key of hex digits only is read as hex). Blank lines
// and lines starting with '#' are ignored. The highest index is the
// current one, unless a line "current <index>" names another: after
// index 15 a rotation wraps around to 1 with both keys in the file and
// "current 1".
//
// The file must be readable by its owner only: when group or other may
// read or write it, LoadKeys removes those permissions and logs a warning
// (as the API server does for its secrets), or fails when it cannot (a
// read-only mount: give the file mode 0400 or 0600 there).
//
// Errors match ErrBadKeyFile and name the file, the line and what is
// allowed.
func LoadKeys(path string, log *slog.Logger) (Keys, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f, err := os.Open(path)
	if err != nil {
		return Keys{}, fmt.Errorf("ipsec: open key file: %w", err)
	}
	defer f.Close()
	// Stat the open file, not the path, so the file checked is the file
	// read.
	info, err := f.Stat()
	if err != nil {
		return Keys{}, fmt.Errorf("ipsec: stat key file %s: %w", path, err)
	}
	if !info.Mode().IsRegular() {
		return Keys{}, fmt.Errorf("ipsec: %w %s: not a regular file (%s)", ErrBadKeyFile, path, info.Mode().Type())
	}
	if mode := info.Mode().Perm(); mode&0o077 != 0 {
		if err := f.Chmod(mode & 0o700); err != nil {
			return Keys{}, fmt.Errorf("ipsec: %w %s: mode %04o lets group or other users at the keys, and making it private failed (give it mode 0600): %w",
				ErrBadKeyFile, path, mode, err)
		}
		log.Warn("ipsec: the key file was accessible to other users; made it private: if they may have read it, rotate the keys",
			"file", path, "mode", fmt.Sprintf("%04o", mode), "now", fmt.Sprintf("%04o", mode&0o700))
	}
	data, err := io.ReadAll(io.LimitReader(f, maxKeyFileBytes+1))
	if err != nil {
		return Keys{}, fmt.Errorf("ipsec: read key file %s: %w", path, err)
	}
	if len(data) > maxKeyFileBytes {
		return Keys{}, fmt.Errorf("ipsec: %w %s: larger than %d bytes", ErrBadKeyFile, path, maxKeyFileBytes)
	}
	return ParseKeys(path, data)
}

// ParseKeys parses key file content (see LoadKeys); name is the file's
// name in errors.
func ParseKeys(name string, data []byte) (Keys, error) {
	k := Keys{source: name}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), maxKeyFileBytes)
	line, currentLine := 0, 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		bad := func(format string, args ...any) error {
			return fmt.Errorf("ipsec: %w %s line %d: %s (want \"<index 1-15> <key: hex or base64, at least %d random bytes>\" or \"current <index>\")",
				ErrBadKeyFile, name, line, fmt.Sprintf(format, args...), MinKeyBytes)
		}
		fields := strings.Fields(text)
		if len(fields) != 2 {
			return Keys{}, bad("%d fields", len(fields))
		}
		if fields[0] == "current" {
			i, err := strconv.ParseUint(fields[1], 10, 8)
			if err != nil || i < MinKeyIndex || i > MaxKeyIndex {
				return Keys{}, bad("current index %q is not a number from %d to %d", fields[1], MinKeyIndex, MaxKeyIndex)
			}
			if k.current != 0 {
				return Keys{}, bad("a second \"current\" line")
			}
			k.current = uint8(i)
			currentLine = line
			continue
		}
		i, err := strconv.ParseUint(fields[0], 10, 8)
		if err != nil || i < MinKeyIndex || i > MaxKeyIndex {
			return Keys{}, bad("index %q is not a number from %d to %d", fields[0], MinKeyIndex, MaxKeyIndex)
		}
		if k.psk[i] != nil {
			return Keys{}, bad("index %d appears twice", i)
		}
		key, err := decodeKey(fields[1])
		if err != nil {
			return Keys{}, bad("key %d: %v", i, err)
		}
		if err := checkKey(key); err != nil {
			return Keys{}, bad("key %d: %v", i, err)
		}
		k.psk[i] = key
	}
	if err := sc.Err(); err != nil {
		return Keys{}, fmt.Errorf("ipsec: %w %s after line %d: %w", ErrBadKeyFile, name, line, err)
	}
	if k.Current() == 0 {
		return Keys{}, fmt.Errorf("ipsec: %w %s: no key (want lines \"<index 1-15> <key>\")", ErrBadKeyFile, name)
	}
	if k.current != 0 && k.psk[k.current] == nil {
		return Keys{}, fmt.Errorf("ipsec: %w %s line %d: current index %d has no key in the file", ErrBadKeyFile, name, currentLine, k.current)
	}
	return k, nil
}

// decodeKey reads hex when s is hex digits only, else standard base64.
func decodeKey(s string) ([]byte, error) {
	if len(s)%2 == 0 && strings.Trim(s, "0123456789abcdefABCDEF") == "" {
		return hex.DecodeString(s)
	}
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("neither hex nor standard base64: %v", err)
	}
	return b, nil
}

func checkKey(key []byte) error {
	if len(key) < MinKeyBytes {
		return fmt.Errorf("%d bytes, want at least %d", len(key), MinKeyBytes)
	}
	if len(key) > MaxKeyBytes {
		return fmt.Errorf("%d bytes, want at most %d", len(key), MaxKeyBytes)
	}
	var seen [256]bool
	distinct := 0
	for _, b := range key {
		if !seen[b] {
			seen[b] = true
			distinct++
		}
	}
	if distinct < minDistinctBytes {
		return fmt.Errorf("only %d distinct byte values; want random bytes (openssl rand -hex 32)", distinct)
	}
	return nil
}

// Current returns the current index: the one the file names, else the
// highest; 0 when there is no key.
func (k Keys) Current() uint8 {
	if k.current != 0 {
		return k.current
	}
	for i := MaxKeyIndex; i >= MinKeyIndex; i-- {
		if k.psk[i] != nil {
			return uint8(i)
		}
	}
	return 0
}

// Has reports whether there is a key of index i.
func (k Keys) Has(i uint8) bool { return i >= MinKeyIndex && i <= MaxKeyIndex && k.psk[i] != nil }

// Indexes returns the indexes present, ascending.
func (k Keys) Indexes() []uint8 {
	var out []uint8
	for i := MinKeyIndex; i <= MaxKeyIndex; i++ {
		if k.psk[i] != nil {
			out = append(out, uint8(i))
		}
	}
	return out
}

// Source names where the keys came from (the file's path).
func (k Keys) Source() string { return k.source }

// String describes the keys without their bytes.
func (k Keys) String() string {
	return fmt.Sprintf("ipsec keys %v (current %d) from %s", k.Indexes(), k.Current(), k.source)
}

// LogValue logs the keys without their bytes.
func (k Keys) LogValue() slog.Value {
	return slog.GroupValue(slog.Any("indexes", k.Indexes()), slog.Int("current", int(k.Current())), slog.String("source", k.source))
}
