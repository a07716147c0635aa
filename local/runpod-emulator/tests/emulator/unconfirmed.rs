//! Behaviour that rests on facts the reference marks UNCONFIRMED, each behind a switch: both
//! answers are exercised here. The list, with the switches, is in the emulator's README.

use std::time::Duration;

use runpod_emulator::Faults;
use serde_json::{json, Value};

use crate::common::*;

async fn external() -> Harness {
    start_with(|c| {
        c.builtin_worker = false;
        c.worker_poll_hold = Duration::from_millis(200);
    })
    .await
}

async fn take(h: &Harness, pod: &str) -> Value {
    let response = h
        .http
        .get(h.url(&format!("job-take/{pod}?gpu=SIM&job_in_progress=0")))
        .header("authorization", &h.emu.api_key)
        .send()
        .await
        .unwrap();
    decode(response).await.1
}

async fn done(h: &Harness, pod: &str, id: &str, body: String) -> u16 {
    h.http
        .post(h.url(&format!("job-done/{pod}/{id}?gpu=SIM&isStream=false")))
        .header("authorization", &h.emu.api_key)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn s3_config_reaches_the_worker_under_the_configured_key_or_not_at_all() {
    let h = external().await;
    let s3 =
        json!({"accessId": "a", "accessSecret": "s", "bucketName": "b", "endpointUrl": "http://x"});
    h.run(json!({"input": {}, "s3Config": s3})).await;
    assert_eq!(take(&h, "pod1").await["s3Config"], s3);

    let h = start_with(|c| {
        c.builtin_worker = false;
        c.s3_config_job_key = None;
    })
    .await;
    h.run(json!({"input": {}, "s3Config": s3})).await;
    let job = take(&h, "pod1").await;
    assert!(job.get("s3Config").is_none(), "{job}");
    assert_eq!(job["input"], json!({}));
}

#[tokio::test]
async fn job_done_over_the_result_limit_is_400_and_completes_without_output() {
    let h = start_with(|c| {
        c.builtin_worker = false;
        c.job_done_max_bytes = 1024;
    })
    .await;
    let id = h.run(json!({"input": {}})).await;
    take(&h, "pod1").await;
    let big = json!({"output": {"data": "x".repeat(2048)}}).to_string();
    assert_eq!(done(&h, "pod1", &id, big).await, 400);
    let body = h.wait_status(&id, "COMPLETED").await;
    assert!(body.get("output").is_none(), "{body}");

    // The same body under the default (20 MB) limit goes through.
    let h = external().await;
    let id = h.run(json!({"input": {}})).await;
    take(&h, "pod1").await;
    let big = json!({"output": {"data": "x".repeat(2048)}}).to_string();
    assert_eq!(done(&h, "pod1", &id, big).await, 200);
    let body = h.wait_status(&id, "COMPLETED").await;
    assert_eq!(body["output"]["data"].as_str().unwrap().len(), 2048);
}

#[tokio::test]
async fn job_id_suffix_and_not_found_body_are_configurable() {
    let h = start().await;
    let id = h.run(json!({"input": {}})).await;
    assert!(id.ends_with("-e1"), "{id}");
    let (status, body) = h.status("nope").await;
    assert_eq!(status.as_u16(), 404);
    assert_eq!(body, json!({"error": "job not found"}));

    let h = start_with(|c| {
        c.job_id_suffix = "-u1".into();
        c.job_not_found_body = json!({"message": "request does not exist"});
    })
    .await;
    let id = h.run(json!({"input": {}})).await;
    assert!(id.ends_with("-u1"), "{id}");
    let (status, body) = h.status("nope").await;
    assert_eq!(status.as_u16(), 404);
    assert_eq!(body, json!({"message": "request does not exist"}));
}

#[tokio::test]
async fn webhook_content_type_and_worker_id_are_switches() {
    let hook = Receiver::start(200).await;
    let h = start_with(|c| {
        c.faults = Faults {
            webhook_content_type: String::new(),
            webhook_worker_id: true,
            ..Faults::default()
        };
    })
    .await;
    let mut job = trivial_job(&h.dir);
    job["webhook"] = json!(hook.url);
    h.run(job).await;
    let hits = hook.wait_hits(1).await;
    assert_eq!(hits[0].content_type, None);
    let payload: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert!(
        payload["workerId"]
            .as_str()
            .unwrap()
            .starts_with("builtin-"),
        "{payload}"
    );
}

#[tokio::test]
async fn run_queue_limit_answers_429_while_the_queue_is_full() {
    let h = start_with(|c| {
        c.builtin_worker = false;
        c.faults = Faults {
            run_queue_limit: Some(1),
            ..Faults::default()
        };
    })
    .await;
    h.run(json!({"input": {}})).await;
    h.run(json!({"input": {}})).await;
    let (status, _) = h.post("run", json!({"input": {}})).await;
    assert_eq!(status.as_u16(), 429);
    h.emu.set_faults(Faults::default());
    h.run(json!({"input": {}})).await;
}

#[tokio::test]
async fn worker_calls_are_logged() {
    let h = external().await;
    let id = h.run(json!({"input": {}})).await;
    take(&h, "pod1").await;
    done(
        &h,
        "pod1",
        &id,
        json!({"status": "IN_PROGRESS", "output": 1}).to_string(),
    )
    .await;
    done(&h, "pod1", &id, json!({"output": 2}).to_string()).await;
    let calls: Vec<(String, Vec<String>, u16)> = h
        .emu
        .worker_calls()
        .into_iter()
        .map(|c| (c.route, c.job_ids, c.status))
        .collect();
    assert_eq!(
        calls,
        vec![
            ("job-take".to_owned(), vec![id.clone()], 200),
            ("job-progress".to_owned(), vec![id.clone()], 200),
            ("job-done".to_owned(), vec![id.clone()], 200),
        ]
    );
    let (_, over_http) = h
        .http
        .get(format!("{}/_emulator/worker-calls?pod=pod1", h.emu.api_url))
        .send()
        .await
        .map(|r| async { decode(r).await })
        .unwrap()
        .await;
    assert_eq!(over_http.as_array().unwrap().len(), 3);
}

async fn put(client: &aws_sdk_s3::Client, h: &Harness, key: &str) {
    client
        .put_object()
        .bucket(&h.emu.volume_id)
        .key(key)
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"x"))
        .send()
        .await
        .expect("put");
}

/// One level of a Delimiter='/' listing: keys and common prefixes, every page.
async fn list_level(
    client: &aws_sdk_s3::Client,
    h: &Harness,
    prefix: &str,
    max_keys: i32,
) -> (Vec<String>, Vec<String>) {
    let (mut keys, mut prefixes) = (Vec::new(), Vec::new());
    let mut token: Option<String> = None;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(&h.emu.volume_id)
            .prefix(prefix)
            .delimiter("/")
            .max_keys(max_keys)
            .set_continuation_token(token.clone())
            .send()
            .await
            .expect("list");
        keys.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        prefixes.extend(
            page.common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(str::to_owned)),
        );
        let next = page.next_continuation_token().map(str::to_owned);
        assert!(
            next.is_none() || next != token,
            "a level listing repeated its token"
        );
        if next.is_none() {
            return (keys, prefixes);
        }
        token = next;
    }
}

/// Six files in three folders: `f0/0.txt`, `f0/1.txt`, `f1/0.txt`…
async fn six_files(client: &aws_sdk_s3::Client, h: &Harness) -> Vec<String> {
    let mut keys = Vec::new();
    for folder in 0..3 {
        for file in 0..2 {
            let key = format!("f{folder}/{file}.txt");
            put(client, h, &key).await;
            keys.push(key);
        }
    }
    keys
}

#[tokio::test]
async fn staging_folder_is_hidden_from_listings_unless_switched_on() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let upload_id = begin_upload(&client, &h.emu, "inputs/big.bin").await;
    send_part(
        &client,
        &h.emu,
        "inputs/big.bin",
        &upload_id,
        1,
        vec![1u8; 64],
    )
    .await;
    put(&client, &h, "inputs/small.txt").await;
    assert_eq!(list_page(&client, &h.emu, "").await, ["inputs/small.txt"]);
    let (keys, prefixes) = list_level(&client, &h, "", 1000).await;
    assert!(keys.is_empty());
    assert_eq!(prefixes, ["inputs/"]);
    let part_key = format!(".s3compat_uploads/{upload_id}/1");
    let hidden = client
        .get_object()
        .bucket(&h.emu.volume_id)
        .key(&part_key)
        .send()
        .await
        .expect_err("hidden");
    let code = hidden.into_service_error().meta().code().map(str::to_owned);
    assert_eq!(code.as_deref(), Some("NoSuchKey"));

    let h = start_with(|c| c.s3_list_staging_folder = true).await;
    let client = volume_s3(&h.emu);
    let upload_id = begin_upload(&client, &h.emu, "inputs/big.bin").await;
    send_part(
        &client,
        &h.emu,
        "inputs/big.bin",
        &upload_id,
        1,
        vec![1u8; 64],
    )
    .await;
    let part_key = format!(".s3compat_uploads/{upload_id}/1");
    assert_eq!(
        list_page(&client, &h.emu, "").await,
        [
            part_key.clone(),
            format!(".s3compat_uploads/{upload_id}/upload.json")
        ]
    );
    let (_, prefixes) = list_level(&client, &h, "", 1000).await;
    assert_eq!(prefixes, [".s3compat_uploads/"]);
    let got = client
        .get_object()
        .bucket(&h.emu.volume_id)
        .key(&part_key)
        .send()
        .await
        .expect("visible");
    assert_eq!(got.body.collect().await.unwrap().into_bytes().len(), 64);
}

#[tokio::test]
async fn empty_folders_are_listed_as_keys_and_common_prefixes_unless_switched_off() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    std::fs::create_dir_all(h.emu.volume_dir.join("a/empty")).unwrap();
    put(&client, &h, "a/file.txt").await;
    let listed = client
        .list_objects_v2()
        .bucket(&h.emu.volume_id)
        .send()
        .await
        .unwrap();
    let objects: Vec<(&str, i64)> = listed
        .contents()
        .iter()
        .map(|o| (o.key().unwrap(), o.size().unwrap()))
        .collect();
    assert_eq!(objects, [("a/empty/", 0), ("a/file.txt", 1)]);
    let (keys, prefixes) = list_level(&client, &h, "a/", 1000).await;
    assert_eq!(
        (keys, prefixes),
        (vec!["a/file.txt".to_owned()], vec!["a/empty/".to_owned()])
    );
    // Named by the prefix itself, the empty folder is a key of that level.
    let (keys, prefixes) = list_level(&client, &h, "a/empty/", 1000).await;
    assert_eq!((keys, prefixes), (vec!["a/empty/".to_owned()], vec![]));

    let h = start_with(|c| c.s3_list_empty_folders = false).await;
    let client = volume_s3(&h.emu);
    std::fs::create_dir_all(h.emu.volume_dir.join("a/empty")).unwrap();
    put(&client, &h, "a/file.txt").await;
    assert_eq!(list_page(&client, &h.emu, "").await, ["a/file.txt"]);
    let (keys, prefixes) = list_level(&client, &h, "a/", 1000).await;
    assert_eq!((keys, prefixes), (vec!["a/file.txt".to_owned()], vec![]));
}

#[tokio::test]
async fn delete_object_removes_an_empty_folder_unless_switched_off() {
    let delete = |client: aws_sdk_s3::Client, bucket: String, key: &'static str| async move {
        client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .expect("delete answers 204");
    };
    let h = start().await;
    std::fs::create_dir_all(h.emu.volume_dir.join("outputs/job/empty")).unwrap();
    std::fs::write(h.emu.volume_dir.join("outputs/job/kept.png"), b"png").unwrap();
    let bucket = h.emu.volume_id.clone();
    delete(volume_s3(&h.emu), bucket.clone(), "outputs/job/empty/").await;
    assert!(!h.emu.volume_dir.join("outputs/job/empty").exists());
    // A folder with a file in it stays whatever the switch says.
    delete(volume_s3(&h.emu), bucket, "outputs/job/").await;
    assert!(h.emu.volume_dir.join("outputs/job/kept.png").exists());

    let h = start_with(|c| c.s3_delete_removes_empty_folder = false).await;
    std::fs::create_dir_all(h.emu.volume_dir.join("outputs/job/empty")).unwrap();
    delete(
        volume_s3(&h.emu),
        h.emu.volume_id.clone(),
        "outputs/job/empty/",
    )
    .await;
    assert!(h.emu.volume_dir.join("outputs/job/empty").is_dir());
}

#[tokio::test]
async fn recursive_listing_past_the_threshold_repeats_its_page_and_token() {
    let h = start_with(|c| c.s3_repeat_token_above = Some(3)).await;
    let client = volume_s3(&h.emu);
    let keys = six_files(&client, &h).await;
    let page = |token: Option<String>| {
        client
            .list_objects_v2()
            .bucket(&h.emu.volume_id)
            .max_keys(2)
            .set_continuation_token(token)
            .send()
    };
    let names = |out: &aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output| -> Vec<String> {
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect()
    };
    let first = page(None).await.unwrap();
    assert_eq!(names(&first), keys[0..2]);
    let second = page(first.next_continuation_token().map(str::to_owned))
        .await
        .unwrap();
    assert_eq!(names(&second), keys[2..4]);
    // Four keys handed out, past three: the second page again, with its own token.
    let stuck = second.next_continuation_token().map(str::to_owned);
    for _ in 0..2 {
        let again = page(stuck.clone()).await.unwrap();
        assert_eq!(names(&again), keys[2..4]);
        assert_eq!(again.next_continuation_token().map(str::to_owned), stuck);
        assert_eq!(again.is_truncated(), Some(true));
    }

    // The SDK's paginator takes the repeated token as the end: it stops short, silently.
    let mut paginated = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(&h.emu.volume_id)
        .max_keys(2)
        .into_paginator()
        .send();
    while let Some(out) = pages.next().await {
        paginated.extend(names(&out.unwrap()));
    }
    assert!(!paginated.contains(&keys[5]), "{paginated:?}");

    // Level by level (Delimiter='/'), as RunPod's example lists, every key is reached.
    let (top_keys, folders) = list_level(&client, &h, "", 2).await;
    assert!(top_keys.is_empty());
    let mut found = Vec::new();
    for folder in &folders {
        found.extend(list_level(&client, &h, folder, 1).await.0);
    }
    assert_eq!(found, keys);
}

#[tokio::test]
async fn level_listings_repeat_too_when_switched_on() {
    let h = start_with(|c| {
        c.s3_repeat_token_above = Some(2);
        c.s3_repeat_token_delimited = true;
    })
    .await;
    let client = volume_s3(&h.emu);
    for n in 0..6 {
        put(&client, &h, &format!("outputs/j{n}/a.png")).await;
    }
    let page = |token: Option<String>| {
        client
            .list_objects_v2()
            .bucket(&h.emu.volume_id)
            .prefix("outputs/")
            .delimiter("/")
            .max_keys(2)
            .set_continuation_token(token)
            .send()
    };
    let first = page(None).await.unwrap();
    let second = page(first.next_continuation_token().map(str::to_owned))
        .await
        .unwrap();
    let stuck = second.next_continuation_token().map(str::to_owned);
    let again = page(stuck.clone()).await.unwrap();

    assert_eq!(again.common_prefixes(), second.common_prefixes());
    assert_eq!(again.next_continuation_token().map(str::to_owned), stuck);
}

#[tokio::test]
async fn recursive_listing_never_repeats_when_switched_off() {
    let h = start_with(|c| c.s3_repeat_token_above = None).await;
    let client = volume_s3(&h.emu);
    let keys = six_files(&client, &h).await;
    let mut seen = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(&h.emu.volume_id)
        .max_keys(1)
        .into_paginator()
        .send();
    while let Some(out) = pages.next().await {
        seen.extend(
            out.unwrap()
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
    }
    assert_eq!(seen, keys);
}
