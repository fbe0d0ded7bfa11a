//! The kube runner backend against a `tower-test` mock of the API server: exact methods, paths,
//! content types and bodies, and every PATCH body checked against ARC's CRD schema.
//!
//! The schema extracts in `tests/fixtures/*.schema.json` are generated from ARC's CRD schemas
//! kept in the repository (`deploy/ci/crds/`, themselves generated from ARC's CRDs by
//! `deploy/ci/gen-crds.py`) by [`extract`] below; `crd_fixtures_match_arc_crds` checks that
//! they still match. Regenerate them with
//! `ARCFED_UPDATE_CRD_FIXTURES=1 cargo nextest run -p arcfed-agent --test kube_adapter -E 'test(crd_fixtures)'`.

use arcfed_agent::kube::{JobStarted, KubeRunners, SESSION_ANNOTATION, replicas_patch};
use arcfed_agent::scaler::{Patch, Scaler};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NS: &str = "arc-runners";
const ERS: &str = "ci-a-7x9kq";
const ERS_PATH: &str = "/apis/actions.github.com/v1alpha1/namespaces/arc-runners/ephemeralrunnersets/ci-a-7x9kq";
const MERGE: &str = "application/merge-patch+json";

// ------------------------------------------------------------------ CRD schema extracts

/// One CRD whose schema extract is committed: (fixture name, CRD file, property paths elided).
/// Elided subtrees are ones arcfed never writes (pod templates); they become
/// `x-kubernetes-preserve-unknown-fields` objects marked `x-arcfed-elided`.
const EXTRACTS: &[(&str, &str, &[&[&str]])] = &[
    (
        "ephemeralrunnersets",
        "actions.github.com_ephemeralrunnersets.yaml",
        &[&["spec", "ephemeralRunnerSpec"], &["spec", "ephemeralRunnerMetadata"]],
    ),
    ("ephemeralrunners", "actions.github.com_ephemeralrunners.yaml", &[&["spec"]]),
];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn crds_dir() -> PathBuf {
    // The workspace root is the agent crate's parent.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ci/crds")
}

/// Drops `description`s from a schema node and its sub-schemas (not from property *names*).
fn strip_descriptions(node: &mut Value) {
    let Some(obj) = node.as_object_mut() else { return };
    obj.remove("description");
    if let Some(Value::Object(props)) = obj.get_mut("properties") {
        props.values_mut().for_each(strip_descriptions);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub) = obj.get_mut(key) {
            strip_descriptions(sub);
        }
    }
}

/// The fixture for one CRD: its v1alpha1 `openAPIV3Schema` (descriptions dropped, pod templates
/// elided) and its subresources.
fn extract(file: &str, crd_yaml: &str, elide: &[&[&str]]) -> Value {
    let crd: Value = serde_yaml::from_str(crd_yaml).expect("CRD YAML");
    let version = crd["spec"]["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == "v1alpha1"))
        .expect("version v1alpha1");
    let mut schema = version["schema"]["openAPIV3Schema"].clone();
    for path in elide {
        let mut node = &mut schema;
        for p in *path {
            node = &mut node["properties"][*p];
        }
        assert!(node.is_object(), "{file}: no property {path:?}");
        let ty = node["type"].clone();
        *node = json!({"type": ty, "x-kubernetes-preserve-unknown-fields": true, "x-arcfed-elided": true});
    }
    strip_descriptions(&mut schema);
    json!({
        "generatedFrom": format!("deploy/ci/crds/{file}"),
        "crd": crd["metadata"]["name"],
        "group": crd["spec"]["group"],
        "version": "v1alpha1",
        "subresources": version["subresources"],
        "openAPIV3Schema": schema,
    })
}

fn fixture(name: &str) -> Value {
    let path = fixtures_dir().join(format!("{name}.schema.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

fn schema(name: &str) -> Value {
    fixture(name)["openAPIV3Schema"].clone()
}

#[test]
fn crd_fixtures_match_arc_crds() {
    let update = std::env::var_os("ARCFED_UPDATE_CRD_FIXTURES").is_some();
    let crds = crds_dir();
    for (name, file, elide) in EXTRACTS {
        let source = crds.join(file);
        if source.exists() {
            let yaml = std::fs::read_to_string(&source).expect("read CRD");
            let fresh = extract(file, &yaml, elide);
            let path = fixtures_dir().join(format!("{name}.schema.json"));
            if update {
                std::fs::create_dir_all(fixtures_dir()).expect("mkdir fixtures");
                let text = serde_json::to_string_pretty(&fresh).expect("json") + "\n";
                std::fs::write(&path, text).expect("write fixture");
            }
            assert_eq!(fixture(name), fresh, "{} is stale: regenerate it (see this file's header)", path.display());
        } else {
            panic!("{} is missing: the repository keeps ARC's CRD schemas there", source.display());
        }
        // Whatever the source, the committed extract has what the adapter relies on.
        let f = fixture(name);
        assert_eq!(f["group"], "actions.github.com");
        assert!(f["subresources"]["status"].is_object(), "{name}: the status subresource exists");
    }
    let ers = schema("ephemeralrunnersets");
    assert_eq!(ers["properties"]["spec"]["required"], json!(["patchID"]));
    assert_eq!(ers["properties"]["spec"]["properties"]["replicas"]["type"], "integer");
    let er = schema("ephemeralrunners");
    assert_eq!(er["properties"]["status"]["properties"]["jobRequestId"]["format"], "int64");
}

// ------------------------------------------------------------------ structural validator

/// The ObjectMeta fields a patch may touch. The CRD says only `metadata: {type: object}`: the API
/// server validates metadata as ObjectMeta itself.
fn object_meta_schema() -> Value {
    let map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    json!({"type": "object", "properties": {
        "name": {"type": "string"}, "namespace": {"type": "string"}, "uid": {"type": "string"},
        "resourceVersion": {"type": "string"}, "generation": {"type": "integer", "format": "int64"},
        "creationTimestamp": {"type": "string"}, "annotations": map.clone(), "labels": map,
    }})
}

/// Validates `v` against the openAPIV3Schema subset ARC's CRDs use: type, properties, required,
/// integer format, nullable, items, additionalProperties and x-kubernetes-preserve-unknown-fields.
/// Unknown fields are errors: the API server would silently prune them.
fn validate(schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != true {
            errs.push(format!("{at}: null where the schema is not nullable"));
        }
        return;
    }
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    match schema["type"].as_str() {
        Some("object") => {
            let Some(obj) = v.as_object() else { return errs.push(format!("{at}: {v} is not an object")) };
            let props = schema["properties"].as_object();
            for (k, val) in obj {
                let here = format!("{at}.{k}");
                if at.is_empty() && k == "metadata" {
                    validate(&object_meta_schema(), val, &here, errs);
                } else if let Some(p) = props.and_then(|p| p.get(k)) {
                    validate(p, val, &here, errs);
                } else if schema["additionalProperties"].is_object() {
                    validate(&schema["additionalProperties"], val, &here, errs);
                } else if !(preserve || schema["additionalProperties"] == true) {
                    errs.push(format!("{here}: unknown field (the API server would prune it)"));
                }
            }
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap_or_default();
                if obj.get(r).is_none_or(Value::is_null) {
                    errs.push(format!("{at}.{r}: required"));
                }
            }
        }
        Some("array") => match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    validate(&schema["items"], item, &format!("{at}[{i}]"), errs);
                }
            }
            None => errs.push(format!("{at}: {v} is not an array")),
        },
        Some("integer") => {
            let ok = match schema["format"].as_str() {
                Some("int32") => v.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
                _ => v.as_i64().is_some(),
            };
            if !ok {
                errs.push(format!("{at}: {v} is not an integer of format {}", schema["format"]));
            }
        }
        Some("string") if !v.is_string() => errs.push(format!("{at}: {v} is not a string")),
        Some("boolean") if !v.is_boolean() => errs.push(format!("{at}: {v} is not a boolean")),
        Some("number") if !v.is_number() => errs.push(format!("{at}: {v} is not a number")),
        Some("string" | "boolean" | "number") => {}
        None if preserve => {}
        other => errs.push(format!("{at}: schema type {other:?} not understood by this validator")),
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else { return *target = patch.clone() };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// A merge patch is valid when the object it produces is: nulls delete (so a null on a required
/// field fails), values must have the schema's types, and unknown fields are refused.
fn patch_errors(schema_name: &str, base: &Value, patch: &Value) -> Vec<String> {
    let mut merged = base.clone();
    merge(&mut merged, patch);
    let mut errs = Vec::new();
    validate(&schema(schema_name), &merged, "", &mut errs);
    errs
}

fn ers_object() -> Value {
    json!({
        "apiVersion": "actions.github.com/v1alpha1", "kind": "EphemeralRunnerSet",
        "metadata": {"name": ERS, "namespace": NS, "resourceVersion": "1"},
        "spec": {"patchID": 0, "replicas": 1, "ephemeralRunnerSpec": {"githubConfigUrl": "https://github.com/o"}},
    })
}

fn runner_object(name: &str) -> Value {
    json!({
        "apiVersion": "actions.github.com/v1alpha1", "kind": "EphemeralRunner",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
        "spec": {"githubConfigUrl": "https://github.com/o", "githubConfigSecret": "s", "runnerScaleSetId": 7},
        "status": {"phase": "Running", "ready": true, "runnerId": 12, "runnerName": name},
    })
}

#[test]
fn the_validator_refuses_what_the_api_server_would() {
    let base = ers_object();
    assert!(patch_errors("ephemeralrunnersets", &base, &json!({"spec": {"patchID": 3, "replicas": 2}})).is_empty());
    for bad in [
        json!({"spec": {"patchID": null, "replicas": 2}}),
        json!({"spec": {"patchID": 1, "replicas": "2"}}),
        json!({"spec": {"patchID": 1, "replicas": 1.5}}),
        json!({"spec": {"patchID": 1, "replica": 2}}),
        json!({"spec": {"patchID": 1}, "metadata": {"annotations": {"a": 1}}}),
    ] {
        assert!(!patch_errors("ephemeralrunnersets", &base, &bad).is_empty(), "accepted {bad}");
    }
    let er = runner_object("r");
    for bad in [json!({"status": {"jobRequestId": "5"}}), json!({"status": {"jobId": 5}})] {
        assert!(!patch_errors("ephemeralrunners", &er, &bad).is_empty(), "accepted {bad}");
    }
}

// ------------------------------------------------------------------ a fake API server

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: String,
    accept: String,
    body: Value,
}

/// Objects by path; PATCH merges into them and returns the result, as the API server does.
#[derive(Clone, Default)]
struct FakeApi {
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
    forbidden: Arc<Mutex<Vec<String>>>,
    fail_500: Arc<Mutex<Vec<String>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeApi {
    fn with(objects: &[(&str, Value)]) -> FakeApi {
        let api = FakeApi::default();
        for (p, o) in objects {
            api.objects.lock().unwrap().insert(p.to_string(), o.clone());
        }
        api
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn object(&self, path: &str) -> Value {
        self.objects.lock().unwrap()[path].clone()
    }

    /// A client whose requests this fake answers (tower-test's mock service).
    fn client(&self) -> kube::Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((req, reply)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.expect("request body");
                let body: Value = serde_json::from_slice(&bytes).expect("request body is JSON");
                let header = |h: http::header::HeaderName| {
                    parts.headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
                };
                let path = parts.uri.path().to_string();
                api.seen.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path: path.clone(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    content_type: header(http::header::CONTENT_TYPE),
                    accept: header(http::header::ACCEPT),
                    body: body.clone(),
                });
                let object_path = path.strip_suffix("/status").unwrap_or(&path).to_string();
                let (code, out) = if api.forbidden.lock().unwrap().contains(&path) {
                    (
                        403,
                        status(
                            403,
                            "Forbidden",
                            "ephemeralrunnersets.actions.github.com is forbidden: User cannot patch",
                        ),
                    )
                } else if api.fail_500.lock().unwrap().contains(&path) {
                    (500, status(500, "InternalError", "etcd is sad"))
                } else if parts.method != http::Method::PATCH {
                    (405, status(405, "MethodNotAllowed", "the listener's Role only has patch"))
                } else {
                    match api.objects.lock().unwrap().get_mut(&object_path) {
                        Some(obj) => {
                            merge(obj, &body);
                            (200, obj.clone())
                        }
                        None => (404, status(404, "NotFound", "not found")),
                    }
                };
                let resp = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&out).expect("json")))
                    .expect("response");
                reply.send_response(resp);
            }
        });
        kube::Client::new(svc, NS)
    }
}

fn runner_path(name: &str) -> String {
    format!("/apis/actions.github.com/v1alpha1/namespaces/{NS}/ephemeralrunners/{name}")
}

fn assert_ers_patch(s: &Seen) {
    assert_eq!(s.method, "PATCH");
    assert_eq!(s.path, ERS_PATH);
    assert_eq!(s.query, "");
    assert_eq!(s.content_type, MERGE);
    assert_eq!(s.accept, "application/json");
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn replicas_n_and_zero_are_arcs_exact_merge_patches() {
    let api = FakeApi::with(&[(ERS_PATH, ers_object())]);
    let k = KubeRunners::with_client(api.client(), NS, ERS);
    k.patch_replicas(Patch { replicas: 4, patch_id: 7 }).await.expect("patch N");
    k.patch_replicas(Patch { replicas: 0, patch_id: 0 }).await.expect("patch 0");
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    seen.iter().for_each(assert_ers_patch);
    assert_eq!(seen[0].body, json!({"spec": {"patchID": 7, "replicas": 4}}));
    // ARC's omitempty form for 0 (reference §5.4): null removes the field; the controller reads 0.
    assert_eq!(seen[1].body, json!({"spec": {"patchID": 0, "replicas": null}}));
    for s in &seen {
        assert_eq!(patch_errors("ephemeralrunnersets", &ers_object(), &s.body), Vec::<String>::new(), "{}", s.body);
    }
    let spec = &api.object(ERS_PATH)["spec"];
    assert_eq!(spec["patchID"], 0);
    assert!(spec.get("replicas").is_none(), "replicas removed: {spec}");
    assert!(spec.get("ephemeralRunnerSpec").is_some(), "a merge patch leaves the runner spec alone");
}

/// (assigned runners, dirty, force_zero) pushed to the scaler.
type Push = (i64, bool, bool);
/// (replicas, patchID) expected in the patch.
type Expect = (i64, i64);

/// Steady load, a rebalance, back to min (ARC's force-state 0), then a drain with force-zero.
#[tokio::test]
async fn patch_ids_over_a_scripted_run_follow_arcs_patch_seq() {
    let api = FakeApi::with(&[(ERS_PATH, ers_object())]);
    let k = KubeRunners::with_client(api.client(), NS, ERS);
    let mut scaler = Scaler::new(1, 10);
    // (assigned runners, dirty, force_zero) → expected (replicas, patchID)
    let script: &[(Push, Expect)] = &[
        ((3, false, false), (3, 0)), // first patch: patchSeq −1 → 0
        ((3, true, false), (3, 1)),  // steady load: a fresh id on every push
        ((3, true, false), (3, 2)),
        ((3, false, false), (3, 3)), // unchanged but above min: still fresh, so finished runners are replaced
        ((6, false, false), (6, 4)), // rebalance up
        ((2, true, false), (2, 5)),  // rebalance down: deferred scale-down (patchID > 0)
        ((1, false, false), (1, 6)), // at min, changed
        ((1, false, false), (1, 0)), // at min, unchanged, not dirty: force state
        ((1, true, false), (1, 8)),  // dirty at min: fresh
        ((4, false, true), (0, 0)),  // drain: force zero
    ];
    for ((runners, dirty, force), _) in script {
        k.patch_replicas(scaler.on_assignment(*runners, *dirty, *force)).await.expect("patch");
    }
    let seen = api.seen();
    assert_eq!(seen.len(), script.len());
    let mut state = ers_object();
    for (s, (_, (replicas, patch_id))) in seen.iter().zip(script) {
        assert_ers_patch(s);
        assert_eq!(s.body, replicas_patch(Patch { replicas: *replicas, patch_id: *patch_id }));
        assert_eq!(s.body["spec"]["patchID"], *patch_id);
        assert_eq!(patch_errors("ephemeralrunnersets", &state, &s.body), Vec::<String>::new(), "{}", s.body);
        merge(&mut state, &s.body);
    }
    assert_eq!(api.object(ERS_PATH), state);
}

#[tokio::test]
async fn job_started_patches_the_runner_status_and_a_gone_runner_is_ok() {
    let runner = format!("{ERS}-runner-b2c4d");
    let api = FakeApi::with(&[(&runner_path(&runner), runner_object(&runner))]);
    let k = KubeRunners::with_client(api.client(), NS, ERS);
    let job = JobStarted {
        job_request_id: 1234,
        repository: "octo/app".into(),
        job_id: "5b3c0e2a-1".into(),
        workflow_run_id: 987654321,
        job_workflow_ref: "octo/app/.github/workflows/ci.yml@refs/heads/main".into(),
        job_display_name: "build (linux)".into(),
    };
    k.patch_job_started(&runner, &job).await.expect("status patch");
    k.patch_job_started(&format!("{ERS}-runner-zzzzz"), &job).await.expect("404 means the runner is gone: Ok");
    let no_request_id = JobStarted { job_request_id: 0, ..job.clone() };
    k.patch_job_started(&runner, &no_request_id).await.expect("status patch");
    let seen = api.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].method, "PATCH");
    assert_eq!(seen[0].path, format!("{}/status", runner_path(&runner)));
    assert_eq!(seen[0].content_type, MERGE);
    assert_eq!(
        seen[0].body,
        json!({"status": {
            "jobRequestId": 1234, "jobRepositoryName": "octo/app", "jobId": "5b3c0e2a-1",
            "workflowRunId": 987654321, "jobWorkflowRef": "octo/app/.github/workflows/ci.yml@refs/heads/main",
            "jobDisplayName": "build (linux)",
        }})
    );
    assert_eq!(seen[1].path, format!("{}/status", runner_path(&format!("{ERS}-runner-zzzzz"))));
    assert!(seen[2].body["status"].get("jobRequestId").is_none(), "0 is omitted, as ARC: {}", seen[2].body);
    for s in [&seen[0], &seen[2]] {
        assert_eq!(patch_errors("ephemeralrunners", &runner_object(&runner), &s.body), Vec::<String>::new());
    }
    assert_eq!(api.object(&runner_path(&runner))["status"]["jobId"], "5b3c0e2a-1");

    api.fail_500.lock().unwrap().push(format!("{}/status", runner_path(&runner)));
    let err = k.patch_job_started(&runner, &job).await.expect_err("500 is an error");
    assert!(err.to_string().contains(&format!("ephemeralrunners/{runner}/status")), "{err}");
}

#[tokio::test]
async fn session_record_is_read_and_written_with_patch_only() {
    let api = FakeApi::with(&[(ERS_PATH, ers_object())]);
    let k = KubeRunners::with_client(api.client(), NS, ERS);
    assert_eq!(k.session_record().await.expect("read"), None);
    k.set_session_record(Some("6d2f1c0e-aaaa-4bbb-8ccc-123456789abc")).await.expect("write");
    assert_eq!(k.session_record().await.expect("read").as_deref(), Some("6d2f1c0e-aaaa-4bbb-8ccc-123456789abc"));
    k.set_session_record(None).await.expect("clear");
    assert_eq!(k.session_record().await.expect("read"), None);
    let seen = api.seen();
    assert_eq!(seen.len(), 5);
    seen.iter().for_each(assert_ers_patch);
    assert_eq!(seen[0].body, json!({}), "a no-op merge patch returns the object without the get verb");
    assert_eq!(
        seen[1].body,
        json!({"metadata": {"annotations": {SESSION_ANNOTATION: "6d2f1c0e-aaaa-4bbb-8ccc-123456789abc"}}})
    );
    assert_eq!(seen[3].body, json!({"metadata": {"annotations": {SESSION_ANNOTATION: null}}}));
    for s in &seen {
        assert_eq!(patch_errors("ephemeralrunnersets", &ers_object(), &s.body), Vec::<String>::new(), "{}", s.body);
    }
    // The record did not disturb the spec.
    assert_eq!(api.object(ERS_PATH)["spec"], ers_object()["spec"]);
}

#[tokio::test]
async fn forbidden_is_explained_as_missing_rbac_and_names_the_object() {
    let api = FakeApi::with(&[(ERS_PATH, ers_object())]);
    api.forbidden.lock().unwrap().push(ERS_PATH.to_string());
    let k = KubeRunners::with_client(api.client(), NS, ERS);
    let err = k.patch_replicas(Patch { replicas: 2, patch_id: 1 }).await.expect_err("403");
    let msg = err.to_string();
    assert!(msg.contains("403") && msg.contains("Role") && msg.contains("patch"), "{msg}");
    assert!(msg.contains(&format!("ephemeralrunnersets/{ERS}")) && msg.contains(NS), "{msg}");
    let missing = KubeRunners::with_client(api.client(), NS, "other-ers");
    let err = tokio::time::timeout(Duration::from_secs(30), missing.session_record())
        .await
        .expect("answered")
        .expect_err("404 on the ERS itself is an error");
    assert!(err.is_not_found(), "{err}");
}
