#!/usr/bin/env python3
"""Offline validation of everything under deploy/ (run by .ci/deploy-check).

Each check prints `FAIL <file> [<object>]: <reason>` and the run exits non-zero if any failed.

  kustomize   every kustomization renders (`kubectl kustomize`); every manifest is in one
  k8s         every rendered built-in object validates (kubernetes-validate, strict) against
              the oldest supported and the newest Kubernetes schema
  crds        cert-manager / prometheus-operator kinds against ci/schemas/crds.yaml (structural);
              actions.github.com kinds against ARC's real CRDs (../shared/reference/crds)
  semantics   env $(VAR) references, voter ids <-> peers <-> certificates <-> services,
              SPIFFE URIs, ARC listenerTemplate rules, per-region scale-set names
  admission   the ValidatingAdmissionPolicy's CEL on ci/admission-cases.yaml (cel-python)
  rules       PrometheusRule: structure, PromQL parse (promql-parser), runbook anchors
  metrics     every metric a rule or the dashboard names is exported by the binaries: the
              names come from `metrics-scrape --format json` (--scraped FILE: /metrics of 3
              real voters and 2 real agents in a sandbox); without it (binaries not built)
              they fall back to names extracted from the Rust source, and say so
  values      ARC chart values against ARC's AutoscalingRunnerSet CRD
  listener    the sample listener config against ARC's rules (reference §5.1)
  flags       the README's configuration table matches the binaries' --help (when built)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CI = DEPLOY / "ci"
# Oldest Kubernetes the manifests support (StatefulSet ordinals GA, VAP v1 GA in 1.30) and newest.
K8S_VERSIONS = ["1.31.0", None]
# Metrics deploy/ may name that arcfed does not export, and who exports them.
EXTERNAL_METRICS = {
    "up": "Prometheus (scrape health)",
    "certmanager_certificate_expiration_timestamp_seconds": "cert-manager's controller",
}
# Series the source registers that a short sandbox run may not produce; allowed when the scrape
# lacks them (with a WARN), never when the Rust source lacks them too. Keep this list short.
ALLOWED_UNSCRAPED = {
    "gha_job_startup_duration_seconds_bucket": "ARC's job histograms are label families: no series "
    "until the holder sees a JobStarted (metrics-scrape enqueues jobs, but a slow run may miss it)",
    "gha_job_execution_duration_seconds_bucket": "no series until a JobCompleted reaches the holder",
    "gha_started_jobs_total": "no series until the holder sees a JobStarted",
    "gha_completed_jobs_total": "no series until the holder sees a JobCompleted",
}
# Series a running deployment is known not to export yet, with the reason (empty: the
# federated holder now records GitHub's statistics into the scale-set-wide gha_* gauges).
KNOWN_UNEXPORTED: dict[str, str] = {}
ALLOWED_UNSCRAPED.update(KNOWN_UNEXPORTED)

failures: list[str] = []
passed = 0


def fail(where: str, msg: str) -> None:
    failures.append(f"FAIL {where}: {msg}")
    print(f"FAIL {where}: {msg}", flush=True)


def ok() -> None:
    global passed
    passed += 1


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def objname(o: dict) -> str:
    m = o.get("metadata") or {}
    ns = m.get("namespace")
    return f"{o.get('kind')}/{(ns + '/') if ns else ''}{m.get('name')}"


# ---------------------------------------------------------------- kustomize


def kustomizations() -> list[Path]:
    out = []
    for k in sorted(DEPLOY.rglob("kustomization.yaml")):
        doc = yaml.safe_load(k.read_text())
        if doc.get("kind") != "Component":
            out.append(k.parent)
    return out


def render(kubectl: str, d: Path) -> list[dict] | None:
    r = subprocess.run([kubectl, "kustomize", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        fail(rel(d), "kubectl kustomize failed: " + r.stderr.strip())
        return None
    ok()
    return [o for o in yaml.safe_load_all(r.stdout) if o]


def referenced_files() -> set[Path]:
    """Files that some kustomization or component lists (resources, files, envs, patches)."""
    refs: set[Path] = set()
    for k in DEPLOY.rglob("kustomization.yaml"):
        doc = yaml.safe_load(k.read_text())
        base = k.parent
        for r in doc.get("resources", []) or []:
            refs.add((base / r).resolve())
        for g in (doc.get("configMapGenerator") or []) + (doc.get("secretGenerator") or []):
            for f in (g.get("files") or []) + (g.get("envs") or []):
                refs.add((base / f.split("=", 1)[-1]).resolve())
        for p in doc.get("patches", []) or []:
            if "path" in p:
                refs.add((base / p["path"]).resolve())
    return refs


def check_every_manifest_in_a_kustomization() -> None:
    refs = referenced_files()
    # Not Kubernetes manifests: Helm values, compose, CI data.
    skip = [DEPLOY / "ci", DEPLOY / "compose", DEPLOY / "arc" / "values", DEPLOY / "examples"]
    for f in sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml")):
        if f.name == "kustomization.yaml" or any(f.is_relative_to(s) for s in skip):
            continue
        if f.resolve() not in refs:
            fail(rel(f), "manifest is not listed by any kustomization")
        else:
            ok()


# ---------------------------------------------------------------- schemas


def strictify(schema):
    """CRD schemas prune unknown fields; for a check, unknown fields are typos: forbid them."""
    if isinstance(schema, dict):
        s = {k: strictify(v) for k, v in schema.items()}
        if (
            s.get("type") == "object"
            and "properties" in s
            and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")
        ):
            s["additionalProperties"] = False
        return s
    if isinstance(schema, list):
        return [strictify(v) for v in schema]
    return schema


def load_arc_crds(crd_dir: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group = doc["spec"]["group"]
            kind = doc["spec"]["names"]["kind"]
            for v in doc["spec"]["versions"]:
                s = strictify(v["schema"]["openAPIV3Schema"])
                props = s.setdefault("properties", {})
                props["apiVersion"] = {"const": f"{group}/{v['name']}"}
                props["kind"] = {"const": kind}
                props["metadata"] = {"type": "object"}
                out[f"{group}/{v['name']}/{kind}"] = s
    return out


def validate_schema(schema: dict, obj, where: str, defs: dict | None = None) -> bool:
    import jsonschema

    if defs is not None:
        schema = {**schema, "$defs": defs}
    v = jsonschema.Draft202012Validator(schema)
    errs = sorted(v.iter_errors(obj), key=lambda e: list(e.absolute_path))
    for e in errs[:5]:
        path = "/".join(str(p) for p in e.absolute_path) or "(root)"
        fail(where, f"{path}: {e.message[:300]}")
    return not errs


def validate_k8s(o: dict, where: str) -> bool:
    import kubernetes_validate as kv

    good = True
    for ver in K8S_VERSIONS:
        version = ver or kv.latest_version()
        try:
            kv.validate(o, version, strict=True)
        except kv.ValidationError as e:
            err = getattr(e, "caught", None) or e
            path = "/".join(str(p) for p in getattr(err, "absolute_path", [])) or "(root)"
            msg = getattr(err, "message", str(err))
            fail(where, f"Kubernetes {version} schema: {path}: {msg[:300]}")
            good = False
        except kv.SchemaNotFoundError:
            fail(where, f"no Kubernetes {version} schema for {o.get('apiVersion')} {o.get('kind')}")
            good = False
    return good


class Schemas:
    def __init__(self, crd_dir: Path):
        doc = yaml.safe_load((CI / "schemas" / "crds.yaml").read_text())
        self.defs = doc.pop("$defs")
        self.structural = doc
        self.arc = load_arc_crds(crd_dir)
        if not self.arc:
            fail(rel(crd_dir), "no ARC CRDs found")

    def check(self, o: dict, where: str) -> None:
        api = o.get("apiVersion", "")
        key = f"{api}/{o.get('kind')}"
        group = api.split("/")[0] if "/" in api else ""
        if key in self.arc:
            if validate_schema(self.arc[key], o, where + " (ARC CRD)"):
                ok()
        elif key in self.structural:
            if validate_schema(self.structural[key], o, where + " (structural schema)", self.defs):
                ok()
        elif "." in group and not group.endswith(".k8s.io"):
            fail(where, f"no schema for custom kind {key}; add one to deploy/ci/schemas/crds.yaml")
        else:
            if validate_k8s(o, where):
                ok()


# ---------------------------------------------------------------- semantics

SPIFFE = re.compile(r"^spiffe://arcfed/(coordinator|agent|admin)/([A-Za-z0-9._-]{1,128})$")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def pod_specs(o: dict):
    spec = o.get("spec") or {}
    if o.get("kind") in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
        yield spec.get("template", {}).get("spec", {})
    if o.get("kind") == "AutoscalingRunnerSet":
        for k in ("listenerTemplate", "template"):
            if k in spec:
                yield spec[k].get("spec", {})


def check_env_refs(o: dict, where: str, configmaps: dict[str, dict]) -> None:
    for ps in pod_specs(o):
        for c in ps.get("containers", []) + ps.get("initContainers", []):
            defined: set[str] = set()
            for ef in c.get("envFrom", []) or []:
                name = (ef.get("configMapRef") or {}).get("name")
                if name in configmaps:
                    defined |= set((configmaps[name].get("data") or {}).keys())
            for e in c.get("env", []) or []:
                for ref in VAR_REF.findall(str(e.get("value", ""))):
                    if ref not in defined:
                        fail(where, f"container {c['name']}: env {e['name']} uses $({ref}), which is not defined before it (Kubernetes leaves it unexpanded)")
                        break
                else:
                    ok()
                defined.add(e["name"])
            for field in ("command", "args"):
                for s in c.get(field, []) or []:
                    for ref in VAR_REF.findall(s):
                        if ref not in defined:
                            fail(where, f"container {c['name']}: {field} uses undefined $({ref})")


def check_render_semantics(d: Path, objs: list[dict]) -> None:
    where = rel(d)
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    configmaps = {o["metadata"]["name"]: o for o in by_kind.get("ConfigMap", [])}
    secrets_from_certs = {}
    issuers = {o["metadata"]["name"] for o in by_kind.get("Issuer", [])}
    for c in by_kind.get("Certificate", []):
        w = f"{where} {objname(c)}"
        spec = c["spec"]
        secrets_from_certs[spec["secretName"]] = c
        if spec["issuerRef"].get("kind", "Issuer") == "Issuer" and spec["issuerRef"]["name"] not in issuers:
            fail(w, f"issuerRef {spec['issuerRef']['name']} is not an Issuer of this kustomization")
        uris = spec.get("uris", [])
        if spec.get("isCA"):
            continue
        ids = [u for u in uris if u.startswith("spiffe://arcfed/")]
        if len(ids) != 1 or not SPIFFE.match(ids[0]):
            fail(w, f"needs exactly one spiffe://arcfed/<coordinator|agent|admin>/<name> URI SAN, has {uris}")
            continue
        role = SPIFFE.match(ids[0]).group(1)
        usages = set(spec.get("usages", []))
        need = {"client auth"} | ({"server auth"} if role == "coordinator" else set())
        if not need <= usages:
            fail(w, f"role {role} needs usages {sorted(need)}, has {sorted(usages)}")
        elif "CHANGE-ME" in ids[0] and "/base" not in where:
            fail(w, f"placeholder identity {ids[0]} in an overlay")
        else:
            ok()
    for o in objs:
        check_env_refs(o, f"{where} {objname(o)}", configmaps)
    for s in by_kind.get("StatefulSet", []):
        if d.name == "base" and not by_kind.get("Certificate", [])[1:]:
            # The base lacks the voter components by design (overlays add them); its objects
            # are schema-checked above, the quorum wiring is checked in every overlay.
            continue
        check_voters(where, s, by_kind, configmaps, secrets_from_certs)


def env_of(container: dict, configmaps: dict[str, dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ef in container.get("envFrom", []) or []:
        name = (ef.get("configMapRef") or {}).get("name")
        if name not in configmaps:
            raise KeyError(name)
        env.update(configmaps[name].get("data") or {})
    for e in container.get("env", []) or []:
        if "value" in e:
            env[e["name"]] = e["value"]
    return env


def check_voters(where, sts, by_kind, configmaps, certs) -> None:
    w = f"{where} {objname(sts)}"
    spec = sts["spec"]
    ps = spec["template"]["spec"]
    c = next((c for c in ps["containers"] if c["name"] == "coordinator"), None)
    if c is None:
        fail(w, "no container named coordinator")
        return
    try:
        env = env_of(c, configmaps)
    except KeyError as e:
        fail(w, f"envFrom names ConfigMap {e} that this kustomization does not render")
        return
    start = (spec.get("ordinals") or {}).get("start", 0)
    ids = list(range(start, start + spec.get("replicas", 1)))
    if start < 1:
        fail(w, "ordinals.start must be >= 1: the ordinal is the Raft node id, which is positive")
    peers = {}
    for item in env.get("ARCFED_PEER", "").split(","):
        if "=" not in item:
            fail(w, f"ARCFED_PEER item {item!r} is not ID=HOST:PORT")
            continue
        i, addr = item.split("=", 1)
        peers[int(i)] = addr
    if len(peers) not in (3, 5):
        fail(w, f"ARCFED_PEER lists {len(peers)} voters; use 3 or 5")
    for i in ids:
        if i not in peers:
            fail(w, f"voter {i} runs here but is not in ARCFED_PEER {sorted(peers)}")
            continue
        svc = f"arcfed-coordinator-{i}"
        if not any(s["metadata"]["name"] == svc for s in by_kind.get("Service", [])):
            fail(w, f"voter {i}: no per-voter Service {svc}")
        cert = certs.get(f"arcfed-coordinator-{i}-tls")
        if cert is None:
            fail(w, f"voter {i}: no Certificate for Secret arcfed-coordinator-{i}-tls")
            continue
        if f"spiffe://arcfed/coordinator/{i}" not in cert["spec"].get("uris", []):
            fail(w, f"voter {i}: certificate lacks spiffe://arcfed/coordinator/{i}")
        host = peers[i].rsplit(":", 1)[0]
        adv = env.get("ARCFED_ADVERTISE", "").replace("$(ARCFED_NODE_ID)", str(i)).rsplit(":", 1)[0]
        for name, what in ((host, "its ARCFED_PEER address"), (adv, "its advertised address")):
            if name not in cert["spec"].get("dnsNames", []):
                fail(w, f"voter {i}: certificate dnsNames lack {name} ({what}); TLS to it would fail")
        ok()
    for i in peers:
        if i not in ids and f"arcfed-coordinator-{i}-tls" in certs:
            fail(w, f"voter {i} is not run here but its certificate is issued here")
    vol = next((v for v in ps.get("volumes", []) if v["name"] == "tls"), None)
    mounted = {s["secret"]["name"] for s in (vol or {}).get("projected", {}).get("sources", []) if "secret" in s}
    for i in ids:
        if f"arcfed-coordinator-{i}-tls" not in mounted:
            fail(w, f"voter {i}'s Secret is not in the tls projected volume")
    labels = ps and spec["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for o in by_kind.get(kind, []):
            sel = (o["spec"].get("selector") or o["spec"].get("podSelector") or {}).get("matchLabels", {})
            if not all(labels.get(k) == v for k, v in sel.items()):
                fail(f"{where} {objname(o)}", "selector does not match the coordinator pods")
    for s in by_kind.get("Service", []):
        sel = dict(s["spec"].get("selector") or {})
        sel.pop("statefulset.kubernetes.io/pod-name", None)
        if not all(labels.get(k) == v for k, v in sel.items()):
            fail(f"{where} {objname(s)}", "selector matches no pod of this kustomization")


# ---------------------------------------------------------------- ARC side


def chart_values_to_ars(values: dict, name: str) -> dict:
    known = {
        "githubConfigUrl", "githubConfigSecret", "runnerGroup", "runnerScaleSetName", "scaleSetLabels",
        "minRunners", "maxRunners", "proxy", "githubServerTLS", "keyVault", "listenerTemplate",
        "listenerMetrics", "resourceMeta", "controllerServiceAccount", "template", "containerMode",
        "namespaceOverride",
    }
    for k in values:
        if k not in known:
            fail("deploy/arc/values", f"unknown gha-runner-scale-set value {k!r}")
    spec = {k: values[k] for k in ("githubConfigUrl", "runnerGroup", "runnerScaleSetName", "minRunners",
                                   "maxRunners", "listenerTemplate", "template", "proxy", "githubServerTLS",
                                   "listenerMetrics") if k in values}
    if isinstance(values.get("githubConfigSecret"), str):
        spec["githubConfigSecret"] = values["githubConfigSecret"]
    if "scaleSetLabels" in values:
        spec["runnerScaleSetLabels"] = values["scaleSetLabels"]
    labels = (((values.get("resourceMeta") or {}).get("autoscalingRunnerSet") or {}).get("labels")) or {}
    return {
        "apiVersion": "actions.github.com/v1alpha1",
        "kind": "AutoscalingRunnerSet",
        "metadata": {"name": name, "namespace": "arc-runners", "labels": labels},
        "spec": spec,
    }


def check_listener_template(tpl: dict, where: str, agent_objs: list[dict]) -> None:
    spec = tpl.get("spec") or {}
    cs = [c for c in spec.get("containers", []) if c.get("name") == "listener"]
    if len(cs) != 1:
        fail(where, "listenerTemplate needs exactly one container named `listener` (ARC merges by that name)")
        return
    c = cs[0]
    if not c.get("image"):
        fail(where, "listener container has no image (ARC would keep its own)")
    if not (c.get("command") or [""])[0].endswith("/arcfed-agent"):
        fail(where, f"listener command must run arcfed-agent, is {c.get('command')}")
    if spec.get("terminationGracePeriodSeconds") != 60:
        fail(where, "listenerTemplate.spec.terminationGracePeriodSeconds must be 60 (ARC copies it unconditionally)")
    if "hostname" in spec:
        fail(where, "listenerTemplate must not set hostname")
    env_names = {e["name"] for e in c.get("env", [])}
    for need in ("ARCFED_TLS_CERT", "ARCFED_TLS_KEY", "ARCFED_TLS_CA"):
        if need not in env_names:
            fail(where, f"listener env lacks {need}")
    cms = {o["metadata"]["name"]: o for o in agent_objs if o["kind"] == "ConfigMap"}
    certs = {o["spec"]["secretName"] for o in agent_objs if o["kind"] == "Certificate"}
    for ef in c.get("envFrom", []):
        n = (ef.get("configMapRef") or {}).get("name")
        if n and n not in cms:
            fail(where, f"envFrom ConfigMap {n} is not rendered by deploy/arc/agent")
    for v in spec.get("volumes", []):
        s = (v.get("secret") or {}).get("secretName")
        if s and s not in certs:
            fail(where, f"volume {v['name']}: Secret {s} is not issued by deploy/arc/agent")
    mounts = {m["name"] for m in c.get("volumeMounts", [])}
    for v in spec.get("volumes", []):
        if v["name"] not in mounts:
            fail(where, f"volume {v['name']} is not mounted in the listener container")
    ports = {p.get("containerPort") for p in c.get("ports", [])}
    for cm in cms.values():
        admin = (cm.get("data") or {}).get("ARCFED_ADMIN_LISTEN", "")
        if admin and int(admin.rsplit(":", 1)[1]) not in ports:
            fail(where, f"ARCFED_ADMIN_LISTEN {admin} is not a declared container port")
    for probe in ("livenessProbe", "readinessProbe"):
        path = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
        if path not in ("/live", "/ready"):
            fail(where, f"{probe} must GET /live or /ready, is {path}")
    # The pod template itself, as Kubernetes sees it.
    validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "listener"}, "template": tpl},
                 where + " listenerTemplate as a PodTemplate")
    ok()


def check_arc(kubectl: str, schemas: Schemas, renders: dict[Path, list[dict]]) -> None:
    values_file = DEPLOY / "arc" / "values" / "gha-runner-scale-set.yaml"
    values = yaml.safe_load(values_file.read_text())
    ars = chart_values_to_ars(values, "arc-runners-region-a")
    schemas.check(ars, f"{rel(values_file)} (as the chart's AutoscalingRunnerSet)")
    agent_objs = renders.get(DEPLOY / "arc" / "agent" / "base", [])
    check_listener_template(values.get("listenerTemplate", {}), rel(values_file), agent_objs)
    if ars["metadata"]["labels"].get("arcfed.io/federated") != "true":
        fail(rel(values_file), "resourceMeta.autoscalingRunnerSet.labels lacks arcfed.io/federated: \"true\"")
    # The kustomize-rendered set must say what the values say.
    base = renders.get(DEPLOY / "arc" / "scale-set" / "base", [])
    for o in base:
        if o["kind"] != "AutoscalingRunnerSet":
            continue
        for k, v in ars["spec"].items():
            if o["spec"].get(k) != v:
                fail(f"deploy/arc/scale-set/base {objname(o)}", f"spec.{k} differs from {rel(values_file)}")
        check_listener_template(o["spec"].get("listenerTemplate", {}), f"deploy/arc/scale-set/base {objname(o)}", agent_objs)
    # Regions: distinct object names, one shared scale set.
    regions = {d: objs for d, objs in renders.items() if d.is_relative_to(DEPLOY / "arc" / "scale-set" / "overlays")}
    seen_names, shared = {}, set()
    for d, objs in regions.items():
        for o in objs:
            if o["kind"] != "AutoscalingRunnerSet":
                continue
            n = o["metadata"]["name"]
            if n in seen_names:
                fail(rel(d), f"AutoscalingRunnerSet name {n} is also used by {rel(seen_names[n])}; ERS and runner names would collide")
            seen_names[n] = d
            s = o["spec"]
            shared.add((s.get("githubConfigUrl"), s.get("runnerGroup"), s.get("runnerScaleSetName") or n))
            if o["metadata"].get("labels", {}).get("arcfed.io/federated") != "true":
                fail(f"{rel(d)} {objname(o)}", "not labelled arcfed.io/federated=true")
    if len(regions) < 2:
        fail("deploy/arc/scale-set/overlays", "expected one overlay per region (at least two)")
    elif len(shared) != 1:
        fail("deploy/arc/scale-set/overlays", f"regions name different scale sets: {sorted(map(str, shared))}")
    else:
        ok()
    # Each agent overlay: a distinct cluster whose certificate identity matches --cluster.
    clusters = {}
    for d, objs in renders.items():
        if not d.is_relative_to(DEPLOY / "arc" / "agent" / "overlays"):
            continue
        cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "arcfed-agent")
        cluster = cm["data"].get("ARCFED_CLUSTER")
        cert = next(o for o in objs if o["kind"] == "Certificate")
        if f"spiffe://arcfed/agent/{cluster}" not in cert["spec"]["uris"]:
            fail(rel(d), f"agent certificate {cert['spec']['uris']} does not name cluster {cluster}")
        if cluster in clusters:
            fail(rel(d), f"cluster {cluster} also in {rel(clusters[cluster])}")
        clusters[cluster] = d
        check_agent_env(rel(d), cm["data"])
    ok()


AGENT_FLAGS = {  # issue 6's command-line contract; ARCFED_<FLAG> env form
    "listener-config", "cluster", "coordinator", "tls-cert", "tls-key", "tls-ca", "runner-backend",
    "admin-listen", "weight", "profile", "lease-ttl", "coordinator-lost-for", "allow-drills", "github-resolve",
    "log-format", "log-level",
}


AGENT_ENVS: set[str] | None = None  # from `arcfed-agent --help` when the binary is built


def check_agent_env(where: str, data: dict) -> None:
    envs = AGENT_ENVS or {"ARCFED_" + f.upper().replace("-", "_") for f in AGENT_FLAGS}
    for k, v in data.items():
        if k not in envs:
            fail(where, f"{k} is not the env form of an arcfed-agent flag")
    if data.get("ARCFED_PROFILE") not in ("lan", "wan"):
        fail(where, "ARCFED_PROFILE must be lan or wan")
    if data.get("ARCFED_RUNNER_BACKEND", "kube") != "kube":
        fail(where, "a listener in ARC runs the kube backend")
    for a in data.get("ARCFED_COORDINATOR", "").split(","):
        if not re.match(r"^[A-Za-z0-9.-]+:\d+$", a):
            fail(where, f"ARCFED_COORDINATOR item {a!r} is not HOST:PORT")


def check_listener_config() -> None:
    f = DEPLOY / "examples" / "listener-config.json"
    where = rel(f)
    c = json.loads(f.read_text())
    keys = {
        "configure_url": str, "vault_type": str, "vault_lookup_key": str, "azure_key_vault": dict,
        "github_app_id": str, "github_app_installation_id": int, "github_app_private_key": str,
        "github_token": str, "ephemeral_runner_set_namespace": str, "ephemeral_runner_set_name": str,
        "max_runners": int, "min_runners": int, "runner_scale_set_id": int, "runner_scale_set_name": str,
        "server_root_ca": str, "log_level": str, "log_format": str, "metrics_addr": str,
        "metrics_endpoint": str, "metrics": dict,
    }
    for k, v in c.items():
        if k not in keys:
            fail(where, f"unknown key {k!r} (ARC's listener config has {sorted(keys)})")
        elif not isinstance(v, keys[k]) or isinstance(v, bool):
            fail(where, f"{k} must be {keys[k].__name__}")
    for k in ("configure_url", "ephemeral_runner_set_namespace", "ephemeral_runner_set_name"):
        if not c.get(k):
            fail(where, f"{k} must be non-empty")
    if not c.get("runner_scale_set_id"):
        fail(where, "runner_scale_set_id must be non-zero")
    if c.get("max_runners", 0) < c.get("min_runners", 0):
        fail(where, "max_runners < min_runners")
    pat = bool(c.get("github_token"))
    app = all(c.get(k) for k in ("github_app_id", "github_app_installation_id", "github_app_private_key"))
    if c.get("vault_type"):
        fail(where, "vault configs are not supported by arcfed-agent")
    elif pat == app:
        fail(where, "exactly one of github_token or complete GitHub App credentials")
    if c.get("log_level") not in (None, "debug", "info", "warn", "error") or c.get("log_format") not in (None, "text", "json"):
        fail(where, "log_level/log_format out of range")
    ok()


# ---------------------------------------------------------------- admission (CEL)


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def check_admission(renders: dict[Path, list[dict]]) -> None:
    import celpy
    from celpy import celtypes

    objs = renders.get(DEPLOY / "arc" / "admission", [])
    pol = next((o for o in objs if o["kind"] == "ValidatingAdmissionPolicy"), None)
    bind = next((o for o in objs if o["kind"] == "ValidatingAdmissionPolicyBinding"), None)
    where = "deploy/arc/admission"
    if pol is None or bind is None:
        fail(where, "needs a ValidatingAdmissionPolicy and its Binding")
        return
    if bind["spec"]["policyName"] != pol["metadata"]["name"] or "Deny" not in bind["spec"].get("validationActions", []):
        fail(where, "the binding must bind the policy with validationActions [Deny]")
    env = celpy.Environment()

    def compile_(expr: str, what: str):
        try:
            return env.program(env.compile(expr))
        except Exception as e:  # noqa: BLE001 - report any compile error with the expression
            fail(f"{where} {what}", f"CEL does not compile: {e}")
            return None

    spec = pol["spec"]
    conds = [(c["name"], compile_(c["expression"], f"matchCondition {c['name']}")) for c in spec.get("matchConditions", [])]
    variables = [(v["name"], compile_(v["expression"], f"variable {v['name']}")) for v in spec.get("variables", [])]
    vals = [(v, compile_(v["expression"], f"validation {v['expression']}")) for v in spec["validations"]]
    if any(p is None for _, p in conds + variables) or any(p is None for _, p in vals):
        return
    cases = yaml.safe_load((CI / "admission-cases.yaml").read_text())
    for case in cases["cases"]:
        w = f"{where} case {case['name']!r}"
        op = case["operation"]
        old = merge_patch(cases["base"], case.get("old", {}))
        new = merge_patch(old, case.get("new", {})) if op == "UPDATE" else None
        if op not in spec["matchConstraints"]["resourceRules"][0]["operations"]:
            fail(w, f"operation {op} is not matched by the policy")
            continue
        act = {
            "object": celpy.json_to_cel(new),
            "oldObject": celpy.json_to_cel(old),
            "request": celpy.json_to_cel({"operation": op, "name": old["metadata"]["name"]}),
        }
        try:
            matched = all(bool(p.evaluate(act)) for _, p in conds)
            denied = []
            if matched:
                vs = {}
                for name, p in variables:
                    act["variables"] = celtypes.MapType({celtypes.StringType(k): v for k, v in vs.items()})
                    vs[name] = p.evaluate(act)
                act["variables"] = celtypes.MapType({celtypes.StringType(k): v for k, v in vs.items()})
                for v, p in vals:
                    r = p.evaluate(act)
                    if not isinstance(r, celtypes.BoolType):
                        fail(w, f"validation {v['expression']!r} evaluated to {r!r}, not a bool")
                    elif not bool(r):
                        denied.append(" ".join(v["message"].split()))
        except Exception as e:  # noqa: BLE001
            fail(w, f"CEL evaluation error: {e}")
            continue
        got = "deny" if denied else "allow"
        if got != case["expect"]:
            fail(w, f"expected {case['expect']}, policy says {got} {denied}")
        elif case.get("message") and not any(case["message"] in m for m in denied):
            fail(w, f"denied, but no message contains {case['message']!r}: {denied}")
        else:
            ok()


# ---------------------------------------------------------------- metrics


def _exposed(name: str, typ: str) -> set[str]:
    if typ == "counter":
        n = name if name.endswith("_total") else name + "_total"
        return {n}
    if typ == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count"}
    if typ == "gauge":
        return {name}
    return {name, name + "_total", name + "_bucket", name + "_sum", name + "_count"}


def rust_metrics(path: Path) -> dict[str, str]:
    """Registered names of a prometheus-client registry, by scanning the source.

    Understands `Registry::with_prefix("p")`, `x.sub_registry_with_prefix("p")`,
    `x.register("name", "help", expr)` and `register_with_unit(..., Unit::Seconds, ...)`;
    the metric's type comes from the struct field it registers.
    """
    src = path.read_text()
    fields = {}
    for m in re.finditer(r"\b(?:pub\s+)?(\w+)\s*:\s*((?:Family<[^>]*?,\s*)?(Counter|Gauge|Histogram)\b)", src):
        fields[m.group(1)] = m.group(3).lower()
    prefixes = {}
    for m in re.finditer(r"let\s+(?:mut\s+)?(\w+)\s*=\s*Registry::with_prefix\(\s*\"([^\"]+)\"", src):
        prefixes[m.group(1)] = m.group(2)
    for m in re.finditer(r"let\s+(?:mut\s+)?(\w+)\s*=\s*Registry::default\(\)", src):
        prefixes.setdefault(m.group(1), "")
    for m in re.finditer(r"let\s+(\w+)\s*=\s*(\w+)\.sub_registry_with_prefix\(\s*\"([^\"]+)\"", src):
        parent = prefixes.get(m.group(2), "")
        prefixes[m.group(1)] = f"{parent}_{m.group(3)}" if parent else m.group(3)
    out = {}
    reg = re.compile(
        r"(\w+)\.register(_with_unit)?\(\s*\"([^\"]+)\"\s*,\s*\"(?:[^\"\\]|\\.)*\"\s*,\s*"
        r"(?:Unit::(\w+)\s*,\s*)?(?:[\w.]*?\.)?(\w+)(?:\.clone\(\))?",
        re.S,
    )
    for m in reg.finditer(src):
        var, _, name, unit, field = m.groups()
        p = prefixes.get(var, "")
        full = f"{p}_{name}" if p else name
        if unit:
            u = {"Seconds": "seconds", "Bytes": "bytes", "Ratios": "ratios", "Volts": "volts",
                 "Amperes": "amperes", "Joules": "joules", "Grams": "grams", "Meters": "meters",
                 "Celsius": "celsius"}.get(unit, unit.lower())
            full = f"{full}_{u}"
        out[full] = fields.get(field, "unknown")
    # Names registered in a loop from constant lists (the agent's gha_* metrics):
    #   pub const GHA_GAUGES: &[&str] = &["gha_assigned_jobs", ...];
    for m in re.finditer(r"const\s+(\w+)\s*:\s*&\[&str\]\s*=\s*&\[(.*?)\];", src, re.S):
        const = m.group(1).upper()
        typ = next((t for t in ("gauge", "counter", "histogram") if t.upper() in const), None)
        if typ is None:
            continue
        for name in re.findall(r"\"([a-z_][a-z0-9_]*)\"", m.group(2)):
            out[name] = typ
    return out


def scraped_metrics(path: Path) -> dict[str, str] | None:
    """Series names from `metrics-scrape --format json` (a running sandbox's /metrics)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(rel(path), f"cannot read the metrics-scrape output: {e}")
        return None
    fams = doc.get("families") or {}
    series = doc.get("series") or []
    if not fams or not series:
        fail(rel(path), "metrics-scrape found no metric families")
        return None
    for who in ("arcfed-coordinator", "arcfed-agent"):
        if not any(who in (f.get("exporters") or []) for f in fams.values()):
            fail(rel(path), f"metrics-scrape got no metric family from {who}")
    by_family = {}
    for fam, f in fams.items():
        for e in f.get("exporters") or []:
            by_family.setdefault(fam, set()).add(e)
    out: dict[str, str] = {}
    for n in series:
        fam = next((f for f in (n, *(n[: -len(x)] for x in ("_total", "_bucket", "_sum", "_count", "_created", "_info")
                                     if n.endswith(x))) if f in by_family), None)
        out[n] = " and ".join(sorted(by_family.get(fam, {"a sandbox binary"}))) + " (scraped)"
    for n in sorted(set(KNOWN_UNEXPORTED) & set(out)):
        print(f"WARN {n} is now scraped: remove it from KNOWN_UNEXPORTED in {rel(Path(__file__))}")
    for m in doc.get("missing_job_series") or []:
        print(f"WARN metrics-scrape: no sample of {m} in the sandbox run (jobs did not complete in time)")
    print(f"   scraped: {', '.join(doc.get('endpoints') or [])}")
    return out


def check_scrape_against_source(scraped: dict[str, str], source: dict[str, str]) -> None:
    """Names the source extractor finds that no binary exports: the extractor (or a
    registration) is wrong; informational, the scrape is the truth."""
    missing = sorted(n for n in source if n not in scraped and n not in ALLOWED_UNSCRAPED)
    if missing:
        print(f"   note: the Rust source registers {len(missing)} series the sandbox did not expose (label "
              f"families without a sample are not exposed; or the extractor is wrong): {' '.join(missing)}")


def exported_metrics(strict: bool = True) -> dict[str, str]:
    """Series names the Rust source registers; `strict`: an extractor miss is a failure (it is
    when these names are the check's truth, the fallback), else a warning."""
    names: dict[str, str] = {}

    def problem(where: str, msg: str) -> None:
        if strict:
            fail(where, msg)
        else:
            print(f"WARN {where}: {msg}")

    coord = ROOT / "coordinator" / "src" / "server" / "metrics.rs"
    c = rust_metrics(coord)
    if not c:
        problem(rel(coord), "no registered metrics found; the extractor no longer understands this file")
    for n, t in c.items():
        for e in _exposed(n, t):
            names[e] = f"arcfed-coordinator ({rel(coord)})"
    agent = ROOT / "agent" / "src" / "metrics.rs"
    if agent.exists():
        a = rust_metrics(agent)
        if not a:
            problem(rel(agent), "no registered metrics found; the extractor no longer understands this file")
        src = f"arcfed-agent ({rel(agent)})"
    else:
        print(f"WARN {rel(agent)} does not exist yet: agent metric names come from deploy/ci/agent-metrics.contract (issue 6)")
        a = {}
        for line in (CI / "agent-metrics.contract").read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                t, n = line.split()
                a[n.removesuffix("_total") if t == "counter" else n] = t
        src = "arcfed-agent (issue 6 contract)"
    for n, t in a.items():
        for e in _exposed(n, t):
            names[e] = src
    return names


def promql_metric_names(expr: str) -> list[str | None]:
    import promql_parser

    names: list[str | None] = []

    def visit(n):
        if isinstance(n, promql_parser.VectorSelector):
            names.append(n.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


# Set by main: the series the Rust source registers, for the ALLOWED_UNSCRAPED check.
SOURCE_METRICS: dict[str, str] = {}


def check_query(expr: str, where: str, exported: dict[str, str]) -> None:
    # Grafana's macros and variables, replaced by values PromQL accepts.
    q = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    q = re.sub(r"\$\{?\w+\}?", "x", q)
    try:
        names = promql_metric_names(q)
    except Exception as e:  # noqa: BLE001
        fail(where, f"PromQL does not parse: {e}: {expr}")
        return
    for n in names:
        if not n:
            fail(where, f"selector without a metric name (cannot be checked): {expr}")
        elif n in exported or n in EXTERNAL_METRICS:
            ok()
        elif n in ALLOWED_UNSCRAPED and n in SOURCE_METRICS:
            print(f"WARN {where}: {n} was not scraped but is allowed: {ALLOWED_UNSCRAPED[n]}")
            ok()
        else:
            fail(where, f"metric {n} is not exported by arcfed-coordinator or arcfed-agent: {expr}")


def github_anchors(md: Path) -> set[str]:
    anchors = set()
    for line in md.read_text().splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            t = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(t)
    return anchors


def check_rules(renders: dict[Path, list[dict]], exported: dict[str, str]) -> None:
    import promql_parser

    anchors = github_anchors(DEPLOY / "README.md")
    objs = renders.get(DEPLOY / "observability", [])
    rules = [o for o in objs if o["kind"] == "PrometheusRule"]
    if not rules:
        fail("deploy/observability", "no PrometheusRule rendered")
    seen = set()
    wanted = {"ArcfedHolderLost", "ArcfedConflicts409Rising", "ArcfedFallbackActive", "ArcfedQuorumDegraded",
              "ArcfedCertificateExpirySoon", "ArcfedSessionChurn"}
    for pr in rules:
        for g in pr["spec"]["groups"]:
            for r in g["rules"]:
                name = r.get("alert") or r.get("record")
                w = f"deploy/observability {objname(pr)} group {g['name']} rule {name}"
                if name in seen:
                    fail(w, "duplicate rule name")
                seen.add(name)
                check_query(r["expr"], w, exported)
                if "for" in r:
                    try:
                        promql_parser.parse_duration(r["for"])
                    except Exception as e:  # noqa: BLE001
                        fail(w, f"bad `for` duration {r['for']!r}: {e}")
                if "alert" in r:
                    sev = r.get("labels", {}).get("severity")
                    if sev not in ("critical", "warning", "info"):
                        fail(w, f"severity label must be critical|warning|info, is {sev!r}")
                    ann = r.get("annotations", {})
                    for k in ("summary", "description", "runbook_url"):
                        if not ann.get(k):
                            fail(w, f"annotation {k} missing")
                    url = ann.get("runbook_url", "")
                    if "/deploy/README.md#" not in url:
                        fail(w, f"runbook_url must point into deploy/README.md: {url}")
                    elif url.split("#", 1)[1] not in anchors:
                        fail(w, f"runbook anchor #{url.split('#', 1)[1]} is not a heading of deploy/README.md")
                    for t in re.findall(r"\{\{(.*?)\}\}", " ".join(ann.values())):
                        if not re.match(r"^\s*\$(value|labels\.\w+)\s*$", t):
                            fail(w, f"unexpected template {{{{{t}}}}}")
    for a in sorted(wanted - seen):
        fail("deploy/observability", f"alert {a} is missing")
    ok()


def check_dashboard(exported: dict[str, str]) -> None:
    f = DEPLOY / "observability" / "grafana" / "arcfed.json"
    d = json.loads(f.read_text())
    ids = set()
    n = 0
    for p in d.get("panels", []):
        w = f"{rel(f)} panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            fail(w, "duplicate panel id")
        ids.add(p.get("id"))
        if "gridPos" not in p:
            fail(w, "no gridPos")
        for t in p.get("targets", []):
            n += 1
            check_query(t["expr"], w, exported)
    if n == 0:
        fail(rel(f), "no queries")
    if not d.get("uid") or not d.get("title"):
        fail(rel(f), "dashboard needs uid and title")


# ---------------------------------------------------------------- flags table


def parse_help(text: str) -> list[tuple[str, str, str, str]]:
    """(flag, env, default, help) rows from clap's long --help."""
    rows = []
    blocks = re.split(r"\n(?=\s{2,6}(?:-\w, )?--[\w-])", text)
    for b in blocks:
        m = re.match(r"\s*(?:-\w, )?(--[\w-]+)(?: <([^>]+)>)?", b)
        if not m or m.group(1) in ("--help", "--version"):
            continue
        env = re.search(r"\[env: (\w+)=", b)
        dflt = re.search(r"\[default: ([^\]]*)\]", b)
        body = " ".join(l.strip() for l in b.splitlines()[1:] if l.strip() and not l.strip().startswith("["))
        body = re.sub(r"Possible values:.*", "", body).strip()
        first = re.split(r"(?<=\.)\s+(?=[A-Z$])", body, 1)[0] if body else ""
        rows.append((m.group(1) + (f" <{m.group(2)}>" if m.group(2) else ""), env.group(1) if env else "",
                     dflt.group(1) if dflt else "", first.replace("|", "\\|")))
    return rows


def flags_tables(bindir: Path) -> tuple[str | None, list[str]]:
    cmds = [("arcfed-coordinator", ["arcfed-coordinator"]), ("arcfed-agent", ["arcfed-agent"]),
            ("arcfedctl", ["arcfedctl"]), ("arcfedctl certs issue", ["arcfedctl", "certs", "issue"])]
    out, missing = [], []
    for title, argv in cmds:
        exe = bindir / argv[0]
        if not exe.exists():
            missing.append(title)
            continue
        r = subprocess.run([str(exe), *argv[1:], "--help"], capture_output=True, text=True, timeout=30)
        rows = parse_help(r.stdout) if r.returncode == 0 else []
        if not rows:
            missing.append(title)
            continue
        out.append(f"**`{title}`**\n\n| flag | env | default | meaning |\n|---|---|---|---|")
        for flag, env, dflt, h in rows:
            out.append(f"| `{flag}` | {f'`{env}`' if env else ''} | {f'`{dflt}`' if dflt else ''} | {h} |")
        out.append("")
    return ("\n".join(out).rstrip() + "\n") if out else None, missing


BEGIN, END = "<!-- flags:begin (generated by deploy/ci/validate.py --write-flags) -->", "<!-- flags:end -->"


def check_flags(bindir: Path | None, write: bool) -> None:
    readme = DEPLOY / "README.md"
    if bindir is None:
        print("WARN no built binaries found (set ARCFED_BIN_DIR): the README's flag tables are not compared")
        return
    table, missing = flags_tables(bindir)
    for m in missing:
        print(f"WARN {m}: no binary or no --help output in {bindir}; its flag table is not checked")
    if table is None:
        return
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        fail(rel(readme), "flag table markers are missing")
        return
    head, rest = text.split(BEGIN, 1)
    current, tail = rest.split(END, 1)
    if write:
        readme.write_text(head + BEGIN + "\n" + table + END + tail)
        print(f"wrote the flag tables into {rel(readme)}")
    elif current.strip() != table.strip():
        if os.environ.get("ARCFED_FLAGS_DRIFT") == "warn":
            print(f"WARN {rel(readme)}: the flag tables differ from --help (ARCFED_FLAGS_DRIFT=warn)")
            return
        fail(rel(readme), "the configuration table differs from the binaries' --help; run "
             "`python3 deploy/ci/validate.py --write-flags` (with ARCFED_BIN_DIR) and commit")
    else:
        ok()


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubectl", default="kubectl")
    ap.add_argument("--crds", default=str(ROOT.parent / "shared" / "reference" / "crds"))
    ap.add_argument("--bin-dir", default=os.environ.get("ARCFED_BIN_DIR"))
    ap.add_argument("--write-flags", action="store_true")
    ap.add_argument("--scraped", help="JSON of `metrics-scrape --format json` (the binaries' real /metrics)")
    args = ap.parse_args()

    bindir = Path(args.bin_dir) if args.bin_dir else None
    global AGENT_ENVS
    if bindir and (bindir / "arcfed-agent").exists():
        r = subprocess.run([str(bindir / "arcfed-agent"), "--help"], capture_output=True, text=True, timeout=30)
        envs = {e for _, e, _, _ in parse_help(r.stdout) if e}
        AGENT_ENVS = envs or None
    if args.write_flags:
        check_flags(bindir, True)
        return 1 if failures else 0

    print("== kustomize: render every kustomization")
    check_every_manifest_in_a_kustomization()
    renders: dict[Path, list[dict]] = {}
    for d in kustomizations():
        objs = render(args.kubectl, d)
        if objs is not None:
            renders[d] = objs
            print(f"   {rel(d)}: {len(objs)} objects")

    print("== schemas: Kubernetes OpenAPI (kubernetes-validate), ARC CRDs, structural CRD schemas")
    schemas = Schemas(Path(args.crds))
    for d, objs in renders.items():
        for o in objs:
            schemas.check(o, f"{rel(d)} {objname(o)}")

    print("== semantics: voters, peers, certificates, env references")
    for d, objs in renders.items():
        check_render_semantics(d, objs)

    print("== ARC: chart values, listenerTemplate, per-region scale sets, agent settings, listener config")
    check_arc(args.kubectl, schemas, renders)
    check_listener_config()

    print("== admission: CEL on sample requests")
    check_admission(renders)

    global SOURCE_METRICS
    SOURCE_METRICS = exported_metrics(strict=not args.scraped)
    if args.scraped:
        print("== metrics: alert and dashboard queries against the metrics the binaries export "
              "(scraped from a running sandbox)")
        exported = scraped_metrics(Path(args.scraped)) or {}
        if exported:
            check_scrape_against_source(exported, SOURCE_METRICS)
    else:
        print("== metrics: alert and dashboard queries against metric names in the Rust source")
        print("WARN FALLBACK: no metrics-scrape output (--scraped; binaries not built): metric names "
              "come from grepping coordinator/src/server/metrics.rs and agent/src/metrics.rs, not from "
              "the running binaries")
        exported = SOURCE_METRICS
    print(f"   {len(exported)} exported series names")
    check_rules(renders, exported)
    check_dashboard(exported)

    print("== flags: README configuration tables against --help")
    check_flags(bindir, False)

    print(f"{passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
