package source

import (
	"fmt"
	"strconv"
	"strings"

	v1 "github.com/trellis-mesh/trellis/api/v1"
)

// Service annotations. Trellis's own win over Cilium's when both are set;
// Cilium's are accepted so ClusterMesh users can migrate without
// re-annotating.
const (
	AnnotationGlobal   = "trellis.io/global"
	AnnotationShared   = "trellis.io/shared"
	AnnotationAffinity = "trellis.io/affinity"

	CiliumAnnotationGlobal   = "service.cilium.io/global"
	CiliumAnnotationShared   = "service.cilium.io/shared"
	CiliumAnnotationAffinity = "service.cilium.io/affinity"
)

// ServiceMeshSettings are the mesh-wide settings of one service.
type ServiceMeshSettings struct {
	Global   bool
	Shared   bool
	Affinity v1.Affinity
}

// ParseServiceAnnotations reads the global/shared/affinity annotations.
// Shared defaults to true for a global service (as in Cilium); a
// non-global service is never shared. Malformed values are an error that
// names the annotation and the allowed values.
func ParseServiceAnnotations(annotations map[string]string) (ServiceMeshSettings, error) {
	var s ServiceMeshSettings
	lookup := func(own, cilium string) (string, string, bool) {
		if v, ok := annotations[own]; ok {
			return strings.TrimSpace(v), own, true
		}
		if v, ok := annotations[cilium]; ok {
			return strings.TrimSpace(v), cilium, true
		}
		return "", "", false
	}
	if v, key, ok := lookup(AnnotationGlobal, CiliumAnnotationGlobal); ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return s, fmt.Errorf("annotation %s=%q: want true or false", key, v)
		}
		s.Global = b
	}
	s.Shared = s.Global
	if v, key, ok := lookup(AnnotationShared, CiliumAnnotationShared); ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return s, fmt.Errorf("annotation %s=%q: want true or false", key, v)
		}
		s.Shared = b && s.Global
	}
	s.Affinity = v1.AffinityNone
	if v, key, ok := lookup(AnnotationAffinity, CiliumAnnotationAffinity); ok {
		switch a := v1.Affinity(strings.ToLower(v)); a {
		case v1.AffinityNone, v1.AffinityLocal, v1.AffinityRemote:
			s.Affinity = a
		case "":
		default:
			return s, fmt.Errorf("annotation %s=%q: want none, local or remote", key, v)
		}
	}
	if !s.Global {
		s.Affinity = v1.AffinityNone
	}
	return s, nil
}
