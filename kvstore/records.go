package kvstore

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
)

// RecordStore keeps records of one type, JSON-encoded, one key each under a
// private prefix: state a process owns and must find again after a restart
// (the registry's registered objects), as opposed to what a SyncStore
// publishes for others to read. Writes are synchronous: when Put or Delete
// returns nil, etcd has it.
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

// Record is one stored record. Err is set, and Value is zero, when the
// stored bytes do not decode as a T: the caller decides whether one bad
// record matters.
type Record[T any] struct {
	ID    string
	Value T
	Err   error
}

// List reads every record, in ID order, at one revision.
func (s *RecordStore[T]) List(ctx context.Context) ([]Record[T], error) {
	var out []Record[T]
	_, err := s.client.List(ctx, s.prefix, ListOptions{}, func(kv KeyValue) {
		r := Record[T]{ID: kv.Key[len(s.prefix):]}
		if err := json.Unmarshal(kv.Value, &r.Value); err != nil {
			var zero T
			r.Value, r.Err = zero, fmt.Errorf("record %s: %w", kv.Key, err)
		}
		out = append(out, r)
	})
	if err != nil {
		return nil, fmt.Errorf("kvstore: list records under %s: %w", s.prefix, err)
	}
	return out, nil
}
