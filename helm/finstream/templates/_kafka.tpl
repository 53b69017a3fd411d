{{/* Kafka security (issue 15) ---------------------------------------------------
Every pod that talks to Kafka gets the same FINSTREAM_KAFKA_* settings, with
its own identity in Strimzi's conventions: the KafkaUser <userPrefix><role>
(KEDA reads a role's lag as that role),
whose Secret (same name) holds `password` (SCRAM-SHA-512) or user.crt and
user.key (authentication type tls); the cluster CA is ca.crt of
<cluster>-cluster-ca-cert. deploy/README.md, Securing Kafka. */}}

{{- define "finstream.kafkaUser" -}}
{{- printf "%s%s" .root.Values.kafka.userPrefix .role | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* dict "root" $ "role" <role>: {"env": {...}, "secrets": {...}} as JSON. */}}
{{- define "finstream.kafkaClient" -}}
{{- $k := .root.Values.kafka }}
{{- $user := include "finstream.kafkaUser" . }}
{{- $env := dict "FINSTREAM_KAFKA_SECURITY_PROTOCOL" $k.securityProtocol }}
{{- $secrets := dict }}
{{- if hasPrefix "SASL_" $k.securityProtocol }}
{{- $_ := set $env "FINSTREAM_KAFKA_SASL_MECHANISM" $k.saslMechanism }}
{{- $_ := set $env "FINSTREAM_KAFKA_SASL_USERNAME" $user }}
{{- $_ := set $secrets "FINSTREAM_KAFKA_SASL_PASSWORD" (dict "name" $user "key" "password") }}
{{- end }}
{{- if hasSuffix "SSL" $k.securityProtocol }}
{{- $_ := set $env "FINSTREAM_KAFKA_SSL_VERIFY_HOSTNAME" (toString $k.verifyHostname) }}
{{- with $k.ca.secret }}
{{- $_ := set $env "FINSTREAM_KAFKA_SSL_CA_FILE" (printf "/etc/finstream/kafka-ca/%s" $k.ca.key) }}
{{- end }}
{{- if $k.clientCertificate }}
{{- $_ := set $env "FINSTREAM_KAFKA_SSL_CERT_FILE" "/etc/finstream/kafka-user/user.crt" }}
{{- $_ := set $env "FINSTREAM_KAFKA_SSL_KEY_FILE" "/etc/finstream/kafka-user/user.key" }}
{{- end }}
{{- end }}
{{- dict "env" $env "secrets" $secrets | toJson }}
{{- end }}

{{/* dict "root" $ "role" <role>: volume list items (indent them under volumes:). */}}
{{- define "finstream.kafkaVolumes" -}}
{{- $k := .root.Values.kafka }}
{{- if hasSuffix "SSL" $k.securityProtocol }}
{{- with $k.ca.secret }}
- name: kafka-ca
  secret:
    secretName: {{ . }}
    items: [{key: {{ $k.ca.key | quote }}, path: {{ $k.ca.key | quote }}}]
    defaultMode: 0440
{{- end }}
{{- if $k.clientCertificate }}
- name: kafka-user
  secret:
    secretName: {{ include "finstream.kafkaUser" . }}
    items: [{key: user.crt, path: user.crt}, {key: user.key, path: user.key}]
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end }}

{{- define "finstream.kafkaVolumeMounts" -}}
{{- $k := .root.Values.kafka }}
{{- if hasSuffix "SSL" $k.securityProtocol }}
{{- if $k.ca.secret }}
- name: kafka-ca
  mountPath: /etc/finstream/kafka-ca
  readOnly: true
{{- end }}
{{- if $k.clientCertificate }}
- name: kafka-user
  mountPath: /etc/finstream/kafka-user
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* What each identity may do, for Strimzi KafkaUser ACLs: topics read
(consumed), topics written, and whether it is a stream role (its own
changelog topics <group>-<store>-changelog, and transactional ids
<group>-<instance id>, the pod name). Groups: <namespace>finstream-<role>
and its -restore readers, by prefix. Mirrors src/finstream/roles.py and the
roles' producers; tests/deploy/test_chart_production.py checks the inputs. */}}
{{- define "finstream.kafkaAccess" -}}
{{- $outbound := list "notify.outbound.email" "notify.outbound.push" "notify.outbound.sms" "notify.outbound.inapp" }}
{{- $delivery := list "notify.delivery" "notify.preferences" "audit.events" "dlq" }}
{{- dict
  "simulator" (dict "write" (list "md.ticks"))
  "connector" (dict "write" (list "md.ticks" "dlq"))
  "sandbox" (dict)
  "quotes" (dict "write" (list "md.bars.1m" "dlq") "stream" true)
  "alerts" (dict "write" (list "alerts.fired" "alerts.rules.by-symbol" "notify.requests" "audit.events" "dlq") "stream" true)
  "router" (dict "write" (concat $outbound (list "notify.scheduled.items" "audit.events" "dlq")) "stream" true)
  "history" (dict "write" (list "dlq"))
  "bars" (dict "write" (list "dlq"))
  "statestore" (dict "write" (list "dlq"))
  "audit" (dict "write" (list "dlq"))
  "feedback" (dict "write" (list "notify.preferences" "audit.events" "dlq"))
  "inapp" (dict "write" $delivery)
  "delivery-email" (dict "write" $delivery)
  "delivery-push" (dict "write" $delivery)
  "delivery-sms" (dict "write" $delivery)
  "api" (dict "write" (list "alerts.rules" "notify.preferences" "notify.requests" "notify.scheduled.commands" "notify.delivery" "audit.events"))
  "retention" (dict "write" (list "audit.events"))
  | toJson }}
{{- end }}

{{/* "true" when topics are applied by the hook Job (not Strimzi's topic operator). */}}
{{- define "finstream.topicsByJob" -}}
{{- $mode := .Values.topics.management }}
{{- if eq $mode "auto" }}
{{- $mode = ternary "strimzi" "job" (.Capabilities.APIVersions.Has "kafka.strimzi.io/v1beta2/KafkaTopic") }}
{{- end }}
{{- eq $mode "job" }}
{{- end }}

{{/* sasl and tls of KEDA's Kafka trigger metadata (its TriggerAuthentication holds the rest). */}}
{{- define "finstream.kedaKafkaMetadata" -}}
{{- $k := .Values.kafka }}
{{- $sasl := dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512" }}
{{- if hasPrefix "SASL_" $k.securityProtocol }}
sasl: {{ index $sasl $k.saslMechanism }}
{{- end }}
{{- if hasSuffix "SSL" $k.securityProtocol }}
tls: enable
{{- end }}
{{- end }}
