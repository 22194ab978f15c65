package ipsec

import (
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// The one ESP transform Trellis installs: AES-256-GCM as RFC 4106 has it
// for ESP, a 32-byte key followed by a 4-byte salt, 128-bit ICV.
const (
	AEADAlgorithm = "rfc4106(gcm(aes))"
	AEADKeyBytes  = 32 + 4
	AEADICVBits   = 128
)

// deriveLabel starts the HKDF info of every derivation: a new scheme gets
// a new label, so that its keys never equal this one's.
const deriveLabel = "trellis ipsec v1"

// maxNameBytes bounds a node name in the derivation (its length is encoded
// in 16 bits).
const maxNameBytes = 1024

// SAKey is what one direction of a node pair uses under one key index: the
// AEAD key (key and salt) and the SPI. String never shows the key.
type SAKey struct {
	Index uint8
	SPI   uint32
	Key   []byte
}

func (s SAKey) String() string { return fmt.Sprintf("index %d spi %#08x", s.Index, s.SPI) }

// Derive returns the key and SPI for traffic from node src to node dst
// under key index i:
//
//	okm  = HKDF-SHA256(secret = PSK[i], salt = none,
//	                   info = "trellis ipsec v1" || len16(src) || src || len16(dst) || dst || i,
//	                   length = 40)
//	key  = okm[0:36]                                (AES-256 key, 4-byte salt)
//	SPI  = i << 28 | (big-endian okm[36:40] & 0x0fffffff)
//
// The PSK is already uniformly random, so HKDF needs no salt (RFC 5869
// §3.1). Names are length-prefixed, so no two (src, dst) pairs share an
// info string; the direction is in the order, so the two directions of a
// pair get different keys and SPIs. The index in the top 4 bits of the SPI
// keeps the SAs of two indexes of one direction apart in the kernel (their
// SPIs differ), which rotation needs, and shows in `ip xfrm state` which
// key an SA uses. The other 28 bits come from the PSK too, so that a new
// key reshuffles them (see the package doc on SPI collisions).
func (k Keys) Derive(src, dst string, i uint8) (SAKey, error) {
	if !k.Has(i) {
		return SAKey{}, fmt.Errorf("ipsec: derive %q → %q: no key of index %d in %s", src, dst, i, k.source)
	}
	return derive(k.psk[i], src, dst, i)
}

func derive(psk []byte, src, dst string, i uint8) (SAKey, error) {
	if src == "" || dst == "" || len(src) > maxNameBytes || len(dst) > maxNameBytes {
		return SAKey{}, fmt.Errorf("ipsec: derive %q → %q: node names must be 1 to %d bytes", src, dst, maxNameBytes)
	}
	info := make([]byte, 0, len(deriveLabel)+2+len(src)+2+len(dst)+1)
	info = append(info, deriveLabel...)
	info = binary.BigEndian.AppendUint16(info, uint16(len(src)))
	info = append(info, src...)
	info = binary.BigEndian.AppendUint16(info, uint16(len(dst)))
	info = append(info, dst...)
	info = append(info, i)
	okm, err := hkdf.Key(sha256.New, psk, nil, string(info), AEADKeyBytes+4)
	if err != nil {
		return SAKey{}, fmt.Errorf("ipsec: derive %q → %q index %d: %w", src, dst, i, err)
	}
	spi := uint32(i)<<28 | binary.BigEndian.Uint32(okm[AEADKeyBytes:])&0x0fffffff
	return SAKey{Index: i, SPI: spi, Key: okm[:AEADKeyBytes:AEADKeyBytes]}, nil
}

// SPIIndex returns the key index an SPI of Trellis's carries.
func SPIIndex(spi uint32) uint8 { return uint8(spi >> 28) }
