//! Hostile input, as property tests (proptest): the webhook body parser, the output path mapper
//! and the submit validator get `..`, `%2e%2e`, absolute paths under other mounts, very long
//! names, NUL bytes, non-UTF-8, deep nesting and 10 MB bodies. None may panic, accept a path
//! outside the job's output folder, or change anything when it refuses.
//!
//! The routers run against in-memory ports (`fakes.rs`), so each case takes microseconds.
//! CI runs proptest's default 256 cases per property; more with e.g.
//! `PROPTEST_CASES=20000 cargo test -p gateway-tests --test hostile`.
mod fakes;

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use base64::Engine as _;
use gateway::domain::job::{ErrorCode, InputRef, Job, JobState, JobTiming, NewJob};
use gateway::domain::paths::{file_name, VolumeLayout, MAX_FILE_NAME_BYTES, MAX_KEY_BYTES};
use gateway::domain::report::volume_output_keys;
use gateway::domain::workflow::ValidatedParams;
use gateway::ports::RunPodStatus;
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{json, Value};
use tower::ServiceExt;

use fakes::*;

const JOB: &str = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
const RUNPOD_ID: &str = "8d5c7a1e-4b2f-4c7e-9a51-3f0e6d2b9c10-e1";
const UPLOAD: &str = "0190a1b2-0000-7000-8000-00000000aaaa";
const BOBS_UPLOAD: &str = "0190a1b2-0000-7000-8000-00000000bbbb";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

async fn call(router: axum::Router, request: Request<Body>) -> (StatusCode, Vec<u8>) {
    let response = router.oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body.to_vec())
}

fn png() -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::new(4, 3)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn layout() -> VolumeLayout {
    VolumeLayout::new(
        vec!["/runpod-volume".into(), "/workspace".into()],
        gateway::domain::keys::VolumeRoot::new(testkit::VOLUME_ROOT).unwrap(),
    )
}

/// The job's outputs folder on the volume: the only place its outputs may come from.
fn job_folder() -> String {
    layout().root().outputs(JOB)
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// One path segment, hostile or not.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(JOB.to_string()),
        4 => Just("outputs".to_string()),
        3 => "[a-z0-9_-]{1,12}(\\.png)?",
        1 => Just("..".to_string()),
        1 => Just(".".to_string()),
        1 => Just(String::new()),
        1 => Just("%2e%2e".to_string()),
        1 => Just("%2E%2e%2f".to_string()),
        1 => Just("%252e%252e".to_string()),
        1 => Just("..\\..".to_string()),
        1 => Just("a\0b.png".to_string()),
        1 => Just("other-job".to_string()),
        1 => Just("inputs".to_string()),
        1 => Just("\u{202e}gnp.exe".to_string()),
        1 => "[a-z]{250,300}".prop_map(|s| s),
        1 => "\\PC{1,16}",
        1 => proptest::collection::vec(any::<u8>(), 1..24)
            .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
    ]
}

/// A path a worker could report: under a real mount, another mount, or none.
fn worker_path() -> impl Strategy<Value = String> {
    let mount = prop_oneof![
        6 => Just("/runpod-volume"),
        3 => Just("/workspace"),
        1 => Just("/runpod-volume-evil"),
        1 => Just("/workspace2"),
        1 => Just("/etc"),
        1 => Just("/proc/self"),
        1 => Just("/mnt/other-volume"),
        1 => Just(""),
        1 => Just("//runpod-volume"),
        1 => Just("/RUNPOD-VOLUME"),
        1 => Just("runpod-volume"),
    ];
    let plain = (mount, proptest::collection::vec(segment(), 0..6))
        .prop_map(|(mount, segments)| format!("{mount}/{}", segments.join("/")));
    // Well-formed outputs of this job (most of them exist on the volume), and near misses.
    let own = prop_oneof![
        Just(format!(
            "/runpod-volume/gateway/kit/outputs/{JOB}/restore_00001_.png"
        )),
        Just(format!(
            "/workspace/gateway/kit/outputs/{JOB}/restore_00002_.png"
        )),
        Just(format!(
            "/runpod-volume/gateway/kit/outputs/{JOB}/sub/restore_00001_.png"
        )),
        Just(format!(
            "/runpod-volume/gateway/kit/outputs/{JOB}/missing.png"
        )),
        Just(format!(
            "/runpod-volume/gateway/kit/outputs/{JOB}/../{JOB}/restore_00001_.png"
        )),
        Just(format!(
            "/runpod-volume/gateway/kit/outputs/{JOB}/./restore_00001_.png"
        )),
        Just(format!(
            "/runpod-volume/gateway/kit/outputs/{JOB}//restore_00001_.png"
        )),
        Just(format!(
            "/runpod-volume/gateway/kit/outputs/{JOB}/%2e%2e/secret.txt"
        )),
        Just(format!(
            "/runpod-volume/gateway/kit/outputs/{JOB}/{}",
            "a".repeat(300)
        )),
        Just(format!(
            "/runpod-volume/gateway/kit/outputs/{JOB}/{}x.png",
            "d/".repeat(600)
        )),
        Just(format!("/runpod-volume/inputs/{JOB}/input.jpg")),
        Just(format!("/runpod-volume/gateway/kit/outputs/{JOB}0/x.png")),
        Just("/runpod-volume/gateway/kit/outputs/other-job/x.png".to_string()),
        Just("/runpod-volume/../secret.txt".to_string()),
        Just(format!("/runpod-volume/gateway/kit/outputs/{JOB}/a\0.png")),
    ];
    prop_oneof![3 => own, 2 => plain]
}

// ---------------------------------------------------------------------------------------------
// The output path mapper
// ---------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn an_accepted_path_lies_inside_the_jobs_output_folder(path in worker_path()) {
        let allowed = job_folder();
        if let Ok(key) = layout().output_key(&path, &allowed) {
            prop_assert!(key.starts_with(&allowed), "{key}");
            prop_assert!(key.len() > allowed.len());
            prop_assert!(key.len() <= MAX_KEY_BYTES);
            prop_assert!(file_name(&key).len() <= MAX_FILE_NAME_BYTES);
            prop_assert!(!key.split('/').any(|s| s.is_empty() || s == "." || s == ".."), "{key}");
            prop_assert!(!key.chars().any(|c| c.is_control() || c == '\\' || c == '%'), "{key:?}");
            // The key is the path below exactly one real mount point, nothing normalised away.
            prop_assert!(
                layout().mount_prefixes().iter().any(|m| path == format!("{m}/{key}")),
                "{path} -> {key}"
            );
        }
    }

    #[test]
    fn a_hostile_segment_anywhere_in_a_good_path_is_refused(
        depth in 0usize..3,
        at in 0usize..4,
        hostile in prop_oneof![
            Just(".."), Just("."), Just(""), Just("%2e%2e"), Just("..%2f"), Just("a\0"), Just("..\\")
        ],
    ) {
        let mut segments: Vec<String> = ["gateway", "kit", "outputs", JOB].map(String::from).into();
        segments.extend((0..depth).map(|i| format!("d{i}")));
        segments.push("restore_00001_.png".into());
        let at = at.min(segments.len());
        segments.insert(at, hostile.to_string());
        let path = format!("/runpod-volume/{}", segments.join("/"));
        prop_assert!(layout().output_key(&path, &job_folder()).is_err(), "{path:?}");
    }

    #[test]
    fn a_workers_output_list_maps_only_to_its_own_folder(
        files in proptest::collection::vec(worker_path(), 0..8),
        shape in 0u8..4,
    ) {
        let output = match shape {
            0 => json!({"prompt_id": "p", "files": files, "file_count": files.len()}),
            1 => json!({"files": files.iter().map(|f| json!({"path": f})).collect::<Vec<_>>()}),
            2 => json!(files),
            _ => json!({"files": files, "extra": {"files": ["/runpod-volume/secret.txt"]}}),
        };
        if let Ok(keys) = volume_output_keys(Some(&output), &layout(), JOB) {
            let allowed = job_folder();
            prop_assert!(!keys.is_empty());
            prop_assert!(keys.iter().all(|k| k.starts_with(&allowed)), "{keys:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The webhook body parser (the whole receiver, through the router)
// ---------------------------------------------------------------------------------------------

fn submitted_job() -> Job {
    let mut job = Job::new(
        NewJob {
            id: JOB.into(),
            owner: "alice".into(),
            workflow: "restore".into(),
            workflow_version: "1".into(),
            params: ValidatedParams(Default::default()),
            input: InputRef {
                key: format!("inputs/alice/{JOB}/input.png"),
                content_type: "image/png".into(),
                size: 10,
                extension: "png".into(),
                source_url: None,
            },
            idempotency_key: None,
            request_digest: None,
            callback_url: None,
            callback_events: Vec::new(),
            backend: Default::default(),
            priority: Default::default(),
        },
        JobTiming {
            deadline_ms: 3_600_000,
            first_check_ms: 60_000,
            retention_secs: 86_400,
            tombstone_secs: 7 * 86_400,
            idempotency_window_secs: 86_400,
            cleanup_delay_ms: 120_000,
        },
        NOW - 10_000,
    );
    job.mark_submitted(RUNPOD_ID.into(), NOW - 5_000, NOW + 60_000)
        .unwrap();
    job
}

/// The volume: this job's outputs, and files the worker must never get copied out.
fn volume() -> MemObjects {
    MemObjects::with(&[
        (
            &format!("gateway/kit/outputs/{JOB}/restore_00001_.png"),
            b"first output",
        ),
        (
            &format!("gateway/kit/outputs/{JOB}/restore_00002_.png"),
            b"second output",
        ),
        (
            &format!("gateway/kit/outputs/{JOB}/sub/restore_00001_.png"),
            b"nested output, same name",
        ),
        (&format!("inputs/{JOB}/input.jpg"), b"the client's photo"),
        (
            "gateway/kit/outputs/other-job/x.png",
            b"someone else's result",
        ),
        ("secret.txt", b"not for workers"),
    ])
}

/// A world holding the submitted job, whose RunPod `/status` says `status`.
fn webhook_world(status: &str) -> World {
    let world = World::new(
        volume(),
        MemObjects::default(),
        RunPodStatus {
            id: Some(RUNPOD_ID.into()),
            status: Some(status.into()),
            ..RunPodStatus::default()
        },
    );
    world.store.put(submitted_job());
    world
}

/// A world holding the submitted job, whose RunPod `/status` answers `report`: what the
/// webhook acts on, whatever its body says.
fn world_where_runpod_reports(report: &serde_json::Value) -> World {
    let world = World::new(
        volume(),
        MemObjects::default(),
        serde_json::from_value(report.clone()).expect("a RunPod status"),
    );
    world.store.put(submitted_job());
    world
}

fn webhook_request(world: &World, token: Option<&str>, body: Vec<u8>) -> Request<Body> {
    let token = token.map_or_else(|| world.signer.token(JOB), str::to_string);
    Request::post(format!("/webhooks/runpod/{JOB}?token={token}"))
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

fn stored(world: &World) -> Job {
    world.store.job(JOB).unwrap()
}

fn garbage_body() -> impl Strategy<Value = Vec<u8>> {
    let status = prop_oneof![
        Just("COMPLETED"),
        Just("FAILED"),
        Just("completed"),
        Just(" COMPLETED "),
        Just("IN_PROGRESS"),
        Just("TIMED_OUT"),
        Just(""),
        Just("\u{0}"),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        "\\PC{0,256}".prop_map(String::into_bytes),
        Just(Vec::new()),
        Just(b"null".to_vec()),
        Just(b"[]".to_vec()),
        Just(b"\"\"".to_vec()),
        Just(vec![0xff, 0xfe, b'{', 0x00, b'}']),
        (0usize..20_000).prop_map(|depth| "[".repeat(depth).into_bytes()),
        (0usize..5_000).prop_map(|depth| {
            format!("{}{}", "{\"a\":".repeat(depth), "}".repeat(depth)).into_bytes()
        }),
        // Well-formed, but for another RunPod job, without an id, or with the wrong types.
        ("[a-z0-9-]{0,40}", status.clone()).prop_map(|(id, status)| {
            json!({"id": id, "status": status, "output": {"files": ["/runpod-volume/secret.txt"]}})
                .to_string()
                .into_bytes()
        }),
        status
            .clone()
            .prop_map(|status| json!({"status": status}).to_string().into_bytes()),
        Just(json!({"id": RUNPOD_ID}).to_string().into_bytes()),
        // A forged report for the job's own run, naming real files of the job.
        Just(
            json!({
                "id": RUNPOD_ID,
                "status": "COMPLETED",
                "output": {"files": [format!("/runpod-volume/gateway/kit/outputs/{JOB}/restore_00001_.png")]},
            })
            .to_string()
            .into_bytes()
        ),
        Just(
            json!({"id": RUNPOD_ID, "status": 42})
                .to_string()
                .into_bytes()
        ),
        Just(
            json!({"id": [RUNPOD_ID], "status": "COMPLETED"})
                .to_string()
                .into_bytes()
        ),
    ]
}

proptest! {
    #[test]
    fn whatever_a_webhook_body_claims_runpods_status_decides(body in garbage_body()) {
        // RunPod says the job is still queued: nothing may change, whatever the body claims.
        let world = webhook_world("IN_QUEUE");
        let before = stored(&world);
        let (status, _) = runtime().block_on(call(world.webhook(), webhook_request(&world, None, body)));
        prop_assert_eq!(status, StatusCode::OK);
        prop_assert_eq!(stored(&world), before);
        prop_assert!(world.results.keys().is_empty());
        prop_assert!(world.volume.touched().is_empty());
    }

    #[test]
    fn a_webhook_without_the_jobs_token_changes_nothing(
        token in prop_oneof![
            "[0-9a-f]{64}",
            "\\PC{0,80}".prop_map(|t| t.replace(['&', '#', '%', '+'], "")),
            Just(String::new()),
        ],
        body in garbage_body(),
    ) {
        let world = webhook_world("COMPLETED");
        prop_assume!(token != world.signer.token(JOB));
        let before = stored(&world);
        let token: String = url_escape(&token);
        let (status, _) = runtime().block_on(call(world.webhook(), webhook_request(&world, Some(&token), body)));
        prop_assert_eq!(status, StatusCode::UNAUTHORIZED);
        prop_assert_eq!(stored(&world), before);
        prop_assert!(world.runpod.calls().is_empty());
        prop_assert!(world.volume.touched().is_empty());
    }

    #[test]
    fn a_completed_report_copies_only_the_jobs_own_files(
        files in proptest::collection::vec(worker_path(), 0..5),
        echoed_input_kb in 0usize..64,
    ) {
        let body = json!({
            "id": RUNPOD_ID,
            "status": "COMPLETED",
            "delayTime": 12,
            "executionTime": 34,
            "input": {"padding": "x".repeat(echoed_input_kb * 1024)},
            "output": {"prompt_id": "p", "files": files, "file_count": files.len()},
        });
        let world = world_where_runpod_reports(&body);
        let (status, _) = runtime().block_on(call(
            world.webhook(),
            webhook_request(&world, None, body.to_string().into_bytes()),
        ));
        // The webhook hands the completed run over; finalize collects it.
        runtime().block_on(world.run_finalize());
        prop_assert_eq!(status, StatusCode::OK);
        let allowed = job_folder();
        // Nothing outside the job's output folder was even opened.
        for key in world.volume.touched() {
            prop_assert!(key.starts_with(&allowed), "opened {key}");
        }
        let job = stored(&world);
        let keys: Option<Vec<String>> = files
            .iter()
            .map(|f| layout().output_key(f, &allowed).ok())
            .collect();
        let expect_success = keys
            .as_ref()
            .is_some_and(|keys| !keys.is_empty() && keys.iter().all(|k| world.volume.get(k).is_some()));
        if expect_success {
            prop_assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
            let mut keys = keys.unwrap();
            keys.dedup();
            let mut wanted: Vec<_> = keys.iter().map(|k| world.volume.get(k).unwrap()).collect();
            let mut stored_bytes: Vec<_> = job
                .outputs
                .iter()
                .map(|o| world.results.get(&o.key).expect("output stored"))
                .collect();
            wanted.sort();
            wanted.dedup();
            stored_bytes.sort();
            prop_assert_eq!(stored_bytes, wanted, "every file, byte for byte");
        } else {
            prop_assert_eq!(job.state, JobState::Failed);
            let code = job.error.as_ref().map(|e| e.code);
            prop_assert!(
                matches!(
                    code,
                    Some(ErrorCode::InvalidOutputPath | ErrorCode::EmptyOutput | ErrorCode::OutputMissing)
                ),
                "{code:?}"
            );
            prop_assert!(world.results.keys().is_empty(), "{:?}", world.results.keys());
        }
        prop_assert_eq!(job.history.iter().filter(|e| e.to.is_terminal()).count(), 1);
    }
}

/// Percent-encodes a token for the query string (reserved characters only matter here).
fn url_escape(token: &str) -> String {
    token
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_10_mb_webhook_body_is_refused_unread_and_changes_nothing() {
    let world = webhook_world("COMPLETED");
    let before = stored(&world);
    let mut body = json!({"id": RUNPOD_ID, "status": "COMPLETED", "input": {}}).to_string();
    body.insert_str(body.len() - 2, &"x".repeat(10 * 1024 * 1024));
    let (status, _) = runtime().block_on(call(
        world.webhook(),
        webhook_request(&world, None, body.into_bytes()),
    ));
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(stored(&world), before);
    assert!(world.volume.touched().is_empty());
}

#[test]
fn a_5_mb_webhook_echoing_a_large_input_is_still_handled() {
    let body = json!({
        "id": RUNPOD_ID,
        "status": "COMPLETED",
        "input": {"workflow_api": {"blob": "y".repeat(5 * 1024 * 1024)}},
        "output": {"files": [format!("/runpod-volume/gateway/kit/outputs/{JOB}/restore_00001_.png")]},
    });
    let world = world_where_runpod_reports(&body);
    let (status, _) = runtime().block_on(call(
        world.webhook(),
        webhook_request(&world, None, body.to_string().into_bytes()),
    ));
    // The webhook hands the completed run over; finalize collects it.
    runtime().block_on(world.run_finalize());
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored(&world).state, JobState::Succeeded);
}

// ---------------------------------------------------------------------------------------------
// The submit validator (POST /jobs, through the router)
// ---------------------------------------------------------------------------------------------

fn submit_world() -> World {
    World::new(
        MemObjects::default(),
        MemObjects::with(&[
            (&format!("uploads/alice/{UPLOAD}"), &png()),
            (&format!("uploads/bob/{BOBS_UPLOAD}"), &png()),
        ]),
        RunPodStatus::default(),
    )
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop_oneof![
            Just(0.0),
            Just(0.01),
            Just(0.009_999),
            Just(1.0),
            Just(4.0),
            Just(4.000_001),
            Just(-0.0),
            Just(0.5),
            Just(1e308),
            Just(-1e-308),
            Just(4_294_967_295.0),
            Just(4_294_967_296.0)
        ]
        .prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(4_294_967_295),
            Just(4_294_967_296)
        ]
        .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        Just(Value::from("NaN")),
        Just(Value::from("1e3")),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn params() -> impl Strategy<Value = Value> {
    let name = prop_oneof![
        4 => Just("megapixels".to_string()),
        4 => Just("denoise".to_string()),
        4 => Just("seed".to_string()),
        1 => Just("Megapixels".to_string()),
        1 => Just("../seed".to_string()),
        1 => "\\PC{0,10}",
    ];
    prop_oneof![
        8 => proptest::collection::btree_map(name, json_value(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        1 => Just(Value::Null),
        1 => json_value(),
    ]
}

fn input() -> impl Strategy<Value = Value> {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let image = prop_oneof![
        4 => Just(b64(&png())),
        1 => Just(format!("data:image/png;base64,{}", b64(&png()))),
        1 => Just(b64(b"GIF89a not an image we take")),
        1 => Just(b64(&png()[..20])),
        1 => Just("%%% not base64 %%%".to_string()),
        1 => Just(String::new()),
        1 => proptest::collection::vec(any::<u8>(), 0..256).prop_map(move |b| b64(&b)),
    ];
    let upload = prop_oneof![
        3 => Just(UPLOAD.to_string()),
        1 => Just(UPLOAD.to_uppercase()),
        1 => Just(format!("{{{UPLOAD}}}")),
        2 => Just(BOBS_UPLOAD.to_string()),
        1 => Just(format!("../bob/{BOBS_UPLOAD}")),
        1 => Just(format!("%2e%2e/bob/{BOBS_UPLOAD}")),
        1 => Just(format!("{UPLOAD}/../../bob/{BOBS_UPLOAD}")),
        1 => Just(format!("{UPLOAD}\0")),
        1 => "[a-z]{300}",
        1 => "\\PC{0,40}",
    ];
    prop_oneof![
        4 => image.prop_map(|i| json!({"image_base64": i})),
        3 => upload.prop_map(|u| json!({"upload_id": u})),
        1 => Just(json!({"image_base64": b64(&png()), "upload_id": UPLOAD})),
        1 => Just(json!({})),
        1 => json_value(),
        1 => Just(json!({"image_base64": b64(&png()), "path": "/etc/passwd"})),
    ]
}

fn idempotency_key() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        4 => Just(None),
        2 => "[A-Za-z0-9_-]{1,40}".prop_map(|k| Some(k.into_bytes())),
        1 => Just(Some(b"a#b".to_vec())),
        1 => Just(Some(vec![b'k'; 129])),
        1 => Just(Some(b"   ".to_vec())),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Some),
    ]
}

/// The validator's contract, written independently: is this request acceptable?
fn acceptable(request: &Value, idempotency_key: Option<&[u8]>) -> bool {
    let Some(top) = request.as_object() else {
        return false;
    };
    if top
        .keys()
        .any(|k| !matches!(k.as_str(), "workflow" | "params" | "input"))
    {
        return false;
    }
    if top.get("workflow") != Some(&json!("restore")) {
        return false;
    }
    let params_ok = match top.get("params") {
        None | Some(Value::Null) => true,
        Some(Value::Object(params)) => params.iter().all(|(name, value)| param_ok(name, value)),
        Some(_) => false,
    };
    let input_ok = match top.get("input").and_then(Value::as_object) {
        Some(input) if input.len() == 1 => match input.iter().next().unwrap() {
            (k, Value::String(image)) if k == "image_base64" => {
                let data = image.trim();
                let data = data.split_once(";base64,").map_or(data, |(_, d)| d);
                base64::engine::general_purpose::STANDARD.decode(data).ok() == Some(png())
            }
            (k, Value::String(id)) if k == "upload_id" => {
                uuid::Uuid::parse_str(id).is_ok_and(|u| u.to_string() == UPLOAD)
            }
            _ => false,
        },
        _ => false,
    };
    let key_ok = match idempotency_key {
        None => true,
        Some(raw) => std::str::from_utf8(raw).is_ok_and(|k| {
            let k = k.trim();
            !k.is_empty()
                && k.len() <= 128
                && !k.contains('#')
                && k.bytes().all(|b| (0x20..0x7f).contains(&b))
        }),
    };
    params_ok && input_ok && key_ok
}

fn param_ok(name: &str, value: &Value) -> bool {
    let number = |min: f64, max: f64| {
        value
            .as_f64()
            .is_some_and(|x| x.is_finite() && (min..=max).contains(&x))
    };
    match name {
        "megapixels" => number(0.01, 4.0),
        "denoise" => number(0.0, 1.0),
        "seed" => match value {
            Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => (0..=4_294_967_295).contains(&i),
                (None, Some(f)) if n.as_u64().is_none() => {
                    f.is_finite() && f.fract() == 0.0 && (0.0..=4_294_967_295.0).contains(&f)
                }
                _ => false,
            },
            _ => false,
        },
        _ => false,
    }
}

fn submit_request(body: Vec<u8>, idempotency_key: Option<&[u8]>) -> Option<Request<Body>> {
    let mut request = Request::post("/jobs")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json");
    if let Some(key) = idempotency_key {
        // Bytes no HTTP client could send (newlines, NUL) never reach the gateway.
        request = request.header("idempotency-key", HeaderValue::from_bytes(key).ok()?);
    }
    Some(request.body(Body::from(body)).unwrap())
}

/// Nothing was written anywhere, and nothing outside the caller's own keys was looked at.
fn assert_untouched(world: &World) -> Result<(), TestCaseError> {
    prop_assert_eq!(world.store.writes(), 0);
    prop_assert!(world.store.jobs().is_empty());
    prop_assert!(world.queue.sent().is_empty());
    prop_assert_eq!(world.uploads.keys().len(), 2, "{:?}", world.uploads.keys());
    Ok(())
}

proptest! {
    #[test]
    fn arbitrary_bytes_are_refused_without_a_trace(body in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..4096),
        "\\PC{0,512}".prop_map(String::into_bytes),
        (0usize..20_000).prop_map(|depth| "[".repeat(depth).into_bytes()),
    ]) {
        let world = submit_world();
        let (status, response) = runtime().block_on(call(world.api(), submit_request(body, None).unwrap()));
        prop_assert!(status.is_client_error(), "{status}");
        let error: Value = serde_json::from_slice(&response).unwrap();
        prop_assert!(error["error"]["code"].is_string());
        assert_untouched(&world)?;
    }

    #[test]
    fn a_job_request_is_accepted_exactly_when_it_is_valid(
        workflow in prop_oneof![
            8 => Just(json!("restore")),
            1 => Just(json!("Restore")),
            1 => Just(json!("../restore")),
            1 => Just(json!("restore\0")),
            1 => "\\PC{0,20}".prop_map(Value::from),
            1 => json_value(),
        ],
        params in params(),
        input in input(),
        extra in prop_oneof![8 => Just(None), 1 => Just(Some(("callback_url", json!("http://169.254.169.254/")))), 1 => Just(Some(("owner", json!("bob"))))],
        key in idempotency_key(),
    ) {
        let mut request = json!({"workflow": workflow, "params": params, "input": input});
        if let Some((name, value)) = extra {
            request[name] = value;
        }
        let Some(http) = submit_request(request.to_string().into_bytes(), key.as_deref()) else {
            return Ok(());
        };
        let world = submit_world();
        let (status, response) = runtime().block_on(call(world.api(), http));
        let valid = acceptable(&request, key.as_deref());
        let response: Value = serde_json::from_slice(&response).unwrap_or_default();
        if valid {
            prop_assert_eq!(status, StatusCode::ACCEPTED, "{}: {}", request, response);
            let jobs = world.store.jobs();
            prop_assert_eq!(jobs.len(), 1);
            let job = &jobs[0];
            prop_assert_eq!(&job.owner, "alice");
            prop_assert_eq!(job.state, JobState::Queued);
            prop_assert_eq!(job.callback_url.clone(), None);
            let p = &job.params.0;
            prop_assert!((0.01..=4.0).contains(&p["megapixels"].as_f64().unwrap()));
            prop_assert!((0.0..=1.0).contains(&p["denoise"].as_f64().unwrap()));
            prop_assert!((0..=4_294_967_295u64).contains(&p["seed"].as_u64().unwrap()));
            prop_assert!(job.input.key.starts_with("inputs/alice/") || job.input.key.starts_with("uploads/alice/"));
            prop_assert_eq!(world.queue.sent(), vec![job.id.clone()]);
        } else {
            prop_assert!(status.is_client_error(), "{status} for {request}: {response}");
            prop_assert!(response["error"]["code"].is_string(), "{response}");
            assert_untouched(&world)?;
        }
        // Whatever happened, no one else's upload was ever looked at.
        for key in world.uploads.touched() {
            prop_assert!(key.starts_with("uploads/alice/") || key.starts_with("inputs/alice/"), "touched {key}");
        }
        prop_assert!(world.runpod.calls().is_empty());
    }
}

#[test]
fn a_10_mb_submission_is_refused_without_a_trace() {
    let world = submit_world();
    let body = json!({
        "workflow": "restore",
        "input": {"image_base64": "A".repeat(10 * 1024 * 1024)},
    });
    let (status, _) = runtime().block_on(call(
        world.api(),
        submit_request(body.to_string().into_bytes(), None).unwrap(),
    ));
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_untouched(&world).unwrap();
}

#[test]
fn the_validator_oracle_knows_every_restore_parameter() {
    // Guard for the oracle above: the manifest still has exactly these parameters.
    let catalog = gateway::domain::workflow::WorkflowCatalog::builtin().unwrap();
    let names: Vec<&String> = catalog.get("restore").unwrap().params().keys().collect();
    assert_eq!(names, ["denoise", "megapixels", "seed"]);
}

#[test]
fn outputs_sharing_a_name_in_different_folders_are_both_kept() {
    // Found by `a_completed_report_copies_only_the_jobs_own_files`: both used to be copied to
    // the same result key, the second overwriting the first.
    let body = json!({
        "id": RUNPOD_ID,
        "status": "COMPLETED",
        "output": {"files": [
            format!("/runpod-volume/gateway/kit/outputs/{JOB}/restore_00001_.png"),
            format!("/runpod-volume/gateway/kit/outputs/{JOB}/sub/restore_00001_.png"),
        ]},
    });
    let world = world_where_runpod_reports(&body);
    let (status, _) = runtime().block_on(call(
        world.webhook(),
        webhook_request(&world, None, body.to_string().into_bytes()),
    ));
    // The webhook hands the completed run over; finalize collects it.
    runtime().block_on(world.run_finalize());
    assert_eq!(status, StatusCode::OK);
    let job = stored(&world);
    assert_eq!(job.state, JobState::Succeeded);
    let names: Vec<&str> = job.outputs.iter().map(|o| o.file_name.as_str()).collect();
    assert_eq!(names, ["restore_00001_.png", "restore_00001_-2.png"]);
    let bytes: Vec<_> = job
        .outputs
        .iter()
        .map(|o| world.results.get(&o.key).unwrap())
        .collect();
    assert_eq!(bytes[0].as_ref(), b"first output");
    assert_eq!(bytes[1].as_ref(), b"nested output, same name");
}

#[test]
fn a_job_failing_on_a_missing_output_leaves_no_partial_outputs() {
    // Found by the same property: the outputs copied before the missing one stayed behind.
    let body = json!({
        "id": RUNPOD_ID,
        "status": "COMPLETED",
        "output": {"files": [
            format!("/runpod-volume/gateway/kit/outputs/{JOB}/restore_00001_.png"),
            format!("/runpod-volume/gateway/kit/outputs/{JOB}/missing.png"),
        ]},
    });
    let world = world_where_runpod_reports(&body);
    runtime().block_on(call(
        world.webhook(),
        webhook_request(&world, None, body.to_string().into_bytes()),
    ));
    // The webhook hands the completed run over; finalize collects it.
    runtime().block_on(world.run_finalize());
    let job = stored(&world);
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error.unwrap().code, ErrorCode::OutputMissing);
    assert!(
        world.results.keys().is_empty(),
        "{:?}",
        world.results.keys()
    );
}
