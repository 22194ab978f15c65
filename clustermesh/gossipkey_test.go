package clustermesh

import (
	"bytes"
	"context"
	"net/netip"
	"strings"
	"testing"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// filesPeer is a Peer whose agents read files; meshKey needs nothing else.
type filesPeer struct {
	Peer
	name  string
	files []ClusterFile
}

func (p filesPeer) Describe() string { return p.name }
func (p filesPeer) ClusterFiles(context.Context) ([]ClusterFile, error) {
	return p.files, nil
}

func keyOf(b byte) []byte { return bytes.Repeat([]byte{b}, GossipKeySize) }

func fileFor(name string, key []byte) ClusterFile { return ClusterFile{Name: name, GossipKey: key} }

func infos(names ...string) []v1.ClusterInfo {
	var out []v1.ClusterInfo
	for _, n := range names {
		out = append(out, v1.ClusterInfo{Name: n})
	}
	return out
}

func TestMeshGossipKey(t *testing.T) {
	if k, err := MeshGossipKey([]ClusterFile{fileFor("eu", nil)}); k != nil || err != nil {
		t.Fatalf("no key: %x, %v", k, err)
	}
	k, err := MeshGossipKey([]ClusterFile{fileFor("eu", keyOf(1)), fileFor("us", nil), fileFor("ap", keyOf(1))})
	if err != nil || !bytes.Equal(k, keyOf(1)) {
		t.Fatalf("one key: %x, %v", k, err)
	}
	_, err = MeshGossipKey([]ClusterFile{fileFor("eu", keyOf(1)), fileFor("us", keyOf(2))})
	if err == nil || !strings.Contains(err.Error(), "disagree") || strings.Contains(err.Error(), "0101") {
		t.Fatalf("two keys: %v (must name them by fingerprint only)", err)
	}
}

func TestMeshKeyOnConnect(t *testing.T) {
	ctx := context.Background()
	// A new mesh gets a new key.
	k, err := meshKey(ctx, []Peer{filesPeer{name: "eu"}, filesPeer{name: "us"}}, infos("eu", "us"))
	if err != nil || len(k) != GossipKeySize || bytes.Equal(k, keyOf(0)) {
		t.Fatalf("new mesh: %x, %v", k, err)
	}
	// A cluster joining a mesh takes its key.
	eu := filesPeer{name: "eu", files: []ClusterFile{fileFor("eu", keyOf(1)), fileFor("us", keyOf(1))}}
	k, err = meshKey(ctx, []Peer{eu, filesPeer{name: "ap"}}, infos("eu", "ap"))
	if err != nil || !bytes.Equal(k, keyOf(1)) {
		t.Fatalf("join a mesh: %x, %v", k, err)
	}
	// Two meshes: refused while a cluster outside this connect would keep
	// an old key...
	ap := filesPeer{name: "ap", files: []ClusterFile{fileFor("ap", keyOf(2)), fileFor("sa", keyOf(2))}}
	_, err = meshKey(ctx, []Peer{eu, ap}, infos("eu", "ap"))
	if err == nil || !strings.Contains(err.Error(), "us (read by eu)") || !strings.Contains(err.Error(), "sa (read by ap)") {
		t.Fatalf("merge two meshes in part: %v", err)
	}
	// ... and merged under a new key when every cluster is connected.
	k, err = meshKey(ctx, []Peer{eu, ap, filesPeer{name: "us"}, filesPeer{name: "sa"}}, infos("eu", "ap", "us", "sa"))
	if err != nil || len(k) != GossipKeySize || bytes.Equal(k, keyOf(1)) || bytes.Equal(k, keyOf(2)) {
		t.Fatalf("merge whole meshes: %x, %v", k, err)
	}
}

func TestClusterFileGossipKey(t *testing.T) {
	f := ClusterFile{Name: "eu", ID: 1, PodCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}, Endpoints: []string{"http://127.0.0.1:2379"}}
	f.GossipKey = keyOf(7)[:16]
	if err := f.Validate(); err == nil || !strings.Contains(err.Error(), "gossipKey") {
		t.Fatalf("16-byte key: %v", err)
	}
	f.GossipKey = keyOf(7)
	dir := t.TempDir()
	if err := WriteClusterFile(dir, f); err != nil {
		t.Fatal(err)
	}
	loaded, err := scanDir(dir)
	if err != nil || loaded["eu"].err != nil || !bytes.Equal(loaded["eu"].file.GossipKey, keyOf(7)) {
		t.Fatalf("read back: %+v, %v", loaded["eu"], err)
	}
}
