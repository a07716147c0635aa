//! The volume S3 API with aws-sdk-s3, configured as against RunPod.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use crate::common::*;

#[tokio::test]
async fn put_get_head_delete_map_to_files_in_the_volume() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let bucket = &h.emu.volume_id;
    client
        .put_object()
        .bucket(bucket)
        .key("inputs/job-1/input.jpg")
        .content_type("image/jpeg")
        .body(ByteStream::from_static(b"jpeg bytes"))
        .send()
        .await
        .expect("put");
    let on_disk = std::fs::read(h.emu.volume_dir.join("inputs/job-1/input.jpg")).unwrap();
    assert_eq!(on_disk, b"jpeg bytes");

    let head = client
        .head_object()
        .bucket(bucket)
        .key("inputs/job-1/input.jpg")
        .send()
        .await
        .expect("head");
    assert_eq!(head.content_length(), Some(10));

    let got = client
        .get_object()
        .bucket(bucket)
        .key("inputs/job-1/input.jpg")
        .send()
        .await
        .expect("get");
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().as_ref(),
        b"jpeg bytes"
    );

    client
        .delete_object()
        .bucket(bucket)
        .key("inputs/job-1/input.jpg")
        .send()
        .await
        .expect("delete");
    assert!(!h.emu.volume_dir.join("inputs/job-1/input.jpg").exists());
    let missing = client
        .head_object()
        .bucket(bucket)
        .key("inputs/job-1/input.jpg")
        .send()
        .await;
    assert!(missing.is_err());
}

#[tokio::test]
async fn files_written_on_the_volume_are_readable_over_s3() {
    let h = start().await;
    let path = h.emu.volume_dir.join("outputs/job-2/x.png");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"png").unwrap();
    let got = volume_s3(&h.emu)
        .get_object()
        .bucket(&h.emu.volume_id)
        .key("outputs/job-2/x.png")
        .send()
        .await
        .expect("get");
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().as_ref(),
        b"png"
    );
}

#[tokio::test]
async fn multipart_upload_assembles_the_file() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let bucket = &h.emu.volume_id;
    let key = "inputs/big/video.bin";
    // RunPod has no 5 MB minimum part size. The first part spans several read buffers.
    let part1: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let part2 = vec![2u8; 1000];
    let upload_id = begin_upload(&client, &h.emu, key).await;
    let mut parts = Vec::new();
    for (n, data) in [(1, part1.clone()), (2, part2.clone())] {
        let e_tag = send_part(&client, &h.emu, key, &upload_id, n, data).await;
        parts.push(CompletedPart::builder().part_number(n).e_tag(e_tag).build());
    }
    let done = client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .expect("complete");
    let on_disk = std::fs::read(h.emu.volume_dir.join(key)).unwrap();
    assert_eq!(on_disk.len(), part1.len() + part2.len());
    assert_eq!(&on_disk[..part1.len()], &part1[..]);
    assert_eq!(&on_disk[part1.len()..], &part2[..]);
    let head = client
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    assert_eq!(head.e_tag(), done.e_tag());
    assert_eq!(list_page(&client, &h.emu, "").await, [key]);
}

#[tokio::test]
async fn staged_parts_are_volume_bytes_until_the_upload_completes() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let key = "inputs/staged/big.bin";
    let upload_id = begin_upload(&client, &h.emu, key).await;
    let e_tag = send_part(&client, &h.emu, key, &upload_id, 1, vec![7u8; 4096]).await;

    let part_file = h
        .emu
        .volume_dir
        .join(".s3compat_uploads")
        .join(&upload_id)
        .join("1");
    assert_eq!(std::fs::read(&part_file).unwrap(), vec![7u8; 4096]);
    let staged = h.emu.staged_upload_bytes();
    assert!(staged >= 4096, "{staged}");
    assert_eq!(h.emu.volume_bytes(), staged);
    let uploads = h.emu.staged_uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(
        (uploads[0].key.as_str(), uploads[0].upload_id.as_str()),
        (key, upload_id.as_str())
    );
    assert_eq!((uploads[0].parts, uploads[0].bytes), (1, staged));

    client
        .complete_multipart_upload()
        .bucket(&h.emu.volume_id)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .parts(CompletedPart::builder().part_number(1).e_tag(e_tag).build())
                .build(),
        )
        .send()
        .await
        .expect("complete");
    assert!(!part_file.exists());
    assert_eq!(h.emu.staged_upload_bytes(), 0);
    assert!(h.emu.staged_uploads().is_empty());
    assert_eq!(h.emu.volume_bytes(), 4096);
}

#[tokio::test]
async fn list_multipart_uploads_lists_uploads_in_progress_by_prefix() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut begun = Vec::new();
    for key in ["outputs/z.bin", "inputs/b/y.bin", "inputs/a/x.bin"] {
        begun.push((key.to_owned(), begin_upload(&client, &h.emu, key).await));
    }
    begun.sort();

    let listed = client
        .list_multipart_uploads()
        .bucket(&h.emu.volume_id)
        .send()
        .await
        .expect("list uploads");
    let found: Vec<(String, String)> = listed
        .uploads()
        .iter()
        .map(|u| {
            (
                u.key().unwrap().to_owned(),
                u.upload_id().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(found, begun);
    for upload in listed.uploads() {
        let initiated = upload.initiated().expect("initiated").secs();
        assert!(
            (before - 1..=before + 60).contains(&initiated),
            "{initiated}"
        );
    }

    let listed = client
        .list_multipart_uploads()
        .bucket(&h.emu.volume_id)
        .prefix("inputs/")
        .send()
        .await
        .expect("list uploads");
    let keys: Vec<&str> = listed.uploads().iter().filter_map(|u| u.key()).collect();
    assert_eq!(keys, ["inputs/a/x.bin", "inputs/b/y.bin"]);
}

#[tokio::test]
async fn abort_unlists_the_upload_and_removes_its_staged_parts() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let key = "inputs/aborted/big.bin";
    let upload_id = begin_upload(&client, &h.emu, key).await;
    send_part(&client, &h.emu, key, &upload_id, 1, vec![1u8; 2048]).await;
    send_part(&client, &h.emu, key, &upload_id, 2, vec![2u8; 100]).await;
    assert!(h.emu.staged_upload_bytes() >= 2148);

    client
        .abort_multipart_upload()
        .bucket(&h.emu.volume_id)
        .key(key)
        .upload_id(&upload_id)
        .send()
        .await
        .expect("abort");
    let listed = client
        .list_multipart_uploads()
        .bucket(&h.emu.volume_id)
        .send()
        .await
        .expect("list uploads");
    assert!(listed.uploads().is_empty(), "{listed:?}");
    assert!(!h
        .emu
        .volume_dir
        .join(".s3compat_uploads")
        .join(&upload_id)
        .exists());
    assert_eq!(h.emu.staged_upload_bytes(), 0);
    let late = client
        .upload_part()
        .bucket(&h.emu.volume_id)
        .key(key)
        .upload_id(&upload_id)
        .part_number(3)
        .body(ByteStream::from_static(b"late"))
        .send()
        .await
        .expect_err("the upload is gone");
    let code = late.into_service_error().meta().code().map(str::to_owned);
    assert_eq!(code.as_deref(), Some("NoSuchUpload"));
}

#[tokio::test]
async fn list_parts_lists_each_stored_part_with_its_size_and_etag() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let key = "inputs/parts/big.bin";
    let upload_id = begin_upload(&client, &h.emu, key).await;
    let first = send_part(&client, &h.emu, key, &upload_id, 1, vec![1u8; 300]).await;
    let third = send_part(&client, &h.emu, key, &upload_id, 3, vec![3u8; 30]).await;

    let listed = client
        .list_parts()
        .bucket(&h.emu.volume_id)
        .key(key)
        .upload_id(&upload_id)
        .send()
        .await
        .expect("list parts");
    let parts: Vec<(i32, i64, String)> = listed
        .parts()
        .iter()
        .map(|p| {
            (
                p.part_number().unwrap(),
                p.size().unwrap(),
                p.e_tag().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(parts, [(1, 300, first), (3, 30, third)]);
}

#[tokio::test]
async fn complete_with_an_etag_its_part_lacks_is_refused_and_the_upload_stays() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let key = "inputs/wrong/big.bin";
    let upload_id = begin_upload(&client, &h.emu, key).await;
    send_part(&client, &h.emu, key, &upload_id, 1, vec![1u8; 300]).await;

    let refused = client
        .complete_multipart_upload()
        .bucket(&h.emu.volume_id)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .parts(
                    CompletedPart::builder()
                        .part_number(1)
                        .e_tag("\"00000000000000000000000000000000\"")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect_err("wrong etag");
    let code = refused
        .into_service_error()
        .meta()
        .code()
        .map(str::to_owned);
    assert_eq!(code.as_deref(), Some("InvalidPart"));
    assert!(!h.emu.volume_dir.join(key).exists());
    assert_eq!(h.emu.staged_uploads().len(), 1);
}

#[tokio::test]
async fn the_staging_folder_takes_no_writes() {
    let h = start().await;
    let refused = volume_s3(&h.emu)
        .put_object()
        .bucket(&h.emu.volume_id)
        .key(".s3compat_uploads/forged/upload.json")
        .body(ByteStream::from_static(b"{}"))
        .send()
        .await
        .expect_err("refused");
    let code = refused
        .into_service_error()
        .meta()
        .code()
        .map(str::to_owned);
    assert_eq!(code.as_deref(), Some("AccessDenied"));
    assert!(!h.emu.volume_dir.join(".s3compat_uploads/forged").exists());
}

#[tokio::test]
async fn deleting_a_file_leaves_its_emptied_folder() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    client
        .put_object()
        .bucket(&h.emu.volume_id)
        .key("outputs/job-9/out.png")
        .body(ByteStream::from_static(b"png"))
        .send()
        .await
        .unwrap();
    client
        .delete_object()
        .bucket(&h.emu.volume_id)
        .key("outputs/job-9/out.png")
        .send()
        .await
        .expect("delete");
    assert!(h.emu.volume_dir.join("outputs/job-9").is_dir());
    assert_eq!(
        list_page(&client, &h.emu, "outputs/").await,
        ["outputs/job-9/"]
    );
}

#[tokio::test]
async fn a_folder_read_as_an_object_is_no_such_key() {
    let h = start().await;
    std::fs::create_dir_all(h.emu.volume_dir.join("outputs/job-8")).unwrap();
    for key in ["outputs/job-8/", "outputs/job-8"] {
        let missing = volume_s3(&h.emu)
            .get_object()
            .bucket(&h.emu.volume_id)
            .key(key)
            .send()
            .await
            .expect_err("a folder is no file");
        let code = missing
            .into_service_error()
            .meta()
            .code()
            .map(str::to_owned);
        assert_eq!(code.as_deref(), Some("NoSuchKey"), "{key}");
    }
}

#[tokio::test]
async fn a_recursive_listing_pages_through_every_key_in_order() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let mut keys = vec![
        "a-b.txt",
        "a/1.txt",
        "a/b/2.txt",
        "a/c.txt",
        "a0.txt",
        "outputs/x/y/z.png",
        "z.txt",
    ];
    for key in &keys {
        client
            .put_object()
            .bucket(&h.emu.volume_id)
            .key(*key)
            .body(ByteStream::from_static(b"x"))
            .send()
            .await
            .unwrap();
    }
    keys.sort();
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(&h.emu.volume_id)
            .max_keys(2)
            .set_continuation_token(token.clone())
            .send()
            .await
            .unwrap();
        seen.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned)),
        );
        let next = page.next_continuation_token().map(str::to_owned);
        assert_eq!(page.is_truncated(), Some(next.is_some()));
        if next.is_none() {
            break;
        }
        assert_ne!(next, token, "a token came back twice");
        token = next;
    }
    assert_eq!(seen, keys);
}

#[tokio::test]
async fn list_objects_v2_lists_keys_by_prefix_and_delimiter() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let bucket = &h.emu.volume_id;
    for key in [
        "outputs/a/1.png",
        "outputs/a/2.png",
        "outputs/b/1.png",
        "inputs/a/in.jpg",
    ] {
        client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from_static(b"x"))
            .send()
            .await
            .unwrap();
    }
    let listed = client
        .list_objects_v2()
        .bucket(bucket)
        .prefix("outputs/a/")
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, ["outputs/a/1.png", "outputs/a/2.png"]);

    let listed = client
        .list_objects_v2()
        .bucket(bucket)
        .prefix("outputs/")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    let prefixes: Vec<&str> = listed
        .common_prefixes()
        .iter()
        .filter_map(|p| p.prefix())
        .collect();
    assert_eq!(prefixes, ["outputs/a/", "outputs/b/"]);
}

#[tokio::test]
async fn wrong_secret_is_rejected() {
    let h = start().await;
    let result = volume_s3_with_secret(&h.emu, "rps_wrong")
        .put_object()
        .bucket(&h.emu.volume_id)
        .key("inputs/x")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await;
    assert!(result.is_err());
    assert!(!h.emu.volume_dir.join("inputs/x").exists());
}

#[tokio::test]
async fn unsigned_requests_are_rejected() {
    let h = start().await;
    let response = h
        .http
        .get(format!("{}/{}/inputs/x", h.emu.s3_url, h.emu.volume_id))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
}

#[tokio::test]
async fn other_buckets_do_not_exist() {
    let h = start().await;
    let result = volume_s3(&h.emu)
        .put_object()
        .bucket("other-volume")
        .key("inputs/x")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await;
    let err = result.expect_err("no such bucket");
    let code = err.into_service_error().meta().code().map(str::to_owned);
    assert_eq!(code.as_deref(), Some("NoSuchBucket"));
}

#[tokio::test]
async fn presigned_urls_are_refused_like_runpod() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    client
        .put_object()
        .bucket(&h.emu.volume_id)
        .key("outputs/p.png")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap();
    let presigned = client
        .get_object()
        .bucket(&h.emu.volume_id)
        .key("outputs/p.png")
        .presigned(
            aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(60)).unwrap(),
        )
        .await
        .unwrap();
    let response = h.http.get(presigned.uri()).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 403);
}

#[tokio::test]
async fn worker_reads_an_input_put_through_s3_and_its_output_is_readable_over_s3() {
    let h = start().await;
    let client = volume_s3(&h.emu);
    let bucket = &h.emu.volume_id;
    client
        .put_object()
        .bucket(bucket)
        .key("inputs/job-s3/input.jpg")
        .body(ByteStream::from(jpeg_bytes(300, 200)))
        .send()
        .await
        .expect("put input");
    let id = h
        .run(restore_job(
            "inputs/job-s3/input.jpg",
            0.1,
            "outputs/job-s3/restored",
        ))
        .await;
    let body = h.wait_status(&id, "COMPLETED").await;
    let file = body["output"]["files"][0].as_str().unwrap();
    let key = file
        .strip_prefix(&format!("{}/", h.emu.mount_prefix))
        .expect("under the mount prefix");
    assert_eq!(key, "outputs/job-s3/restored_00001_.png");
    let got = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("get output");
    let bytes = got.body.collect().await.unwrap().into_bytes();
    let image = image::load_from_memory(&bytes).expect("PNG");
    let pixels = image.width() * image.height();
    assert!((100_000..110_000).contains(&pixels), "{pixels}");
}
