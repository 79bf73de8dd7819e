#!/usr/bin/env bash
# Renders every overlay with `kubectl kustomize` and checks what it renders:
#   - no two objects share a kind, namespace and name;
#   - every object except cluster-scoped ones has a namespace;
#   - every container of a Deployment or StatefulSet has readiness and liveness probes;
#   - every container of a healthcode pod (app.kubernetes.io/part-of=healthcode) has native
#     gRPC startup, readiness and liveness probes;
#   - every ConfigMap a container takes its environment from is rendered too.
# Needs kubectl only (no cluster); KUBECTL overrides the command. Exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "$0")"
kubectl=${KUBECTL:-kubectl}
if ! command -v "$kubectl" >/dev/null 2>&1; then
    echo "check.sh: $kubectl not found" >&2
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One line per object. `annotate --local` only serves to evaluate JSONPath offline.
containers='.spec.template.spec.containers'
summary="{.kind}|{.metadata.namespace}|{.metadata.name}"
summary+="|{.spec.template.metadata.labels.app\.kubernetes\.io/part-of}"
summary+="|{${containers}[*].name}"
summary+="|{${containers}[?(@.readinessProbe)].name}"
summary+="|{${containers}[?(@.livenessProbe)].name}"
summary+="|{${containers}[?(@.startupProbe.grpc.port)].name}"
summary+="|{${containers}[?(@.readinessProbe.grpc.port)].name}"
summary+="|{${containers}[?(@.livenessProbe.grpc.port)].name}"
summary+="|{${containers}[*].envFrom[*].configMapRef.name}"
summary+='{"\n"}'

failed=0
for overlay in overlays/*/; do
    overlay=${overlay%/}
    rendered="$work/$(basename "$overlay").yaml"
    if ! "$kubectl" kustomize "$overlay" >"$rendered"; then
        echo "FAIL $overlay: kustomize could not render it"
        failed=1
        continue
    fi
    if ! "$kubectl" annotate --local -f "$rendered" check.sh/evaluated=true \
        -o jsonpath="$summary" >"$rendered.summary"; then
        echo "FAIL $overlay: could not read the rendered objects"
        failed=1
        continue
    fi

    problems=$(awk -F'|' '
        BEGIN {
            split("Namespace ClusterRole ClusterRoleBinding PriorityClass StorageClass " \
                  "CustomResourceDefinition ValidatingWebhookConfiguration " \
                  "MutatingWebhookConfiguration", scoped, " ")
            for (i in scoped) cluster[scoped[i]] = 1
        }
        {
            kind = $1; ns = $2; name = $3; partof = $4
            id = kind "/" name (ns == "" ? "" : " in " ns)
            if (seen[kind "|" ns "|" name]++) print "duplicate " id
            if (!(kind in cluster) && ns == "") print "no namespace on " id
            if (kind == "ConfigMap") configmaps[name] = 1
            if (kind != "Deployment" && kind != "StatefulSet") next
            if ($6 != $5) print id ": a container has no readinessProbe (" $5 " vs " $6 ")"
            if ($7 != $5) print id ": a container has no livenessProbe (" $5 " vs " $7 ")"
            if (partof == "healthcode" && ($8 != $5 || $9 != $5 || $10 != $5))
                print id ": a healthcode container lacks a gRPC startup, readiness or liveness probe"
            n = split($11, refs, " ")
            for (i = 1; i <= n; i++) wanted[refs[i]] = wanted[refs[i]] " " id
        }
        END {
            for (ref in wanted) if (!(ref in configmaps))
                print "ConfigMap " ref " is not rendered but used by" wanted[ref]
        }
    ' "$rendered.summary")

    if [[ -n "$problems" ]]; then
        while IFS= read -r problem; do echo "FAIL $overlay: $problem"; done <<<"$problems"
        failed=1
    else
        echo "ok   $overlay ($(wc -l <"$rendered.summary") objects)"
    fi
done

exit "$failed"
