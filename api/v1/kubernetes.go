package v1

// Connecting Kubernetes clusters goes through each cluster's Kubernetes API
// only (`trellis connect --context`): the operator's machine needs no
// network path to the mesh API server, and who may connect is who may
// write Secrets in Trellis's namespace (Kubernetes RBAC), as with Cilium's
// clustermesh connect. The mesh API server, run with the Kubernetes
// source, keeps its ClusterInfo in a ConfigMap and answers credential
// requests made as Secrets; these are the names both sides agree on.
const (
	// KubeClusterInfoConfigMap is the ConfigMap the mesh API server writes
	// in its namespace: KubeClusterInfoKey holds its ClusterInfo (JSON).
	KubeClusterInfoConfigMap = "trellis-cluster-info"
	KubeClusterInfoKey       = "info.json"

	// KubeRemoteSecretPrefix + <cluster> is the Secret through which
	// cluster <cluster>'s credentials to this cluster are requested,
	// answered and revoked. It carries KubeRemoteClusterLabel =
	// <cluster>, so the server watches only these Secrets.
	KubeRemoteSecretPrefix = "trellis-remote-"
	KubeRemoteClusterLabel = "trellis.io/remote-cluster"
	// KubeRequestAnnotation is set by the requester to a fresh ID; the
	// server issues credentials (superseding the earlier ones, as the
	// admin API does), stores them under KubeCredentialsKey (RemoteCredentials,
	// JSON) and sets KubeIssuedAnnotation to the same ID, or sets
	// KubeErrorAnnotation to "<ID>: <message>".
	KubeRequestAnnotation = "trellis.io/request"
	KubeIssuedAnnotation  = "trellis.io/issued"
	KubeErrorAnnotation   = "trellis.io/error"
	KubeCredentialsKey    = "credentials.json"
	// KubeRevokeAnnotation asks the server to revoke the cluster's
	// credentials; it deletes the Secret once they are revoked.
	KubeRevokeAnnotation = "trellis.io/revoke"
	// MaxKubeRequestID bounds the request ID a requester may set.
	MaxKubeRequestID = 64

	// KubeClustermeshSecret is the Secret `trellis connect --context`
	// writes and the agents mount as their config dir: one
	// <cluster>.yaml cluster file per key.
	KubeClustermeshSecret = "trellis-clustermesh"
	// KubeDefaultNamespace is where the Helm chart is installed unless
	// told otherwise.
	KubeDefaultNamespace = "trellis"
)
