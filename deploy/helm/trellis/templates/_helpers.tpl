{{/* Names: <release>-trellis unless the release is called trellis. */}}
{{- define "trellis.fullname" -}}
{{- if contains "trellis" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-trellis" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "trellis.labels" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "trellis.selector" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "trellis.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "trellis.pkiSecret" -}}
{{- .Values.apiserver.pki.existingSecret | default (printf "%s-apiserver-pki" (include "trellis.fullname" .)) -}}
{{- end -}}

{{/*
trellis.etcdListenPort: the port the etcd front door listens on in the pod.
With a NodePort Service it is the node port itself: remote clusters are
given advertiseAddress:<listen port>.
*/}}
{{- define "trellis.etcdListenPort" -}}
{{- if eq .Values.apiserver.service.type "NodePort" -}}
{{- .Values.apiserver.service.nodePort -}}
{{- else -}}
{{- .Values.apiserver.etcdPort -}}
{{- end -}}
{{- end -}}

{{- define "trellis.advertiseAddress" -}}
{{- .Values.apiserver.advertiseAddress | default (printf "%s-apiserver.%s.svc" (include "trellis.fullname" .) .Release.Namespace) -}}
{{- end -}}

{{/*
trellis.validate fails the render on values the binaries would refuse
anyway, naming the value to fix (the binaries check everything again).
*/}}
{{- define "trellis.validate" -}}
{{- $c := .Values.cluster -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$" ($c.name | toString)) -}}
{{- fail (printf "cluster.name %q: set it to a lowercase DNS label of at most 32 characters, unique in the mesh (e.g. --set cluster.name=eu-west)" ($c.name | toString)) -}}
{{- end -}}
{{- $id := int $c.id -}}
{{- $max := int $c.maxConnectedClusters -}}
{{- if not (or (eq $max 255) (eq $max 511)) -}}
{{- fail (printf "cluster.maxConnectedClusters %d: must be 255 or 511" $max) -}}
{{- end -}}
{{- if or (lt $id 1) (gt $id $max) -}}
{{- fail (printf "cluster.id %d: set it to 1-%d, unique in the mesh (e.g. --set cluster.id=1)" $id $max) -}}
{{- end -}}
{{- if not $c.podCIDRs -}}
{{- fail "cluster.podCIDRs is required: the cluster's pod ranges (e.g. --set cluster.podCIDRs={10.1.0.0/16})" -}}
{{- end -}}
{{- if not (has ($c.encryption | toString) (list "" "wireguard" "ipsec")) -}}
{{- fail (printf "cluster.encryption %q: must be \"\", wireguard or ipsec" ($c.encryption | toString)) -}}
{{- end -}}
{{- if and (eq $c.encryption "ipsec") (not .Values.agent.ipsecKeySecret) -}}
{{- fail "cluster.encryption ipsec needs agent.ipsecKeySecret: a Secret with the pre-shared key file under the key \"keys\"" -}}
{{- end -}}
{{- if not (has .Values.agent.tunnel (list "vxlan" "geneve" "native" "none")) -}}
{{- fail (printf "agent.tunnel %q: must be vxlan, geneve, native or none" .Values.agent.tunnel) -}}
{{- end -}}
{{- if not (has .Values.apiserver.service.type (list "ClusterIP" "NodePort" "LoadBalancer")) -}}
{{- fail (printf "apiserver.service.type %q: must be ClusterIP, NodePort or LoadBalancer" .Values.apiserver.service.type) -}}
{{- end -}}
{{- if not (has .Values.apiserver.storage.type (list "persistentVolumeClaim" "emptyDir")) -}}
{{- fail (printf "apiserver.storage.type %q: must be persistentVolumeClaim or emptyDir" .Values.apiserver.storage.type) -}}
{{- end -}}
{{- end -}}
