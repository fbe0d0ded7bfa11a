{{/*
Helpers of the arcfed chart. Object names are fixed (arcfed-coordinator, arcfed-agent, ...), not
derived from the release name: deploy/README.md's runbooks and ARC's listenerTemplate name them.
*/}}

{{/* chart label value: <name>-<version> */}}
{{- define "arcfed.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "arcfed.labels" -}}
app.kubernetes.io/part-of: arcfed
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ include "arcfed.chart" . }}
{{- end -}}

{{/* The image reference: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "arcfed.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion | toString -}}
{{- if not .Values.image.repository -}}
{{- fail "image.repository is empty: set the arcfed image repository (e.g. ghcr.io/example/arcfed)" -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/*
The voter ids this cluster runs, validated, as a JSON list of integers. They are the
StatefulSet's pod ordinals, so they must be positive, contiguous and ascending.
Use: {{ $ids := include "arcfed.coordinator.ids" . | fromJsonArray }}
*/}}
{{- define "arcfed.coordinator.ids" -}}
{{- $v := .Values.coordinator.voters -}}
{{- if not (kindIs "slice" $v) -}}
{{- fail (printf "coordinator.voters must be a list of node ids, e.g. [1, 2, 3]; got %v" $v) -}}
{{- end -}}
{{- if eq (len $v) 0 -}}
{{- fail "coordinator.voters is empty: list the node ids this cluster runs, e.g. [1, 2, 3]" -}}
{{- end -}}
{{- $out := list -}}
{{- $first := 0 -}}
{{- range $i, $id := $v -}}
{{- if not (or (kindIs "float64" $id) (kindIs "int64" $id) (kindIs "int" $id)) -}}
{{- fail (printf "coordinator.voters: %v is not a number; node ids are positive integers" $id) -}}
{{- end -}}
{{- $n := int $id -}}
{{- if ne (float64 $n) (float64 $id) -}}
{{- fail (printf "coordinator.voters: %v is not an integer; node ids are positive integers" $id) -}}
{{- end -}}
{{- if lt $n 1 -}}
{{- fail (printf "coordinator.voters: node id %d must be >= 1 (Raft node ids are positive)" $n) -}}
{{- end -}}
{{- if eq $i 0 -}}
{{- $first = $n -}}
{{- end -}}
{{- if ne $n (add $first $i) -}}
{{- fail (printf "coordinator.voters must be contiguous and ascending (the ids are the StatefulSet's pod ordinals, e.g. [1, 2, 3] or [3, 4]); got %v" $v) -}}
{{- end -}}
{{- $out = append $out $n -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* ARCFED_PEER: the value, or every local voter at its in-cluster per-voter Service. */}}
{{- define "arcfed.coordinator.peers" -}}
{{- $p := .Values.coordinator.peers -}}
{{- $ids := include "arcfed.coordinator.ids" . | fromJsonArray -}}
{{- $peer := "" -}}
{{- if kindIs "slice" $p -}}
{{- $peer = join "," $p -}}
{{- else if $p -}}
{{- $peer = toString $p -}}
{{- else -}}
{{- $items := list -}}
{{- range $ids -}}
{{- $items = append $items (printf "%d=arcfed-coordinator-%d.%s.svc:7000" (int .) (int .) $.Release.Namespace) -}}
{{- end -}}
{{- $peer = join "," $items -}}
{{- end -}}
{{- $listed := list -}}
{{- range splitList "," $peer -}}
{{- $kv := splitList "=" (trim .) -}}
{{- if or (ne (len $kv) 2) (not (regexMatch "^[0-9]+$" (first $kv))) (not (regexMatch "^[^:]+:[0-9]+$" (last $kv))) -}}
{{- fail (printf "coordinator.peers: %q is not ID=HOST:PORT" .) -}}
{{- end -}}
{{- $listed = append $listed (int (first $kv)) -}}
{{- end -}}
{{- range $ids -}}
{{- if not (has (int .) $listed) -}}
{{- fail (printf "coordinator.peers (ARCFED_PEER) lacks voter %d, which this cluster runs (coordinator.voters)" (int .)) -}}
{{- end -}}
{{- end -}}
{{- $peer -}}
{{- end -}}

{{/* ARCFED_ADVERTISE: the value, or the voter's per-voter Service in the release namespace. */}}
{{- define "arcfed.coordinator.advertise" -}}
{{- .Values.coordinator.advertise | default (printf "arcfed-coordinator-$(ARCFED_NODE_ID).%s.svc:7000" .Release.Namespace) -}}
{{- end -}}

{{/* voterDnsNames as a list (a single string is accepted too). */}}
{{- define "arcfed.coordinator.extraDnsNames" -}}
{{- $d := .Values.coordinator.voterDnsNames -}}
{{- if kindIs "slice" $d -}}{{- toJson $d -}}{{- else if $d -}}{{- toJson (list $d) -}}{{- else -}}[]{{- end -}}
{{- end -}}

{{/*
extraEnv as ConfigMap data lines. Args: dict "env" <map> "reserved" <list of keys> "what" <value path>.
*/}}
{{- define "arcfed.extraEnv" -}}
{{- $lines := list -}}
{{- range $k, $v := .env -}}
{{- if not (regexMatch "^ARCFED_[A-Z0-9_]+$" $k) -}}
{{- fail (printf "%s: %q is not an ARCFED_* variable name" $.what $k) -}}
{{- end -}}
{{- if has $k $.reserved -}}
{{- fail (printf "%s: %s is set by its own value (or per pod); do not set it here" $.what $k) -}}
{{- end -}}
{{- $lines = append $lines (printf "%s: %s" $k (toString $v | quote)) -}}
{{- end -}}
{{- join "\n" $lines -}}
{{- end -}}

{{/* ARCFED_COORDINATOR: a string, or a list joined with commas. */}}
{{- define "arcfed.agent.coordinators" -}}
{{- $c := .Values.agent.coordinators -}}
{{- if kindIs "slice" $c -}}{{- $c = join "," $c -}}{{- end -}}
{{- $c = required "agent.coordinators is required when agent.enabled=true: the voters' addresses, HOST:PORT comma-separated (e.g. arcfed-coordinator.arcfed-system.svc:7000)" $c | toString -}}
{{- range splitList "," $c -}}
{{- if not (regexMatch "^[A-Za-z0-9.-]+:[0-9]+$" (trim .)) -}}
{{- fail (printf "agent.coordinators: %q is not HOST:PORT" .) -}}
{{- end -}}
{{- end -}}
{{- $c -}}
{{- end -}}

{{/* ARCFED_CLUSTER, required, and usable in a SPIFFE id. */}}
{{- define "arcfed.agent.cluster" -}}
{{- $c := required "agent.cluster is required when agent.enabled=true: this ARC cluster's name, e.g. region-a (its agent identity is spiffe://arcfed/agent/<cluster>)" .Values.agent.cluster | toString -}}
{{- if not (regexMatch "^[A-Za-z0-9._-]{1,128}$" $c) -}}
{{- fail (printf "agent.cluster %q: use 1-128 of A-Z a-z 0-9 . _ - (it is part of the agent's SPIFFE id)" $c) -}}
{{- end -}}
{{- $c -}}
{{- end -}}

{{/* ARCFED_PROFILE check. Args: list <value> <value path>. */}}
{{- define "arcfed.profile" -}}
{{- $p := index . 0 | toString -}}
{{- if not (has $p (list "lan" "wan")) -}}
{{- fail (printf "%s must be lan or wan, is %q" (index . 1) $p) -}}
{{- end -}}
{{- $p -}}
{{- end -}}
