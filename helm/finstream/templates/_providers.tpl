{{/* Roles that need providers (issue 15) -------------------------------------
A delivery role with no configured provider on its channel refuses to start,
and a market-data role in production refuses synthetic prices: rather than
crash-loop, such a role is not deployed and NOTES.txt says why.

A provider counts as configured when every variable it needs is set as a
plain value (config.extraEnv, workers.<role>.env) or from a Secret that is
not `optional` (an optional Secret may be absent: the pod would start without
it). "A|B" means either. The table mirrors the providers' create() functions
(src/finstream/sinks/delivery/*.py, connectors/registry.py);
tests/deploy/test_chart_production.py keeps the two in step. */}}

{{- define "finstream.providerNeeds" -}}
{{- dict
  "sendgrid" (list "FINSTREAM_DELIVERY_SENDGRID_API_KEY")
  "ses" (list "FINSTREAM_DELIVERY_SES_ACCESS_KEY_ID" "FINSTREAM_DELIVERY_SES_SECRET_ACCESS_KEY")
  "smtp" (list "FINSTREAM_DELIVERY_SMTP_HOST")
  "fcm" (list "FINSTREAM_DELIVERY_FCM_SERVICE_ACCOUNT_FILE")
  "apns" (list "FINSTREAM_DELIVERY_APNS_KEY_FILE" "FINSTREAM_DELIVERY_APNS_KEY_ID" "FINSTREAM_DELIVERY_APNS_TEAM_ID" "FINSTREAM_DELIVERY_APNS_TOPIC")
  "twilio" (list "FINSTREAM_DELIVERY_TWILIO_ACCOUNT_SID" "FINSTREAM_DELIVERY_TWILIO_AUTH_TOKEN" "FINSTREAM_DELIVERY_TWILIO_FROM|FINSTREAM_DELIVERY_TWILIO_MESSAGING_SERVICE_SID")
  "alphavantage" (list "FINSTREAM_MD_ALPHAVANTAGE_KEY")
  "yahoo" (list)
  "finnhub" (list "FINSTREAM_MD_FINNHUB_KEY")
  "finnhub-ws" (list "FINSTREAM_MD_FINNHUB_KEY")
  "polygon" (list "FINSTREAM_MD_POLYGON_KEY")
  "iex" (list "FINSTREAM_MD_IEX_KEY" "FINSTREAM_MD_IEX_ENABLED")
  "simulated" (list)
  "replay" (list "FINSTREAM_MD_REPLAY_PATH")
  | toJson }}
{{- end }}

{{/* The chain setting of each provider-backed role and its default (finstream/settings/). */}}
{{- define "finstream.providerChains" -}}
{{- dict
  "delivery-email" (list "FINSTREAM_DELIVERY_EMAIL_PROVIDERS" "sendgrid,ses,smtp" "email")
  "delivery-push" (list "FINSTREAM_DELIVERY_PUSH_PROVIDERS" "fcm,apns" "push")
  "delivery-sms" (list "FINSTREAM_DELIVERY_SMS_PROVIDERS" "twilio" "SMS")
  "connector" (list "FINSTREAM_MD_CHAIN" "simulated" "market-data")
  "simulator" (list "" "simulated" "market-data")
  | toJson }}
{{- end }}

{{/* dict "root" $ "name" <role> "worker" <values>: why the role cannot run
here (one line), or nothing. */}}
{{- define "finstream.providerGap" -}}
{{- $root := .root }}
{{- $w := .worker }}
{{- $chains := include "finstream.providerChains" . | fromJson }}
{{- if hasKey $chains .name }}
{{- $chain := index $chains .name }}
{{- $needs := include "finstream.providerNeeds" . | fromJson }}
{{- $env := mergeOverwrite (deepCopy $root.Values.config.extraEnv) (deepCopy ($w.env | default dict)) }}
{{- $have := dict }}
{{- range $k, $v := $env }}{{ if $v }}{{ $_ := set $have $k true }}{{ end }}{{ end }}
{{- range $k, $v := mergeOverwrite (deepCopy $root.Values.secrets.env) (deepCopy ($w.secrets | default dict)) }}
{{- if not $v.optional }}{{ $_ := set $have $k true }}{{ end }}
{{- end }}
{{- $setting := index $chain 0 }}
{{- $names := splitList "," (default (index $chain 1) (and $setting (index $env $setting))) }}
{{- $production := eq (toString $root.Values.config.env) "production" }}
{{- $synthetic := eq (toString (index $env "FINSTREAM_MD_ALLOW_SYNTHETIC" | default "false")) "true" }}
{{- $ok := list }}
{{- $missing := list }}
{{- range $names }}
{{- $p := trim . }}
{{- if and $production (not $synthetic) (has $p (list "simulated" "replay")) }}
{{- $missing = append $missing (printf "%s (synthetic prices, refused in production without FINSTREAM_MD_ALLOW_SYNTHETIC=true)" $p) }}
{{- else if hasKey $needs $p }}
{{- $lacks := list }}
{{- range (index $needs $p) }}
{{- $any := false }}
{{- range splitList "|" . }}{{ if hasKey $have . }}{{ $any = true }}{{ end }}{{ end }}
{{- if not $any }}{{ $lacks = append $lacks . }}{{ end }}
{{- end }}
{{- if $lacks }}
{{- $missing = append $missing (printf "%s needs %s" $p (join ", " $lacks)) }}
{{- else }}
{{- $ok = append $ok $p }}
{{- end }}
{{- end }}
{{- end }}
{{- if not $ok }}
{{- printf "no %s provider is configured: %s" (index $chain 2) (join "; " $missing) }}
{{- end }}
{{- end }}
{{- end }}

{{/* dict "root" $ "name" <role> "worker" <values>: "true" when the role is deployed. */}}
{{- define "finstream.workerActive" -}}
{{- if and .worker.enabled (not (include "finstream.providerGap" .)) }}true{{ end }}
{{- end }}
