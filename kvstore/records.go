package kvstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// RecordStore keeps records of one type, JSON-encoded, one key each under a
// private prefix: state a process owns and must find again after a restart
// (the registry's registered objects), as opposed to what a SyncStore
// publishes for others to read. Writes are synchronous: when Put or Delete
// returns nil, etcd has it. PutIf and DeleteIf write only when the record
// is still at the revision the caller last saw, so a caller that applies a
// record to memory after storing it never applies a stale one.
type RecordStore[T any] struct {
	client *Client
	prefix string
}

// NewRecordStore returns the store of the records under prefix, which must
// end with "/". Record IDs are the rest of the key and may contain "/".
func NewRecordStore[T any](client *Client, prefix string) (*RecordStore[T], error) {
	if prefix == "" || !strings.HasSuffix(prefix, "/") {
		return nil, fmt.Errorf("kvstore: record store prefix %q must be non-empty and end with /", prefix)
	}
	return &RecordStore[T]{client: client, prefix: prefix}, nil
}

// Key is the etcd key of record id.
func (s *RecordStore[T]) Key(id string) string { return s.prefix + id }

// Put stores v as record id.
func (s *RecordStore[T]) Put(ctx context.Context, id string, v T) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("kvstore: encode record %s: %w", s.Key(id), err)
	}
	return s.client.Put(ctx, s.Key(id), data)
}

// Delete removes record id; a missing record is not an error.
func (s *RecordStore[T]) Delete(ctx context.Context, id string) error {
	return s.client.Delete(ctx, s.Key(id))
}

// ErrConflict: a conditional write found the record at another revision
// than the caller expected (someone else wrote it meanwhile).
var ErrConflict = errors.New("record changed meanwhile")

// PutIf stores v as record id if the record is still at revision rev (0:
// it must not exist), and returns the record's new revision.
func (s *RecordStore[T]) PutIf(ctx context.Context, id string, v T, rev int64) (int64, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("kvstore: encode record %s: %w", s.Key(id), err)
	}
	key := s.Key(id)
	res, err := s.client.Txn(ctx, Txn{If: []Cmp{CmpModRevision(key, rev)}, Then: []Op{OpPut(key, data)}})
	if err != nil {
		return 0, fmt.Errorf("kvstore: put record %s: %w", key, err)
	}
	if !res.Succeeded {
		return 0, fmt.Errorf("kvstore: put record %s (at revision %d): %w", key, rev, ErrConflict)
	}
	return res.Revision, nil
}

// DeleteIf removes record id if it is still at revision rev.
func (s *RecordStore[T]) DeleteIf(ctx context.Context, id string, rev int64) error {
	key := s.Key(id)
	res, err := s.client.Txn(ctx, Txn{If: []Cmp{CmpModRevision(key, rev)}, Then: []Op{OpDelete(key)}})
	if err != nil {
		return fmt.Errorf("kvstore: delete record %s: %w", key, err)
	}
	if !res.Succeeded {
		return fmt.Errorf("kvstore: delete record %s (at revision %d): %w", key, rev, ErrConflict)
	}
	return nil
}

// Get reads record id; ok is false when there is none.
func (s *RecordStore[T]) Get(ctx context.Context, id string) (r Record[T], ok bool, err error) {
	kv, _, err := s.client.Get(ctx, s.Key(id))
	if err != nil || kv == nil {
		return r, false, err
	}
	return s.decode(*kv), true, nil
}

// Record is one stored record. Err is set, and Value is zero, when the
// stored bytes do not decode as a T: the caller decides whether one bad
// record matters.
type Record[T any] struct {
	ID    string
	Value T
	Err   error
	// Revision is the record's ModRevision, what PutIf and DeleteIf
	// compare.
	Revision int64
}

func (s *RecordStore[T]) decode(kv KeyValue) Record[T] {
	r := Record[T]{ID: kv.Key[len(s.prefix):], Revision: kv.ModRevision}
	if err := json.Unmarshal(kv.Value, &r.Value); err != nil {
		var zero T
		r.Value, r.Err = zero, fmt.Errorf("record %s: %w", kv.Key, err)
	}
	return r
}

// List reads every record, in ID order, at one revision.
func (s *RecordStore[T]) List(ctx context.Context) ([]Record[T], error) {
	var out []Record[T]
	_, err := s.client.List(ctx, s.prefix, ListOptions{}, func(kv KeyValue) {
		out = append(out, s.decode(kv))
	})
	if err != nil {
		return nil, fmt.Errorf("kvstore: list records under %s: %w", s.prefix, err)
	}
	return out, nil
}
