// Validate custom resources (JSON array on stdin) against their CRDs' OpenAPI schemas, as compiled by
// @kubernetes-models/* (scripts/install-crd-schemas.sh). argv[2]: that node_modules folder.
// Prints one JSON object per document: {kind, name, ok, error}. Exit 0 even when some fail (the test
// reads the verdicts); exit 2 when a kind has no validator here.
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { readFileSync } from "node:fs";

const modules = process.argv[2];
const MODELS = {
  "monitoring.coreos.com/v1/ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
  "monitoring.coreos.com/v1/PodMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor.js",
  "monitoring.coreos.com/v1/PrometheusRule": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule.js",
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.js",
  "keda.sh/v1alpha1/ScaledJob": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledJob.js",
  "keda.sh/v1alpha1/TriggerAuthentication": "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication.js",
};

const docs = JSON.parse(readFileSync(0, "utf8"));
for (const doc of docs) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const name = doc.metadata?.name;
  if (!(key in MODELS)) {
    console.log(JSON.stringify({ kind: key, name, ok: false, error: "no CRD schema for this kind" }));
    process.exitCode = 2;
    continue;
  }
  const module = await import(pathToFileURL(join(modules, MODELS[key])).href);
  const Model = module[doc.kind];
  try {
    new Model(doc).validate();
    console.log(JSON.stringify({ kind: key, name, ok: true, error: null }));
  } catch (error) {
    console.log(JSON.stringify({ kind: key, name, ok: false, error: String(error.message ?? error) }));
  }
}
