//! The volume S3 API with aws-sdk-s3, configured as against RunPod.

use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use runpod_emulator::Emulator;

use crate::common::*;

fn s3_client(emu: &Emulator, secret: &str) -> Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        // RunPod's datacenter id; the emulator does not check it.
        .region(Region::new("eu-ro-1"))
        .endpoint_url(&emu.s3_url)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            &emu.volume_access_key,
            secret,
            None,
            None,
            "test",
        ))
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(config)
}

fn s3(emu: &Emulator) -> Client {
    s3_client(emu, &emu.volume_secret_key)
}

#[tokio::test]
async fn put_get_head_delete_map_to_files_in_the_volume() {
    let h = start().await;
    let client = s3(&h.emu);
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
    let got = s3(&h.emu)
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
    let client = s3(&h.emu);
    let bucket = &h.emu.volume_id;
    let key = "inputs/big/video.bin";
    // s3s-fs enforces AWS's 5 MiB minimum for all but the last part (RunPod does not).
    let part1 = vec![1u8; 5 * 1024 * 1024];
    let part2 = vec![2u8; 1000];
    let upload = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .expect("create");
    let upload_id = upload.upload_id().unwrap();
    let mut parts = Vec::new();
    for (n, data) in [(1, part1.clone()), (2, part2.clone())] {
        let part = client
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(n)
            .body(ByteStream::from(data))
            .send()
            .await
            .expect("upload part");
        parts.push(
            CompletedPart::builder()
                .part_number(n)
                .e_tag(part.e_tag().unwrap())
                .build(),
        );
    }
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
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
    assert_eq!(&on_disk[part1.len()..], &part2[..]);
    // The staging files stay out of the volume.
    let listed = client
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .unwrap();
    let keys: Vec<&str> = listed.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(keys, [key]);
}

#[tokio::test]
async fn list_objects_v2_lists_keys_by_prefix_and_delimiter() {
    let h = start().await;
    let client = s3(&h.emu);
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
    let result = s3_client(&h.emu, "rps_wrong")
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
    let result = s3(&h.emu)
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
    let client = s3(&h.emu);
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
    let client = s3(&h.emu);
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
