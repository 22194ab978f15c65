// Package v1 owns the Trellis wire format: the values every component
// exchanges through a cluster's etcd store, the keys they live under, the
// rules a value must satisfy, and the JSON codecs that enforce those rules.
//
// # What lives here
//
//   - Types: [ClusterConfig], [Node], [Endpoint], [Identity], [Service] and
//     [BackendShard],
//     plus the small scalar types they are built from ([ClusterID],
//     [NumericIdentity], [Protocol], [BackendState], [Affinity]).
//   - Keys: one builder per kind ([NodeKey], [EndpointKey], ...),
//     [KindPrefix] for watches, and a strict [ParseKey].
//   - Validation: Validate on every type. Errors are [*ValidationError]
//     values that name the field, the offending value and what is allowed,
//     and match [ErrInvalid].
//   - Codecs: [Encode] for writers (mesh API server) and one Decode function
//     per type for readers (agents). The Decode…Entry variants also check that
//     the key and the body agree, which is how a reader stops a remote
//     cluster from writing under someone else's name.
//
// # Key layout
//
// One etcd store per cluster holds:
//
//	trellis/v1/cluster-config/<cluster>            ClusterConfig
//	trellis/v1/heartbeat/<cluster>                 RFC3339 time (not JSON)
//	trellis/v1/nodes/<cluster>/<node>              Node
//	trellis/v1/endpoints/<cluster>/<ip>            Endpoint
//	trellis/v1/identities/<cluster>/<id>           Identity
//	trellis/v1/services/<cluster>/<ns>/<name>      Service
//	trellis/v1/backends/<cluster>/<ns>/<name>/<i>  BackendShard i of a large Service
//	trellis/v1/synced/<cluster>/<kind>             canary (RFC3339 time)
//
// # Versioning
//
// Every JSON value carries "v": [Version]. Readers reject any other major
// version with [ErrUnsupportedVersion], and ignore JSON fields they do not
// know, so a newer writer may add optional fields without bumping "v".
// Anything that changes the meaning of an existing field needs a new major
// version and a new key prefix (trellis/v2/).
//
// # Trust
//
// A reader treats every value as hostile: decoders bound the input size
// ([MaxValueSize]), never panic, and validate everything before returning.
// Checks that need context from outside a single value (an endpoint IP inside
// its cluster's pod CIDRs, an identity carrying its cluster's ID bits) are
// the caller's job; [ClusterConfig.Contains], [NumericIdentity.ClusterID] and
// [PrefixesOverlap] are the helpers for them.
//
// This package imports only the standard library so every other Trellis
// package can depend on it.
package v1
